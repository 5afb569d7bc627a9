"""The tokenizer: special tokens by piece string, bos/eos options, chat template, streaming.

Uses the shipped default tokenizer (refimpl/data/default/tokenizer.model) and, for CONTROL
special pieces, a throwaway SentencePiece model trained in a temporary directory.
"""

import json
import os
import shutil
import struct

import pytest

from refimpl.errors import RefimplError
from refimpl.tokenizer import StreamDecoder, Tokenizer

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "refimpl", "data", "default")
MODEL = os.path.join(DEFAULT_DIR, "tokenizer.model")

TEXTS = [
    "Return the number of items in a container.",
    "def f(x):\n    return x * 2\n\n>>> f(21)\n42",
    "你好，世界！我是一个很小的语言模型。",
    "Mixed 中文 and English: 系统、用户、助手：done.",
    "rare characters fall back to bytes: 鱼 🙂 ∑ ü",
    "  leading spaces, double  spaces and a trailing space ",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(DEFAULT_DIR)


# ---------------------------------------------------------------------- ids and round trips
def test_special_ids_are_found_by_piece(tok):
    sp = tok.sp
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.bos_id == sp.piece_to_id("<s>") == 1
    assert sp.id_to_piece(0) == "<unk>" and tok.pad_id == 0
    assert tok.turn_start_id == sp.piece_to_id("[unused9]")
    assert tok.turn_end_id == sp.piece_to_id("[unused10]")
    assert tok.eos_id == tok.turn_end_id
    for piece in ["<|User|>:", "<|Bot|>:"] + [f"[unused{i}]" for i in range(11)]:
        assert piece in tok.special_ids
        assert sp.id_to_piece(tok.special_ids[piece]) == piece


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids[1:]) == text
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == "<s>" + text


def test_common_text_uses_few_tokens(tok):
    ids = tok.encode("Return the number of items.", add_bos=False)
    assert len(ids) <= 8
    assert all(not tok.id_to_piece(i).startswith("<0x") for i in ids)


def test_special_tokens_in_text_are_single_ids(tok):
    text = "[unused9]用户：hello[unused10][unused9]助手：<|User|>:x<|Bot|>:[unused1]"
    ids = tok.encode(text, add_bos=False)
    s = tok.special_ids
    assert ids[0] == tok.turn_start_id
    assert ids.count(tok.turn_end_id) == 1 and ids.count(tok.turn_start_id) == 2
    for piece in ["<|User|>:", "<|Bot|>:", "[unused1]"]:
        assert ids.count(s[piece]) == 1
    assert ids[-1] == s["[unused1]"]
    # longest match first: [unused10] is not [unused1] followed by "0]"
    assert tok.encode("[unused10]", add_bos=False) == [tok.turn_end_id]
    assert tok.decode(ids) == text


def test_bos_and_eos_options():
    plain = Tokenizer(MODEL)
    assert plain.add_bos_token and not plain.add_eos_token
    assert plain.encode("hi")[0] == plain.bos_id
    assert plain.encode("hi", add_bos=False)[0] != plain.bos_id
    no_bos = Tokenizer(MODEL, add_bos_token=False)
    assert no_bos.encode("hi") == plain.encode("hi")[1:]
    assert no_bos.encode("hi", add_bos=True) == plain.encode("hi")
    with_eos = Tokenizer(MODEL, add_eos_token=True)
    assert with_eos.encode("hi") == plain.encode("hi") + [plain.eos_id]


def test_from_dir_reads_tokenizer_config(tmp_path):
    shutil.copy(MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": False, "add_eos_token": True}))
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.add_bos_token and tok.add_eos_token
    ids = tok.encode("hi")
    assert ids[0] != tok.bos_id and ids[-1] == tok.eos_id
    assert not Tokenizer.from_dir(tmp_path / "tokenizer.model").add_bos_token  # a file path
    # no config: the defaults (bos on, eos off)
    os.remove(tmp_path / "tokenizer_config.json")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.add_bos_token and not tok.add_eos_token


def test_shipped_tokenizer_config(tok):
    assert tok.add_bos_token is True and tok.add_eos_token is False


# ---------------------------------------------------------------------- chat template
SYS0 = "[unused9]系统：[unused10]"
GEN = "[unused9]助手："


def test_chat_user_only_gets_empty_system_turn(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == SYS0 + "[unused9]用户：Hi[unused10]" + GEN
    assert text == ("[unused9]\u7cfb\u7edf\uff1a[unused10][unused9]\u7528\u6237\uff1aHi"
                    "[unused10][unused9]\u52a9\u624b\uff1a")


def test_chat_system_and_user(tok):
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What is json?"}])
    assert text == ("[unused9]系统：Be brief.[unused10][unused9]用户：What is json?[unused10]"
                    "[unused9]助手：")


def test_chat_multi_turn_all_roles(tok):
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "function", "content": "f()"},
                {"role": "tool", "content": "42"},
                {"role": "user", "content": "谢谢"}]
    assert tok.apply_chat_template(messages) == (
        "[unused9]系统：[unused10][unused9]用户：Hi[unused10][unused9]助手：Hello![unused10]"
        "[unused9]方法：f()[unused10][unused9]工具：42[unused10][unused9]用户：谢谢[unused10]"
        "[unused9]助手：")


def test_chat_without_generation_prompt(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "[unused9]系统：[unused10][unused9]用户：Hi[unused10][unused9]助手：Hello![unused10]")


def test_unknown_role_raises(tok):
    with pytest.raises(ValueError, match="'robot'") as info:
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    assert isinstance(info.value, RefimplError)
    with pytest.raises(ValueError, match="'robot'"):
        tok.encode_chat([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])


