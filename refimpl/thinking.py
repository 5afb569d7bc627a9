"""openPangu's thinking modes and reasoning spans (DEPLOYMENT.md section 6).

Modes, switched by a suffix on the user's message (the chat template is unchanged):

    slow   no suffix: think before answering (openPangu-Embedded-7B V1.1's default)
    fast   " /no_think": answer directly (the 1B model is a fast-thinking model)
    auto   " /auto_think": the model decides

The reasoning span runs from `[unused16]` (id 45974 in the openPangu vocabulary) to
`[unused17]` (45982); the answer follows, to the turn end `[unused10]` (45892). Pro MoE's
output starts with `[unused16]`.

Recognition works on the decoded text, so it does not depend on the tokenizer: in the
openPangu tokenizer each marker is one special piece (decoded as its text); the embedded
default tokenizer has only `[unused0]`..`[unused10]` as special pieces, so there a marker is
six ordinary pieces (`[`, `un`, `used`, `1`, `6`, `]`), which decode to the same text, and a
marker can arrive split across several streamed tokens. `ThinkingSplitter` holds back a
possible marker prefix until it is decided.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

THINK_START = "[unused16]"
THINK_END = "[unused17]"
#: --think MODE -> the suffix appended to the last user message
THINK_SUFFIXES = {"slow": "", "fast": " /no_think", "auto": " /auto_think"}


def apply_think_mode(messages: list, mode: str) -> list:
    """The messages with the mode's suffix on the last user message (a copy)."""
    if mode not in THINK_SUFFIXES:
        raise InputError(f"--think must be one of {', '.join(THINK_SUFFIXES)}, got {mode!r}")
    out = [dict(m) for m in messages]
    users = [i for i, m in enumerate(out) if m.get("role") == "user"]
    if not users:
        raise InputError("--think needs a user message to put the mode on")
    out[users[-1]]["content"] = out[users[-1]]["content"] + THINK_SUFFIXES[mode]
    return out


class ThinkingSplitter:
    """Streamed text in, (kind, text) segments out, kind 'thinking' or 'answer'.

    Text before `[unused16]` and after `[unused17]` is answer; between them, thinking (the
    markers themselves are dropped). `feed` returns the segments the new text completes;
    text that could be the start of a marker is held until the next `feed` or `flush`."""

    def __init__(self):
        self.inside = False
        self.seen_thinking = False
        self._held = ""

    def feed(self, text: str) -> list:
        out = []
        buf = self._held + text
        self._held = ""
        while buf:
            marker = THINK_END if self.inside else THINK_START
            at = buf.find(marker)
            if at >= 0:
                if at:
                    out.append(("thinking" if self.inside else "answer", buf[:at]))
                buf = buf[at + len(marker):]
                self.inside = not self.inside
                self.seen_thinking = True
                continue
            keep = _prefix_overlap(buf, marker)          # a marker may be starting
            if len(buf) > keep:
                out.append(("thinking" if self.inside else "answer", buf[:len(buf) - keep]))
            self._held = buf[len(buf) - keep:]
            break
        return _merge(out)

    def flush(self) -> list:
        held, self._held = self._held, ""
        return [("thinking" if self.inside else "answer", held)] if held else []


def _prefix_overlap(text: str, marker: str) -> int:
    """The length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _merge(segments: list) -> list:
    out = []
    for kind, text in segments:
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        elif text:
            out.append((kind, text))
    return out


@dataclass
class Reply:
    """A chat reply split into its reasoning and its answer."""
    thinking: str
    answer: str
    token_ids: list

    @property
    def has_thinking(self) -> bool:
        return bool(self.thinking)


def split_thinking(text: str) -> tuple:
    """(thinking, answer) of a whole reply."""
    s = ThinkingSplitter()
    parts = s.feed(text) + s.flush()
    return ("".join(t for k, t in parts if k == "thinking"),
            "".join(t for k, t in parts if k == "answer"))


def chat(model, tokenizer, messages: list, think: str = "slow", max_new_tokens: int = 256,
         **generate_kwargs) -> Reply:
    """Generate the assistant's reply to `messages` in thinking mode `think` and return it
    split: `Reply(thinking, answer, token_ids)` (the turn end not included in the text)."""
    from .generate import generate

    ids = tokenizer.encode_chat(apply_think_mode(messages, think))
    eos = {tokenizer.eos_id}
    new = [int(t) for t in generate(model, ids, max_new_tokens, eos_id=eos, **generate_kwargs)]
    text = tokenizer.decode([t for t in new if t not in eos])
    thinking, answer = split_thinking(text)
    return Reply(thinking, answer, new)


__all__ = ["THINK_START", "THINK_END", "THINK_SUFFIXES", "apply_think_mode", "ThinkingSplitter",
           "split_thinking", "chat", "Reply"]
