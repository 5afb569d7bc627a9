"""The openPangu tokenizer: a SentencePiece model plus the special-token and chat conventions.

    tok = Tokenizer.from_dir("ckpt/")                 # tokenizer.model (+ tokenizer_config.json)
    ids = tok.encode("Hello")                         # [bos, ...] (bos per add_bos_token)
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    text = tok.decode(ids, skip_special_tokens=True)

Conventions (MODEL-SPEC, "Tokenizer and chat format"):

- Special tokens are found **by piece string**, never by a hard-coded id, so the same code
  serves the real openPangu vocabulary (``[unused9]`` = 45887, ``[unused10]`` = 45892) and a
  small one. The special pieces are ``<unk>``, ``<s>``, ``</s>``, ``<pad>``, ``<|User|>:``,
  ``<|Bot|>:`` and every ``[unusedN]``, each only where the model has it.
- ``encode`` splits the text on special-token strings (longest match first) and emits each as
  its one id; the text between them goes through SentencePiece, segment by segment (so the
  model's own normaliser and dummy-prefix setting apply to each segment, as in the Hugging
  Face slow tokenizer). The split is done here because SentencePiece itself never matches
  CONTROL pieces in text, and a checkpoint may store these tokens as CONTROL or USER_DEFINED.
- bos (``<s>``) is prepended per ``add_bos_token`` (default true), eos appended per
  ``add_eos_token`` (default false). eos for generation is ``[unused10]`` (the turn end)
  when the model has it, else ``</s>``.
- Chat template: every message is ``[unused9]ROLE：CONTENT[unused10]`` with ROLE 系统, 用户,
  助手, 工具 or 方法 and a full-width colon (U+FF1A); an empty system turn comes first when
  the first message is not a system one; the generation prompt is ``[unused9]助手：``. The
  template holds no bos: ``encode_chat`` adds it per ``add_bos_token``.
- ``decode`` decodes each run of ordinary ids with SentencePiece and writes a special id as
  its piece text (or drops it with ``skip_special_tokens``); ``StreamDecoder`` yields the same
  text one id at a time.
"""

from __future__ import annotations

import json
import os
import re

import sentencepiece as spm

from .errors import RefimplError

MODEL_NAME = "tokenizer.model"
CONFIG_NAME = "tokenizer_config.json"

#: named special pieces (looked up by string; absent ones are skipped)
NAMED_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<|User|>:", "<|Bot|>:")
_UNUSED_RE = re.compile(r"^\[unused\d+\]$")

TURN_START = "[unused9]"
TURN_END = "[unused10]"
#: chat role -> the role name the template writes
ROLE_NAMES = {"system": "系统", "user": "用户", "assistant": "助手", "tool": "工具",
              "function": "方法"}
ROLE_COLON = "\uff1a"  # full-width colon '：'


class TokenizerError(RefimplError):
    """A tokenizer file is missing or unreadable."""


class ChatTemplateError(TokenizerError, ValueError):
    """A chat message is malformed or has an unknown role (also a ValueError)."""


