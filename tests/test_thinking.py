"""Thinking modes and reasoning spans (DEPLOYMENT.md section 6): the mode suffixes, the
[unused16] ... [unused17] span split out of streamed text whatever the tokenizer, and the CLI."""

from __future__ import annotations

import io

import pytest

from refimpl.commands.run import _Printer
from refimpl.errors import InputError
from refimpl.io.checkpoint import DEFAULT_MODEL_DIR, load_model
from refimpl.thinking import (THINK_END, THINK_START, ThinkingSplitter, apply_think_mode, chat,
                              split_thinking)
from refimpl.tokenizer import Tokenizer

from .conftest import cli

REPLY = f"{THINK_START}The user greets me; answer briefly.{THINK_END}Hello! How can I help?"


def test_mode_suffixes_go_on_the_last_user_message():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert apply_think_mode(msgs, "slow")[-1]["content"] == "c"
    assert apply_think_mode(msgs, "fast")[-1]["content"] == "c /no_think"
    assert apply_think_mode(msgs, "auto")[-1]["content"] == "c /auto_think"
    assert apply_think_mode(msgs, "fast")[1]["content"] == "a" and msgs[-1]["content"] == "c"
    with pytest.raises(InputError, match="--think"):
        apply_think_mode(msgs, "medium")


def test_split_thinking_of_a_whole_reply():
    assert split_thinking(REPLY) == ("The user greets me; answer briefly.",
                                     "Hello! How can I help?")
    assert split_thinking("no reasoning here") == ("", "no reasoning here")
    assert split_thinking(f"{THINK_START}unfinished") == ("unfinished", "")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_the_splitter_holds_markers_split_across_chunks(chunk):
    s = ThinkingSplitter()
    parts = []
    for i in range(0, len(REPLY), chunk):
        parts += s.feed(REPLY[i:i + chunk])
    parts += s.flush()
    thinking = "".join(t for k, t in parts if k == "thinking")
    answer = "".join(t for k, t in parts if k == "answer")
    assert (thinking, answer) == split_thinking(REPLY)
    assert all(THINK_START not in t and THINK_END not in t for _, t in parts)
    # a bracket that is not a marker is answer text once it is decided
    s = ThinkingSplitter()
    assert s.feed("see [unu") == [("answer", "see ")]
    assert s.feed("sual] x") == [("answer", "[unusual] x")]


def _stream_through_printer(tok, text, hide):
    """Encode `text`, stream it id by id through the decoder and run's printer."""
    ids = tok.encode(text, add_bos=False)
    out = io.StringIO()
    printer = _Printer(out, hide)
    stream = tok.stream_decoder()
    for t in ids:
        printer.write(stream.feed(t))
    printer.write(stream.flush())
    printer.close()
    return ids, out.getvalue(), printer


def test_reasoning_is_recognised_with_the_default_tokenizer():
    """The default tokenizer has no [unused16] / [unused17] pieces: each marker is six
    ordinary pieces, recognised once decoded; under headers when not a terminal, or hidden."""
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    ids, shown, _ = _stream_through_printer(tok, REPLY, hide=False)
    assert THINK_START not in tok.special_ids and len(tok.encode(THINK_START, False)) == 6
    assert shown == ("[thinking]\nThe user greets me; answer briefly.\n[answer]\n"
                     "Hello! How can I help?")
    _, hidden, printer = _stream_through_printer(tok, REPLY, hide=True)
    assert hidden == "Hello! How can I help?"
    assert printer.hidden == len("The user greets me; answer briefly.")


def test_reasoning_is_recognised_when_the_markers_are_special_pieces(tmp_path):
    """A tokenizer with [unused16] / [unused17] as single pieces (as openPangu's, ids 45974
    and 45982): one id per marker, the same split."""
    import sentencepiece as spm
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the user greets me answer briefly", "hello how can i help"]
                                * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"),
                                   model_type="bpe", vocab_size=60, hard_vocab_limit=False,
                                   user_defined_symbols=[THINK_START, THINK_END,
                                                         "[unused10]"], minloglevel=2)
    tok = Tokenizer(str(tmp_path / "m.model"))
    assert THINK_START in tok.special_ids and THINK_END in tok.special_ids
    text = f"{THINK_START}the user greets me{THINK_END}hello"
    ids, shown, _ = _stream_through_printer(tok, text, hide=False)
    assert ids.count(tok.special_ids[THINK_START]) == 1
    assert shown.replace(" ", "") == "[thinking]\ntheusergreetsme\n[answer]\nhello"


def test_on_a_terminal_the_reasoning_is_dimmed():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    out = Tty()
    p = _Printer(out, hide=False)
    p.write(REPLY)
    p.close()
    assert out.getvalue() == ("\x1b[2mThe user greets me; answer briefly.\x1b[22m"
                              "Hello! How can I help?")


def test_chat_api_returns_thinking_and_answer_separately():
    model = load_model(DEFAULT_MODEL_DIR)
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    reply = chat(model, tok, [{"role": "user", "content": "What does the json module do?"}],
                 think="fast", max_new_tokens=24)
    assert reply.thinking == "" and reply.answer and not reply.has_thinking
    assert reply.answer == tok.decode([t for t in reply.token_ids if t != tok.eos_id])


def test_run_think_flags():
    fast = cli("run", "--chat", "--think", "fast", "--max-new-tokens", "4", "--print-ids")
    slow = cli("run", "--chat", "--max-new-tokens", "4", "--print-ids")
    assert fast.returncode == 0 and slow.returncode == 0, fast.stderr
    p = cli("run", "--think", "fast")
    assert p.returncode == 2 and "needs --chat" in p.stderr and "Traceback" not in p.stderr
    p = cli("run", "--chat", "--think", "medium")
    assert p.returncode == 2 and "invalid choice" in p.stderr
    h = cli("run", "--chat", "--hide-thinking", "--max-new-tokens", "8")
    assert h.returncode == 0, h.stderr


def test_run_puts_the_mode_on_the_user_turn():
    import argparse

    from refimpl.commands.run import prompt_ids
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    texts = {}
    for mode in ("slow", "fast", "auto", None):
        args = argparse.Namespace(token_ids=None, chat=True, prompt="hi", think=mode,
                                  model=DEFAULT_MODEL_DIR)
        ids, _ = prompt_ids(args, tok, None)
        texts[mode] = tok.decode(ids)
    assert "hi /no_think[unused10]" in texts["fast"]
    assert "hi /auto_think[unused10]" in texts["auto"]
    assert texts["slow"] == texts[None] and "hi[unused10]" in texts["slow"]
