"""Checkpoints: round trips, memory maps, the safetensors format, and every refusal."""

import json
import os
import struct

import numpy as np
import pytest

import refimpl
from refimpl.io import checkpoint
from refimpl.io.checkpoint import (INDEX_NAME, SINGLE_NAME, check_all_finite, init_checkpoint,
                                load_model, load_weights, save_checkpoint)
from refimpl.config import preset, weight_shapes
from refimpl.errors import CheckpointError
from refimpl.numerics import bfloat16, storage_dtype
from refimpl.random_init import random_weights
from refimpl.io.safetensors_io import (is_memory_mapped, read_header, read_safetensors,
                                    write_safetensors)

FAMILIES = ["tiny-dense", "tiny-moge"]
IDS = np.array([1, 17, 42, 99, 3, 200, 7])
SMALL_SHARD = 40_000  # bytes: several shards for the tiny presets


# ---------------------------------------------------------------------- helpers
def tensors_of(directory) -> dict:
    """Every tensor of a checkpoint as an in-memory array (copies, not maps)."""
    _, weights = load_weights(directory)
    return {name: np.array(w) for name, w in weights.items()}


def rewrite_single(directory, tensors: dict) -> None:
    """Replace a checkpoint's weights by `tensors`, as one model.safetensors."""
    for f in os.listdir(directory):
        if f.endswith(".safetensors") or f == INDEX_NAME:
            os.remove(os.path.join(directory, f))
    specs = {name: (a.shape, a.dtype) for name, a in tensors.items()}
    write_safetensors(os.path.join(directory, SINGLE_NAME), specs, tensors.__getitem__)


def edit_config(directory, **changes) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as fh:
        d = json.load(fh)
    d.update(changes)
    with open(path, "w") as fh:
        json.dump(d, fh)