class Tokenizer:
    """A SentencePiece ``tokenizer.model`` with the openPangu special tokens and chat format."""

    def __init__(self, model_path, add_bos_token: bool = True, add_eos_token: bool = False):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise TokenizerError(f"{model_path}: no such tokenizer file")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{model_path}: not a SentencePiece model ({exc})") from None
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)

        n = self.sp.get_piece_size()
        pieces = self.sp.id_to_piece(list(range(n)))
        wanted = set(NAMED_SPECIALS)
        #: special piece text -> id, for the special pieces this model has
        self.special_ids = {}
        for i, piece in enumerate(pieces):
            if (piece in wanted or _UNUSED_RE.match(piece)) and piece not in self.special_ids:
                self.special_ids[piece] = i
        self.special_pieces = {i: p for p, i in self.special_ids.items()}
        # longest first, so that e.g. "[unused10]" wins over a hypothetical "[unused1]" prefix
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._split_re = (re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
                          if alternatives else None)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """The tokenizer of a directory holding ``tokenizer.model`` and optionally
        ``tokenizer_config.json`` (for ``add_bos_token``, default true, and
        ``add_eos_token``, default false). A path to the model file itself also works."""
        path = os.fspath(path)
        if os.path.isfile(path):
            model, path = path, os.path.dirname(os.path.abspath(path))
        else:
            model = os.path.join(path, MODEL_NAME)
        if not os.path.isfile(model):
            raise TokenizerError(f"{model}: no such tokenizer file")
        options = {}
        config = os.path.join(path, CONFIG_NAME)
        if os.path.isfile(config):
            try:
                with open(config, encoding="utf-8") as fh:
                    d = json.load(fh)
            except (OSError, ValueError) as exc:
                raise TokenizerError(f"{config}: unreadable ({exc})") from None
            for key in ("add_bos_token", "add_eos_token"):
                if isinstance(d, dict) and d.get(key) is not None:
                    options[key] = bool(d[key])
        return cls(model, **options)

    # ------------------------------------------------------------------ ids
    def _id(self, piece: str):
        return self.special_ids.get(piece)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self):
        """id of ``<s>`` (else the model's bos id; None when it has none)."""
        i = self._id("<s>")
        return i if i is not None else (self.sp.bos_id() if self.sp.bos_id() >= 0 else None)

    @property
    def eos_id(self):
        """The end-of-generation id: ``[unused10]`` when present, else ``</s>``."""
        i = self.turn_end_id
        if i is None:
            i = self._id("</s>")
        return i if i is not None else (self.sp.eos_id() if self.sp.eos_id() >= 0 else None)

    @property
    def pad_id(self) -> int:
        """id of ``<pad>``, else the model's pad id, else 0 (MODEL-SPEC)."""
        i = self._id("<pad>")
        return i if i is not None else (self.sp.pad_id() if self.sp.pad_id() >= 0 else 0)

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def turn_start_id(self):
        """id of ``[unused9]`` (None when absent)."""
        return self._id(TURN_START)

    @property
    def turn_end_id(self):
        """id of ``[unused10]`` (None when absent)."""
        return self._id(TURN_END)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self.special_pieces

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_bos: bool | None = None) -> list:
        """Token ids of `text`: special-token strings become their single ids, the text
        between them is encoded by SentencePiece; bos first when `add_bos` (default:
        add_bos_token), eos last when add_eos_token."""
        if add_bos is None:
            add_bos = self.add_bos_token
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        parts = self._split_re.split(text) if self._split_re is not None else [text]
        for k, part in enumerate(parts):
            if k % 2:  # a captured special-token string
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self.sp.encode(part, out_type=int))
        if self.add_eos_token and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`: each run of ordinary ids decoded by SentencePiece, each special id
        written as its piece text (dropped with `skip_special_tokens`)."""
        out, run = [], []
        for token in ids:
            token = int(token)
            if token in self.special_pieces:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.special_pieces[token])
            else:
                run.append(token)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def decode_piecewise(self, ids, skip_special_tokens: bool = False) -> list:
        """The text each id adds when the ids are streamed one at a time (``StreamDecoder``);
        the strings join to ``decode(ids)``. An id that completes no character gives ''."""
        stream = self.stream_decoder(skip_special_tokens)
        pieces = [stream.feed(token) for token in ids]
        tail = stream.flush()
        if tail:
            if pieces:
                pieces[-1] += tail
            else:
                pieces.append(tail)
        return pieces

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The chat prompt text of `messages` (see `chat_template`), without bos."""
        return chat_template(messages, add_generation_prompt)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list:
        """bos (per add_bos_token) + the ids of `apply_chat_template(messages)`."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        ids = self.encode(text, add_bos=False)
        if self.add_bos_token and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id})")


class StreamDecoder:
    """Incremental decoding: `feed` one id, get the text it completes.

    The concatenation of every `feed` result and a final `flush` equals
    ``tokenizer.decode(ids)``. Text is held back while the ids decoded so far end in an
    incomplete UTF-8 sequence (byte-fallback pieces such as ``<0xE4>``), and each step decodes
    a short window of ids, so SentencePiece's leading-space marker ``▁`` is rendered as
    decoding the whole sequence would.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._run = []       # ordinary ids since the last special id
        self._prefix = 0     # window start in _run
        self._read = 0       # ids of _run up to here have been emitted

    def feed(self, token_id: int) -> str:
        token_id = int(token_id)
        tok = self.tokenizer
        if token_id in tok.special_pieces:
            text = self.flush()
            return text + ("" if self.skip_special_tokens else tok.special_pieces[token_id])
        self._run.append(token_id)
        done = tok.sp.decode(self._run[self._prefix:self._read])
        now = tok.sp.decode(self._run[self._prefix:])
        if len(now) > len(done) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._run)
            return now[len(done):]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end), and a fresh start."""
        sp = self.tokenizer.sp
        text = ""
        if self._read < len(self._run):
            done = sp.decode(self._run[self._prefix:self._read])
            text = sp.decode(self._run[self._prefix:])[len(done):]
        self._run, self._prefix, self._read = [], 0, 0
        return text


def chat_template(messages, add_generation_prompt: bool = True) -> str:
    """The openPangu chat text of `messages` (dicts with "role" and "content"), no bos.

    Each message is ``[unused9]ROLE：CONTENT[unused10]``; an empty system turn comes first when
    the first message is not a system one; ``[unused9]助手：`` ends it when
    `add_generation_prompt`. An unknown role raises ChatTemplateError (a ValueError).
    """
    parts = []
    for k, message in enumerate(messages):
        try:
            role, content = message["role"], message["content"]
        except (TypeError, KeyError):
            raise ChatTemplateError(f"chat message {k}: expected a dict with 'role' and "
                                    f"'content', got {message!r}") from None
        if role not in ROLE_NAMES:
            raise ChatTemplateError(f"chat message {k}: unknown role {role!r} (expected one "
                                    f"of {', '.join(ROLE_NAMES)})")
        if k == 0 and role != "system":
            parts.append(f"{TURN_START}{ROLE_NAMES['system']}{ROLE_COLON}{TURN_END}")
        parts.append(f"{TURN_START}{ROLE_NAMES[role]}{ROLE_COLON}{content}{TURN_END}")
    if add_generation_prompt:
        parts.append(f"{TURN_START}{ROLE_NAMES['assistant']}{ROLE_COLON}")
    return "".join(parts)


__all__ = ["Tokenizer", "StreamDecoder", "TokenizerError", "ChatTemplateError", "chat_template",
           "ROLE_NAMES", "TURN_START", "TURN_END", "NAMED_SPECIALS"]