def test_encode_chat(tok):
    messages = [{"role": "user", "content": "What does the json module do?"}]
    ids = tok.encode_chat(messages)
    text = tok.apply_chat_template(messages)
    assert ids == [tok.bos_id] + tok.encode(text, add_bos=False)
    assert ids.count(tok.bos_id) == 1
    assert ids[1] == tok.turn_start_id and ids.count(tok.turn_end_id) == 2
    assert ids[-3:] == [tok.turn_start_id] + tok.encode("助手：", add_bos=False)
    assert tok.decode(ids, skip_special_tokens=True) == "系统：用户：What does the json module do?助手："
    no_bos = Tokenizer(MODEL, add_bos_token=False)
    assert no_bos.encode_chat(messages) == ids[1:]


# ---------------------------------------------------------------------- streaming
STREAM_TEXTS = TEXTS + ["[unused9]用户：鱼🙂 fish[unused10][unused9]助手：  ok ∑\n[unused10]"]


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder_matches_decode(tok, text, skip):
    ids = tok.encode(text)
    stream = StreamDecoder(tok, skip_special_tokens=skip)
    parts = [stream.feed(i) for i in ids]
    assert "".join(parts) + stream.flush() == tok.decode(ids, skip_special_tokens=skip)
    assert "".join(tok.decode_piecewise(ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_is_incremental(tok):
    ids = tok.encode("Return the number of items", add_bos=False)
    stream = tok.stream_decoder()
    parts = [stream.feed(i) for i in ids]
    assert all(parts), parts           # every id adds text as soon as it arrives
    assert parts[1].startswith(" ")    # the leading-space marker becomes a space
    assert stream.flush() == ""


def test_stream_decoder_holds_incomplete_bytes(tok):
    ids = tok.encode("🙂", add_bos=False)
    assert len(ids) == 4 and all(tok.id_to_piece(i).startswith("<0x") for i in ids)
    stream = tok.stream_decoder()
    assert [stream.feed(i) for i in ids] == ["", "", "", "🙂"]
    stream.feed(ids[0])
    assert stream.flush() == tok.decode(ids[:1])  # a dangling byte comes out at the end


# ---------------------------------------------------------------------- errors
def test_missing_tokenizer_model(tmp_path):
    with pytest.raises(RefimplError, match="tokenizer.model") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value)
    missing = str(tmp_path / "nope.model")
    with pytest.raises(RefimplError, match="nope.model"):
        Tokenizer(missing)


def test_corrupt_tokenizer_model(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(RefimplError, match=str(bad).replace("\\", "\\\\")):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------- control pieces
def test_control_special_pieces_still_map_to_single_ids(tmp_path):
    import sentencepiece as spm
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the user asks and the bot answers", "hello world",
                                 "what does the json module do?"] * 50))
    specials = ["<|User|>:", "<|Bot|>:", "[unused9]", "[unused10]"]
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"),
                                   model_type="bpe", vocab_size=60, hard_vocab_limit=False,
                                   control_symbols=specials, minloglevel=2)
    model = str(tmp_path / "m.model")
    tok = Tokenizer(model)
    for piece in specials:
        assert tok.sp.is_control(tok.special_ids[piece])
    # SentencePiece alone does not match control pieces in text ...
    assert len(tok.sp.encode("[unused9]")) > 1
    # ... the Tokenizer does
    text = "[unused9]hello world[unused10]<|User|>:the json<|Bot|>:"
    ids = tok.encode(text, add_bos=False)
    assert ids[0] == tok.turn_start_id and ids.count(tok.turn_end_id) == 1
    assert tok.special_ids["<|User|>:"] in ids and ids[-1] == tok.special_ids["<|Bot|>:"]
    assert tok.eos_id == tok.turn_end_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "helloworldthejson"
    ids = tok.encode_chat([{"role": "user", "content": "hello"}])
    assert ids[:2] == [tok.bos_id, tok.turn_start_id]


def test_eos_falls_back_to_end_of_sentence(tmp_path):
    import sentencepiece as spm
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["hello world", "the json module"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"),
                                   model_type="bpe", vocab_size=40, hard_vocab_limit=False,
                                   minloglevel=2)
    tok = Tokenizer(str(tmp_path / "m.model"))
    assert tok.turn_end_id is None and tok.turn_start_id is None
    assert tok.eos_id == tok.sp.piece_to_id("</s>") == 2
    assert tok.decode(tok.encode("hello world")) == "<s>hello world"


# ---------------------------------------------------------------------- shipped model files
def test_default_model_files_agree_with_the_tokenizer(tok):
    with open(os.path.join(DEFAULT_DIR, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    assert config["model_type"] == "PanguEmbedded"
    assert config["architectures"] == ["PanguEmbeddedForCausalLM"]
    assert config["vocab_size"] == tok.vocab_size
    assert config["eos_token_id"] == tok.eos_id
    assert config["bos_token_id"] == tok.bos_id == 1 and config["pad_token_id"] == 0
    assert config["tie_word_embeddings"] is True and config["bias"] is True
    with open(os.path.join(DEFAULT_DIR, "generation_config.json"), encoding="utf-8") as fh:
        gen = json.load(fh)
    assert gen["eos_token_id"] == tok.eos_id and gen["bos_token_id"] == tok.bos_id
    with open(os.path.join(DEFAULT_DIR, "model.safetensors"), "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    assert "lm_head.weight" not in header
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    assert header["model.embed_tokens.weight"]["shape"] == [tok.vocab_size,
                                                            config["hidden_size"]]
    size = sum(os.path.getsize(os.path.join(DEFAULT_DIR, f)) for f in os.listdir(DEFAULT_DIR))
    assert size < 8.5 * 2**20