def raw_safetensors(path, header, data: bytes, length=None) -> None:
    """A file with this header object (or raw header bytes) and data, written as is."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


@pytest.fixture
def ckpt(tmp_path):
    """A fresh single-file bf16 tiny-dense checkpoint (tests may damage it)."""
    d = tmp_path / "ckpt"
    init_checkpoint("tiny-dense", d, seed=1, dtype="bf16")
    return str(d)


@pytest.fixture
def sharded(tmp_path):
    d = tmp_path / "sharded"
    info = init_checkpoint("tiny-dense", d, seed=1, dtype="fp32", max_shard_bytes=SMALL_SHARD)
    assert len(info["files"]) > 2
    return str(d)


def refuses(fn, *fragments):
    with pytest.raises(CheckpointError) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("shard", [None, SMALL_SHARD])
def test_init_then_load_gives_the_in_memory_model(tmp_path, family, dtype, shard):
    d = tmp_path / "m"
    info = init_checkpoint(family, d, seed=5, dtype=dtype,
                           **({"max_shard_bytes": shard} if shard else {}))
    files = sorted(os.listdir(d))
    if shard:
        assert len(info["files"]) > 1 and INDEX_NAME in files and SINGLE_NAME not in files
    else:
        assert info["files"] == [SINGLE_NAME] and INDEX_NAME not in files
    model = load_model(d, numerics=dtype)
    reference = refimpl.init_model(family, seed=5, numerics=dtype)
    assert model.config == reference.config.replace(torch_dtype=model.config.torch_dtype)
    assert set(model.weights) == set(weight_shapes(model.config))
    np.testing.assert_array_equal(model.forward(IDS), reference.forward(IDS))


def test_tied_embeddings_have_no_lm_head(ckpt):
    config, weights = load_weights(ckpt)
    assert config.tie_word_embeddings and "lm_head.weight" not in weights


def test_fp16_and_fp32_checkpoints_load_in_any_mode(tmp_path):
    init_checkpoint("tiny-moge", tmp_path / "h", seed=2, dtype="fp16")
    model = load_model(tmp_path / "h", numerics="fp32")
    weights = random_weights(preset("tiny-moge"), 2, np.float16)
    ref = refimpl.Model(preset("tiny-moge"), weights, numerics="fp32")
    np.testing.assert_array_equal(model.forward(IDS), ref.forward(IDS))


def test_init_with_fewer_layers_keeps_the_width(tmp_path):
    init_checkpoint("tiny-moge", tmp_path / "l", seed=4, dtype="fp32", layers=1)
    model = load_model(tmp_path / "l")
    ref = refimpl.init_model("tiny-moge", seed=4, num_hidden_layers=1)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 64
    np.testing.assert_array_equal(model.forward(IDS), ref.forward(IDS))


def test_load_first_layers_of_a_checkpoint(sharded):
    model = load_model(sharded, layers=2)
    assert model.config.num_hidden_layers == 2
    assert set(model.weights) == set(weight_shapes(model.config))
    full = tensors_of(sharded)
    ref = refimpl.Model(model.config, {n: full[n] for n in model.weights})
    np.testing.assert_array_equal(model.forward(IDS), ref.forward(IDS))
    refuses(lambda: load_model(sharded, layers=4), "--layers 4", "3 layers")


def test_save_checkpoint_of_a_weight_dict_casts_and_shards(tmp_path):
    config = preset("tiny-moge")
    weights = random_weights(config, 9, np.float32)
    info = save_checkpoint(tmp_path / "s", config, weights, "bf16", max_shard_bytes=100_000)
    with open(tmp_path / "s" / INDEX_NAME) as fh:
        index = json.load(fh)
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == sum(
        w.size * 2 for w in weights.values()) == info["tensor_bytes"]
    assert set(index["weight_map"]) == set(weights)
    assert sorted(set(index["weight_map"].values())) == info["files"]
    for f in info["files"]:
        entries, start, size = read_header(tmp_path / "s" / f)
        assert size - start <= 100_000 or len(entries) == 1
        assert start % 8 == 0  # header padded as the reference writer does
    loaded = tensors_of(tmp_path / "s")
    for name, w in weights.items():
        assert loaded[name].dtype == bfloat16
        np.testing.assert_array_equal(loaded[name], w.astype(bfloat16))
    with open(tmp_path / "s" / "config.json") as fh:
        assert json.load(fh)["torch_dtype"] == "bfloat16"


def test_writing_generates_one_tensor_at_a_time(tmp_path):
    """save_checkpoint asks for each tensor once, in checkpoint order, and keeps none."""
    config = preset("tiny-dense")
    asked = []

    def produce(name):
        asked.append(name)
        return np.zeros(weight_shapes(config)[name], np.float32)

    save_checkpoint(tmp_path / "z", config, produce, "fp32")
    assert asked == list(weight_shapes(config))


# ---------------------------------------------------------------------- memory maps
def test_bf16_checkpoint_in_bf16_numerics_stays_memory_mapped(ckpt):
    _, weights = load_weights(ckpt)
    assert all(is_memory_mapped(w) and not w.flags.writeable for w in weights.values())
    model = load_model(ckpt, numerics="bf16")
    for name, w in model.weights.items():
        assert w.dtype == bfloat16 and is_memory_mapped(w), name
    model.forward(IDS)
    assert all(is_memory_mapped(w) for w in model.weights.values())


def test_other_numerics_convert_or_stay_mapped_when_lazy(ckpt):
    eager = load_model(ckpt, numerics="fp32")
    assert not any(is_memory_mapped(w) for w in eager.weights.values())
    lazy = load_model(ckpt, numerics="fp32", lazy=True)
    assert all(is_memory_mapped(w) for w in lazy.weights.values())
    np.testing.assert_array_equal(lazy.forward(IDS), eager.forward(IDS))


def test_is_memory_mapped_is_false_for_ordinary_arrays():
    assert not is_memory_mapped(np.zeros(3))
    assert not is_memory_mapped(np.zeros(3)[1:])


# ---------------------------------------------------------------------- the format itself
def test_files_read_by_the_reference_safetensors_library(tmp_path):
    import torch  # the test extra; missing means a broken install
    from safetensors.torch import load_file

    init_checkpoint("tiny-moge", tmp_path / "b", seed=3, dtype="bf16")
    ours = tensors_of(tmp_path / "b")
    theirs = load_file(str(tmp_path / "b" / SINGLE_NAME))
    assert set(theirs) == set(ours)
    for name, t in theirs.items():
        assert t.dtype == torch.bfloat16
        np.testing.assert_array_equal(t.float().numpy(), ours[name].astype(np.float32))


def test_reads_files_of_the_reference_safetensors_library(tmp_path):
    import torch  # the test extra; missing means a broken install
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
               "b": torch.randn(7, generator=g).to(torch.float16),
               "c": torch.randn(2, 2, 2, generator=g), "scalar": torch.tensor(1.5)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    ours = read_safetensors(tmp_path / "x.safetensors")
    assert {n: a.dtype for n, a in ours.items()} == {
        "a": bfloat16, "b": np.float16, "c": np.float32, "scalar": np.float32}
    for name, t in tensors.items():
        assert ours[name].shape == tuple(t.shape)
        np.testing.assert_array_equal(ours[name].astype(np.float32), t.float().numpy())


def test_empty_tensor_and_header_only_file(tmp_path):
    path = tmp_path / "e.safetensors"
    raw_safetensors(path, {"__metadata__": {"x": "y"},
                           "e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}}, b"")
    assert read_safetensors(path)["e"].shape == (0, 4)


# ---------------------------------------------------------------------- refusals: files
def test_refuses_missing_directory_and_config(tmp_path, ckpt):
    refuses(lambda: load_model(tmp_path / "nope"), "nope", "no such checkpoint directory")
    refuses(lambda: load_model(os.path.join(ckpt, SINGLE_NAME)), "not a directory")
    os.remove(os.path.join(ckpt, "config.json"))
    refuses(lambda: load_model(ckpt), "no config.json")


def test_refuses_invalid_config(ckpt):
    with open(os.path.join(ckpt, "config.json"), "w") as fh:
        fh.write("{not json")
    refuses(lambda: load_model(ckpt), "config.json", "not valid JSON")


def test_refuses_missing_weights_file(ckpt):
    os.remove(os.path.join(ckpt, SINGLE_NAME))
    refuses(lambda: load_model(ckpt), f"no {SINGLE_NAME} and no {INDEX_NAME}")


def test_refuses_missing_tensors_listing_them(ckpt):
    t = tensors_of(ckpt)
    del t["model.layers.1.mlp.up_proj.weight"], t["model.layers.2.self_attn.k_proj.bias"]
    rewrite_single(ckpt, t)
    refuses(lambda: load_model(ckpt), "missing tensors",
            "model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.k_proj.bias")


def test_refuses_unexpected_tensors(ckpt):
    t = tensors_of(ckpt)
    t["model.layers.0.mlp.extra.weight"] = np.zeros(3, bfloat16)
    rewrite_single(ckpt, t)
    refuses(lambda: load_model(ckpt), "unexpected tensors", "model.layers.0.mlp.extra.weight")


def test_refuses_wrong_shape_naming_tensor_expected_found(ckpt):
    t = tensors_of(ckpt)
    t["model.layers.1.self_attn.q_proj.bias"] = np.zeros(63, bfloat16)
    rewrite_single(ckpt, t)
    refuses(lambda: load_model(ckpt), "model.layers.1.self_attn.q_proj.bias", "[64]", "[63]")


def test_refuses_truncated_files(ckpt):
    path = os.path.join(ckpt, SINGLE_NAME)
    entries, start, size = read_header(path)
    os.truncate(path, size - 10)
    refuses(lambda: load_model(ckpt), "truncated file", f"has {size - 10} bytes")
    os.truncate(path, start - 5)
    refuses(lambda: load_model(ckpt), "truncated file", "header length", "runs past the end")
    os.truncate(path, 5)
    refuses(lambda: load_model(ckpt), "truncated file", "8-byte header length")


def test_refuses_a_data_offset_beyond_the_file(tmp_path):
    path = tmp_path / "f.safetensors"
    raw_safetensors(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    refuses(lambda: read_safetensors(path), "truncated file", "tensor a ends at byte")


@pytest.mark.parametrize("header, data, fragments", [
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]', b"\0" * 8,
     ("corrupt header", "not valid JSON")),
    (b"[1, 2]", b"", ("corrupt header", "JSON object")),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
     ("corrupt header", "tensor b", "overlap")),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16,
     ("corrupt header", "tensor a", "gap")),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8,
     ("corrupt header", "end before they begin")),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8,
     ("corrupt header", "unknown or unsupported dtype 'Q4'")),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8,
     ("corrupt header", "holds 8 bytes", "needs 12")),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8,
     ("corrupt header", "shape [-2]")),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8,
     ("corrupt header", "data_offsets [0]")),
    ({"__metadata__": [1], "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
     b"\0" * 8, ("corrupt header", "__metadata__")),
])
def test_refuses_corrupt_headers(tmp_path, header, data, fragments):
    path = tmp_path / "c.safetensors"
    raw_safetensors(path, header, data)
    refuses(lambda: read_safetensors(path), str(path), *fragments)


def test_refuses_bytes_after_the_last_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                    b"\0" * 11)
    refuses(lambda: read_safetensors(path), "corrupt file", "3 bytes after the last tensor")


def test_refuses_an_absurd_header_length(tmp_path):
    path = tmp_path / "h.safetensors"
    raw_safetensors(path, b"{}", b"", length=2**62)
    refuses(lambda: read_safetensors(path), "corrupt header", "over the")


def test_refuses_a_corrupt_header_inside_a_checkpoint(ckpt):
    path = os.path.join(ckpt, SINGLE_NAME)
    with open(path, "r+b") as fh:
        fh.seek(8)
        fh.write(b"!")  # the header's opening brace
    refuses(lambda: load_model(ckpt), SINGLE_NAME, "not valid JSON")


# ---------------------------------------------------------------------- refusals: shards
def test_refuses_an_index_naming_a_missing_shard(sharded):
    with open(os.path.join(sharded, INDEX_NAME)) as fh:
        shard = sorted(set(json.load(fh)["weight_map"].values()))[1]
    os.remove(os.path.join(sharded, shard))
    refuses(lambda: load_model(sharded), INDEX_NAME, f"names shard {shard}", "missing")


def test_refuses_an_index_that_disagrees_with_the_shards(sharded):
    path = os.path.join(sharded, INDEX_NAME)
    with open(path) as fh:
        index = json.load(fh)
    files = sorted(set(index["weight_map"].values()))
    moved = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][moved] = files[1]
    with open(path, "w") as fh:
        json.dump(index, fh)
    refuses(lambda: load_model(sharded), f"places {moved} in {files[1]}", "does not hold it")


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/abs.safetensors", ""])
def test_refuses_an_index_pointing_outside_the_directory(sharded, bad):
    path = os.path.join(sharded, INDEX_NAME)
    with open(path) as fh:
        index = json.load(fh)
    index["weight_map"]["model.norm.weight"] = bad
    with open(path, "w") as fh:
        json.dump(index, fh)
    refuses(lambda: load_model(sharded), "model.norm.weight", "not a file name")


def test_refuses_an_index_without_weight_map(sharded):
    with open(os.path.join(sharded, INDEX_NAME), "w") as fh:
        json.dump({"metadata": {}}, fh)
    refuses(lambda: load_model(sharded), "weight_map")


def test_refuses_a_shard_holding_a_tensor_the_index_does_not_list(sharded):
    path = os.path.join(sharded, INDEX_NAME)
    with open(path) as fh:
        index = json.load(fh)
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    t = read_safetensors(os.path.join(sharded, files[0]))[name]
    # add a copy of the tensor to a second shard (and list it there too)
    second = os.path.join(sharded, files[1])
    extra = {k: np.array(v) for k, v in read_safetensors(second).items()}
    extra[name] = np.array(t)
    write_safetensors(second, {k: (v.shape, v.dtype) for k, v in extra.items()}, extra.get)
    refuses(lambda: load_model(sharded), files[1], name, "does not list")


# ---------------------------------------------------------------------- refusals: config
@pytest.mark.parametrize("family, changes, fragments", [
    ("tiny-dense", {"hidden_size": 128}, ("'hidden_size' is 128", "[257, 64]")),
    ("tiny-dense", {"vocab_size": 300}, ("'vocab_size' is 300", "257 rows")),
    ("tiny-dense", {"num_hidden_layers": 2}, ("'num_hidden_layers' is 2", "layers 0..2")),
    ("tiny-dense", {"num_hidden_layers": 4}, ("'num_hidden_layers' is 4", "layers 0..2")),
    ("tiny-dense", {"tie_word_embeddings": False}, ("'tie_word_embeddings' is false",
                                                    "no lm_head.weight")),
    ("tiny-moge", {"tie_word_embeddings": True}, ("'tie_word_embeddings' is true",)),
    ("tiny-dense", {"num_key_value_heads": 1}, ("'num_key_value_heads' x 'head_dim'",
                                                "1 x 16 = 16", "32 rows")),
    ("tiny-dense", {"head_dim": 8}, ("'num_attention_heads' x 'head_dim'", "4 x 8 = 32")),
    ("tiny-dense", {"intermediate_size": 100}, ("'intermediate_size' is 100", "160 rows")),
    ("tiny-dense", {"bias": False}, ("'bias' is false", "has model.layers.0.self_attn")),
    ("tiny-moge", {"num_experts": 6}, ("'num_experts' is 6", "experts 0..11")),
    ("tiny-moge", {"moe_intermediate_size": 16}, ("'moe_intermediate_size' is 16",)),
    ("tiny-moge", {"shared_expert_intermediate_size": 32},
     ("'shared_expert_intermediate_size' is 32",)),
    ("tiny-moge", {"model_type": "PanguEmbedded", "architectures": [],
                   "intermediate_size": 160}, ("'model_type'", "MoGE experts")),
    ("tiny-dense", {"model_type": "PanguProMoE", "architectures": [], "num_experts": 4,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                    "shared_expert_intermediate_size": 8}, ("'model_type'", "no experts")),
])
def test_refuses_config_disagreeing_with_weights(tmp_path, family, changes, fragments):
    init_checkpoint(family, tmp_path / "c", seed=0, dtype="bf16")
    edit_config(tmp_path / "c", **changes)
    refuses(lambda: load_model(tmp_path / "c"), "config.json disagrees with the weights",
            *fragments)


def test_refuses_an_invalid_config_field(ckpt):
    edit_config(ckpt, num_attention_heads=3)
    refuses(lambda: load_model(ckpt), "config.json", "num_key_value_heads")


# ---------------------------------------------------------------------- refusals: values
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_refuses_nonfinite_weights_unless_allowed(ckpt, bad):
    t = tensors_of(ckpt)
    t["model.layers.2.mlp.down_proj.weight"][5, 7] = bad
    rewrite_single(ckpt, t)
    refuses(lambda: load_model(ckpt), "model.layers.2.mlp.down_proj.weight", "NaN or Inf",
            "allow_nonfinite")
    model = load_model(ckpt, allow_nonfinite=True)
    assert not np.isfinite(model.weights["model.layers.2.mlp.down_proj.weight"][5, 7])


def test_finite_check_reaches_past_the_first_block():
    w = np.zeros(1000, bfloat16)
    w[999] = np.nan
    check_all_finite({"ok": np.zeros(10, bfloat16)}, chunk=64)
    refuses(lambda: check_all_finite({"w": w}, chunk=64), "tensor w")


# ---------------------------------------------------------------------- writing safely
def test_save_refuses_an_existing_directory_but_fills_an_empty_one(tmp_path, ckpt):
    config = preset("tiny-dense")
    refuses(lambda: init_checkpoint("tiny-dense", ckpt), "already exists")
    (tmp_path / "empty").mkdir()
    init_checkpoint("tiny-dense", tmp_path / "empty", dtype="fp32")
    assert load_model(tmp_path / "empty").config == config.replace(torch_dtype="float32")
    refuses(lambda: init_checkpoint("tiny-dense", tmp_path / "no" / "such"), "no such directory")


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    config = preset("tiny-moge")
    calls = []

    def produce(name):
        calls.append(name)
        if len(calls) == 40:
            raise RuntimeError("disk on fire")
        return np.zeros(weight_shapes(config)[name], np.float32)

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "out", config, produce, "fp32", max_shard_bytes=50_000)
    assert os.listdir(tmp_path) == []


def test_save_refuses_wrong_weights(tmp_path):
    config = preset("tiny-dense")
    weights = random_weights(config, 0)
    weights["model.norm.weight"] = np.zeros(3, np.float32)
    refuses(lambda: save_checkpoint(tmp_path / "w", config, weights, "fp32"),
            "model.norm.weight", "[64]", "[3]")
    refuses(lambda: save_checkpoint(tmp_path / "w", config, lambda n: np.zeros(2, np.float32),
                                    "fp32"), "expected shape")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece model of 30 pieces trained here."""
    import sentencepiece
    d = tmp_path_factory.mktemp("sp")
    text = d / "text.txt"
    words = ["alpha", "beta", "gamma", "delta", "model", "spec", "numpy", "kernel", "token"]
    rng = np.random.default_rng(0)
    text.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(300)))
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(d / "tokenizer"),
                                             vocab_size=30, model_type="unigram",
                                             minloglevel=2)
    return d / "tokenizer.model"


def test_init_copies_a_tokenizer_that_fits(tmp_path, sp_model):
    info = init_checkpoint("tiny-dense", tmp_path / "t", tokenizer=sp_model)
    assert info["tokenizer"] == ["tokenizer.model"]
    assert (tmp_path / "t" / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    config = preset("tiny-dense").replace(vocab_size=20)
    refuses(lambda: save_checkpoint(tmp_path / "u", config, random_weights(config, 0), "fp32",
                                    tokenizer=sp_model), "30 pieces", "vocab_size is 20")
    refuses(lambda: init_checkpoint("tiny-dense", tmp_path / "v", tokenizer=tmp_path / "none"),
            "no such tokenizer file")
    assert sorted(os.listdir(tmp_path)) == ["t"]


def test_model_config_of_dir_and_preset(ckpt):
    assert checkpoint.model_config(ckpt).num_hidden_layers == 3
    assert checkpoint.model_config("pro-moe-72b", 2).num_hidden_layers == 2
    refuses(lambda: checkpoint.model_config("no-such-model"), "neither a checkpoint directory")
    assert storage_dtype("bf16") == bfloat16
