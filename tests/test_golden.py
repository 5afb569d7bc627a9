"""Golden generation and format: shapes, spec outputs, float64 references, manifests, exports,
atomic writes, model/layer cases, bit-identical regeneration (1 and 2 threads, subprocesses)
and the committed suite."""

import hashlib
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import refimpl
from refimpl.golden import format as gf
from refimpl import ops
from refimpl.config import preset
from refimpl.golden import MOGE_OPERATORS, OPERATORS, model_cases, operator_cases
from refimpl.golden.format import load_case, write_case
from refimpl.golden.quant_cases import QUANT_OPERATORS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "golden")
BF16 = np.dtype(ml_dtypes.bfloat16)


def cli(*args, env=None, timeout=300):
    base = {k: v for k, v in os.environ.items() if k != "REFIMPL_DEBUG"}
    return subprocess.run([sys.executable, "-m", "refimpl", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})})


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tree_digest(path) -> dict:
    """relative file path -> sha256 of its bytes, for every file under path."""
    out = {}
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def moge_bf16(tmp_path_factory):
    """Every operator case of tiny-moge in bf16, written and read back."""
    out = tmp_path_factory.mktemp("golden")
    for case in operator_cases("tiny-moge", OPERATORS, "bf16", seed=3, tokens=8):
        write_case(str(out), case)
    return {rel: load_case(os.path.join(out, rel)) for rel in gf.find_cases(str(out))}


# ---------------------------------------------------------------------- operator cases
def test_operator_cases_have_the_preset_shapes(moge_bf16):
    c = preset("tiny-moge")
    H, D, Hq, Hkv, E, G = (c.hidden_size, c.head_dim, c.num_attention_heads,
                           c.num_key_value_heads, c.num_experts, c.num_groups)
    I = c.moe_intermediate_size
    names = sorted(moge_bf16)
    assert names == sorted(f"tiny-moge-{n}-bf16" for n in (
        "rms-norm", "rope", "rope-long", "attention-prefill", "attention-decode", "swiglu",
        "moge-route", "moe", "attention-varlen-prefill", "attention-varlen-chunked",
        "paged-attention", "reshape-and-cache", "add-rms-norm", "rope-cache-f32-table",
        "rope-cache-storage-table", "qkv-proj", "swiglu-w13", "moe-dispatch-v1",
        "moe-dispatch-v2", "grouped-matmul", "moe-combine-v1",
        "moe-combine-v2", "moe-ep-rank0", "moe-ep-rank1", "moe-ep-rank2", "moe-ep-combine",
        "quant-matmul-q-proj", "quant-matmul-down-proj", "dynamic-quant-matmul-q-proj",
        "dynamic-quant-matmul-down-proj", "quant-grouped-matmul", "dequant-swiglu-quant",
        "rejection-sample-sampled", "rejection-sample-ngram", "rejection-sample-greedy"))
    t = {n: case.tensors for n, case in moge_bf16.items()}
    q = t["tiny-moge-quant-matmul-q-proj-bf16"]
    assert q["weight"].shape == (Hq * D, H) and q["weight"].dtype == np.int8
    assert q["x_q"].dtype == np.int8 and q["acc"].dtype == np.int32
    assert q["quant_bias"].dtype == np.int32 and q["deq_scale"].dtype == np.float32
    assert t["tiny-moge-dynamic-quant-matmul-q-proj-bf16"]["token_scale"].shape == (8,)
    gq = t["tiny-moge-quant-grouped-matmul-bf16"]
    assert gq["weights"].shape == (E, 2 * I, H) and gq["weights"].dtype == np.int8
    assert t["tiny-moge-dequant-swiglu-quant-bf16"]["h_q"].shape == (8 * G, I)
    assert t["tiny-moge-rms-norm-bf16"]["x"].shape == (8, H)
    assert t["tiny-moge-rope-bf16"]["q"].shape == (8, Hq, D)
    assert t["tiny-moge-rope-bf16"]["k_rope"].shape == (8, Hkv, D)
    assert t["tiny-moge-attention-prefill-bf16"]["q"].shape == (8, Hq, D)
    assert t["tiny-moge-attention-decode-bf16"]["q"].shape == (1, Hq, D)
    assert t["tiny-moge-attention-decode-bf16"]["k"].shape == (8, Hkv, D)
    assert t["tiny-moge-swiglu-bf16"]["gate_proj.weight"].shape == (I, H)
    assert t["tiny-moge-moge-route-bf16"]["expert_ids"].shape == (8, G)
    assert t["tiny-moge-moge-route-bf16"]["expert_ids"].dtype == np.int64
    assert t["tiny-moge-moe-bf16"]["experts.down_proj.weight"].shape == (E, H, I)
    assert t["tiny-moge-moe-bf16"]["shared_expert.gate_proj.weight"].shape == (
        c.shared_expert_intermediate_size, H)
    assert t["tiny-moge-add-rms-norm-bf16"]["rstd"].shape == (8, 1)
    assert t["tiny-moge-add-rms-norm-bf16"]["rstd"].dtype == np.float32
    assert t["tiny-moge-rope-cache-f32-table-bf16"]["cos_sin_cache"].dtype == np.float32
    assert t["tiny-moge-rope-cache-storage-table-bf16"]["cos_sin_cache"].shape == (8, D)
    assert t["tiny-moge-qkv-proj-bf16"]["qkv"].shape == (8, (Hq + 2 * Hkv) * D)
    assert t["tiny-moge-swiglu-w13-bf16"]["w13"].shape == (2 * I, H)
    for case in moge_bf16.values():
        for e in case.entries():
            a = case.tensors[e["name"]]
            if e["role"] == "reference" and e["name"].endswith((".near_tie", ".margin",
                                                                 ".prob_margin")):
                assert e["name"].rsplit(".", 1)[0] == "expert_ids"   # routing diagnostics
                assert a.dtype == (np.int64 if e["name"].endswith("tie") else np.float64)
            elif e["role"] == "reference":
                assert e["name"].endswith(".ref64")
                assert e["name"][:-len(".ref64")] in case.tensors
                base = case.tensors[e["name"][:-len(".ref64")]]
                assert a.dtype == (np.float64 if base.dtype.kind != "i" else np.int64)
            elif a.dtype.kind == "f" or a.dtype == BF16:
                quant_scale = (case.manifest["operator"] in QUANT_OPERATORS
                               and e["name"].endswith("scale"))
                if quant_scale:      # the format's scales: float32 or the model dtype
                    assert a.dtype in (np.float32, BF16), e["name"]
                elif case.manifest["operator"] == "rejection_sample":
                    assert a.dtype == np.float32, e["name"]     # probabilities, as vLLM
                elif e["name"] not in ("expert_weights", "rstd", "cos_sin_cache", "scales"):
                    # expert_weights, rstd, combine scales: the accumulation dtype; the f32 table
                    assert a.dtype == BF16, e["name"]


def test_outputs_are_the_spec_and_references_are_float64_spec(moge_bf16):
    t = moge_bf16["tiny-moge-attention-prefill-bf16"].tensors
    np.testing.assert_array_equal(ops.attention(t["q"], t["k"], t["v"]), t["o"])
    np.testing.assert_array_equal(
        ops.attention(*(t[n].astype(np.float64) for n in "qkv")), t["o.ref64"])
    t = moge_bf16["tiny-moge-rope-long-bf16"].tensors
    np.testing.assert_array_equal(ops.apply_rope(t["q"], t["cos"], t["sin"]), t["q_rope"])
    c = preset("tiny-moge")
    assert t["positions"][-1] == c.max_position_embeddings - 1
    cos, _ = ops.rope_tables(t["positions"], c.head_dim, c.rope_theta)
    np.testing.assert_array_equal(cos.astype(np.float32).astype(BF16), t["cos"])
    t = moge_bf16["tiny-moge-rms-norm-bf16"].tensors
    np.testing.assert_array_equal(ops.rms_norm(t["x"], t["weight"], c.rms_norm_eps), t["y"])
    t = moge_bf16["tiny-moge-moge-route-bf16"].tensors
    ids, w = ops.moge_route(t["router_logits"], t["router_scale"], c.num_groups)
    np.testing.assert_array_equal(ids, t["expert_ids"])
    np.testing.assert_array_equal(w, t["expert_weights"])
    t = moge_bf16["tiny-moge-moe-bf16"].tensors
    experts = [tuple(t[f"experts.{p}_proj.weight"][e] for p in ("gate", "up", "down"))
               for e in range(c.num_experts)]
    shared = [t[f"shared_expert.{p}_proj.weight"] for p in ("gate", "up", "down")]
    y = ops.moe_block(t["x"], t["gate.weight"], t["router_scale"], experts, shared,
                      c.num_groups)
    np.testing.assert_array_equal(y, t["y"])


def test_weights_are_those_of_init_model(moge_bf16):
    model = refimpl.init_model("tiny-moge", seed=3, numerics="bf16")
    t = moge_bf16["tiny-moge-moe-bf16"].tensors
    np.testing.assert_array_equal(t["gate.weight"], model.w("model.layers.0.mlp.gate.weight"))
    np.testing.assert_array_equal(t["experts.up_proj.weight"][5],
                                  model.w("model.layers.0.mlp.experts.5.up_proj.weight"))


def test_attention_scores_carry_an_offset_that_overflows_naive_float16_exp():
    (case,) = [c for c in operator_cases("tiny-dense", ["attention"], "fp16", tokens=8)
               if c.name.endswith("prefill-fp16")]
    t = {x.name: x.array for x in case.tensors}
    D = preset("tiny-dense").head_dim
    s = np.einsum("thd,shd->ths", t["q"].astype(np.float32),
                  np.repeat(t["k"], 2, axis=1).astype(np.float32)) * D ** -0.5
    assert 8 < np.median(s) < 16                   # about ATTENTION_SCORE_OFFSET
    assert np.max(s) > np.log(np.finfo(np.float16).max)  # exp overflows float16
    assert np.isfinite(t["o"].astype(np.float32)).all()


def test_manifest_fields(moge_bf16):
    case = moge_bf16["tiny-moge-attention-decode-bf16"]
    m = case.manifest
    assert m["format"] == "refimpl-golden" and m["format_version"] == 1
    assert m["operator"] == "attention" and m["seed"] == 3
    assert m["refimpl_version"] == refimpl.__version__
    assert m["command"] == ("python -m refimpl golden --preset tiny-moge --ops attention "
                            "--numerics bf16 --seed 3 --tokens 8 --out DIR")
    p = m["parameters"]
    assert (p["num_heads"], p["num_kv_heads"], p["head_dim"], p["group"]) == (4, 2, 16, 2)
    assert p["causal"] is True and p["scale"] == 0.25 and (p["queries"], p["keys"]) == (1, 8)
    assert m["numerics"]["storage_dtype"] == "bfloat16"
    assert m["numerics"]["accumulation_dtype"] == "float32"
    assert "softmax_float32" in m["numerics"]["cast_points"]["attention"]
    (o,) = case.entries("output")
    assert o["criterion"] == {"name": "k-error", "k": 2.0, "reference": "o.ref64"}
    assert o["tolerance"] == {"rtol": 1.6e-2, "atol": 1e-5}
    for e in case.entries():
        assert e["sha256"] == hashlib.sha256(gf.raw_bytes(case.tensors[e["name"]])).hexdigest()
    rope = moge_bf16["tiny-moge-rope-bf16"].manifest["parameters"]
    assert rope["angle_mode"] == "exact" and rope["theta"] == 16_000_000.0
    assert moge_bf16["tiny-moge-rms-norm-bf16"].entries("output")[0]["criterion"] == {
        "name": "allclose"}
    route = {e["name"]: e for e in moge_bf16["tiny-moge-moge-route-bf16"].entries("output")}
    assert route["expert_ids"]["criterion"]["name"] == "exact"
    assert route["expert_ids"]["criterion"]["near_ties"] == "expert_ids.near_tie"
    assert route["expert_weights"]["tolerance"] == {"rtol": 1.3e-6, "atol": 1e-5}


def test_default_tolerances_are_torch_assert_close():
    assert gf.default_tolerance(np.float16) == {"rtol": 1e-3, "atol": 1e-5}
    assert gf.default_tolerance(BF16) == {"rtol": 1.6e-2, "atol": 1e-5}
    assert gf.default_tolerance(np.float32) == {"rtol": 1.3e-6, "atol": 1e-5}
    assert gf.default_tolerance(np.float64) == {"rtol": 1e-7, "atol": 1e-7}
    assert gf.default_tolerance(np.int64) == {"rtol": 0.0, "atol": 0.0}


def test_cast_point_table_is_read_from_numerics():
    names = ("embedding", "linear", "rms_norm", "rope tables", "apply_rope", "attention",
             "swiglu", "residual add", "moge_route", "moe block", "logits")
    table = gf.cast_points(names)
    for op in names:
        assert table[op], op
    assert "before" in table["rms_norm"]  # a continuation line was joined
    with pytest.raises(RuntimeError, match="no row"):
        gf.cast_points(["no such operator"])


def test_rope_angle_mode_is_recorded_and_used():
    (case, _) = operator_cases("tiny-dense", ["rope"], "fp32", tokens=4, rope_angles="float32")
    assert case.parameters["angle_mode"] == "float32"
    assert "--rope-angles float32" in case.command
    t = {x.name: x.array for x in case.tensors}
    cos, _ = ops.rope_tables(t["positions"], 16, 4e6, angles="float32", dtype=np.float32)
    np.testing.assert_array_equal(cos, t["cos"])


def test_dense_preset_refuses_moe_operators_and_bad_options(tmp_path):
    assert_one_line_error(cli("golden", "--preset", "tiny-dense", "--ops", "rms_norm,moe",
                              "--out", tmp_path), "--ops moe", "dense", "tiny-moge")
    assert_one_line_error(cli("golden", "--preset", "tiny-dense", "--ops", "rope,gelu",
                              "--out", tmp_path), "unknown operator 'gelu'")
    assert_one_line_error(cli("golden", "--preset", "tiny-dense", "--tokens", "513",
                              "--out", tmp_path), "--tokens", "512")
    assert_one_line_error(cli("golden", "--preset", "nope", "--out", tmp_path), "nope")
    assert_one_line_error(cli("golden", "--model", "tiny-dense", "--out", tmp_path),
                          "--token-ids")
    assert_one_line_error(cli("golden", "--model", "tiny-dense", "--prompt", "hi", "--out",
                              tmp_path), "tokenizer")
    assert_one_line_error(cli("golden", "--preset", "tiny-dense", "--export", "csv", "--out",
                              tmp_path), "--export")
    assert os.listdir(tmp_path) == []


def test_context_sets_the_attention_sizes(tmp_path):
    """--context S: the attention cases' T queries are the last T of S positions, decode sees
    S, the longest varlen sequence and paged context are S; the command records it."""
    cases = {c.name: c for c in operator_cases(
        "tiny-dense", ["attention", "attention_varlen", "paged_attention", "rms_norm"], "fp32",
        tokens=5, context=40, block_size=16)}
    t = {name: {x.name: x.array for x in c.tensors} for name, c in cases.items()}
    pre = t["tiny-dense-attention-prefill-fp32"]
    assert pre["q"].shape[0] == 5 and pre["k"].shape[0] == 40
    np.testing.assert_array_equal(pre["o"], ops.attention(pre["q"], pre["k"], pre["v"]))
    top_left = ops.attention(pre["q"], pre["k"][:5], pre["v"][:5])   # queries at 0..4: wrong
    assert np.max(np.abs(top_left - pre["o"])) > 0.1
    assert t["tiny-dense-attention-decode-fp32"]["k"].shape[0] == 40
    assert 40 in t["tiny-dense-attention-varlen-prefill-fp32"]["kv_lens"]
    assert 40 in t["tiny-dense-paged-attention-fp32"]["context_lens"]
    assert "--context 40" in cases["tiny-dense-attention-prefill-fp32"].command
    assert "--context" not in cases["tiny-dense-rms-norm-fp32"].command
    # at the preset's maximum the odd varlen length stays within it
    q_lens, kv_lens = __import__("refimpl.golden.cases", fromlist=["x"]).varlen_lengths(
        512, False, 512)
    assert kv_lens.max() == 512 and kv_lens[2] % 2 == 1
    assert_one_line_error(cli("golden", "--preset", "tiny-dense", "--ops", "attention",
                              "--tokens", "8", "--context", "4", "--out", tmp_path),
                          "--context", "[--tokens 8, 512]")
    assert_one_line_error(cli("golden", "--preset", "tiny-dense", "--context", "513",
                              "--out", tmp_path), "--context")
    assert_one_line_error(cli("golden", "--model", "tiny-dense", "--token-ids", "1,2",
                              "--context", "9", "--out", tmp_path), "--context", "--preset")
    assert os.listdir(tmp_path) == []


def test_export_npy_and_bin(tmp_path):
    result = cli("golden", "--preset", "tiny-moge", "--ops", "moge_route,rms_norm",
                 "--numerics", "bf16", "--tokens", "4", "--export", "npy,bin", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote ") == 2
    case = load_case(tmp_path / "tiny-moge-moge-route-bf16")
    assert set(case.manifest["export"]) == {"npy", "bin"}
    for e in case.entries():
        a = case.tensors[e["name"]]
        raw = (tmp_path / case.name / e["files"]["bin"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == e["sha256"]
        back = np.frombuffer(raw, dtype=np.uint16 if a.dtype == BF16 else a.dtype)
        npy = np.load(tmp_path / case.name / e["files"]["npy"])
        assert npy.dtype.name == e["npy_dtype"]
        if a.dtype == BF16:
            assert e["npy_dtype"] == "uint16" and "raw uint16" in e["bin_dtype"]
            np.testing.assert_array_equal(npy.view(BF16), a)
            np.testing.assert_array_equal(back.view(BF16).reshape(a.shape), a)
        else:
            np.testing.assert_array_equal(npy, a)
            np.testing.assert_array_equal(back.reshape(a.shape), a)


def test_case_write_is_atomic_and_replaces(tmp_path, monkeypatch):
    (case,) = operator_cases("tiny-dense", ["rms_norm"], "fp32", tokens=2)
    path = write_case(str(tmp_path), case)
    first = tree_digest(path)
    (tmp_path / case.name / "stale.txt").write_text("old")
    write_case(str(tmp_path), case)
    assert tree_digest(path) == first                       # replaced, not merged
    assert sorted(os.listdir(tmp_path)) == [case.name]      # no temporary left

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(gf, "write_tensors_file", broken)
    with pytest.raises(OSError):
        write_case(str(tmp_path / "new"), case)
    assert os.listdir(tmp_path / "new") == []               # nothing half-written
    with pytest.raises(OSError):
        write_case(str(tmp_path), case)
    assert sorted(os.listdir(tmp_path)) == sorted([case.name, "new"])
    assert tree_digest(path) == first                       # the old case survives


def test_load_case_refuses_an_edited_tensor(tmp_path):
    (case,) = operator_cases("tiny-dense", ["rms_norm"], "fp32", tokens=2)
    path = write_case(str(tmp_path), case)
    data = bytearray((tmp_path / case.name / gf.TENSORS_NAME).read_bytes())
    data[-1] ^= 1
    (tmp_path / case.name / gf.TENSORS_NAME).write_bytes(bytes(data))
    with pytest.raises(gf.GoldenError, match="sha256"):
        load_case(path)
    assert load_case(path, verify=False).tensors["y"].shape == (2, 64)


def test_safetensors_file_reads_in_the_reference_library(moge_bf16):
    from safetensors import safe_open

    case = moge_bf16["tiny-moge-moge-route-bf16"]
    with safe_open(os.path.join(case.path, gf.TENSORS_NAME), framework="np") as f:
        np.testing.assert_array_equal(f.get_tensor("expert_ids"), case.tensors["expert_ids"])
        np.testing.assert_array_equal(f.get_tensor("expert_weights"),
                                      case.tensors["expert_weights"])


# ---------------------------------------------------------------------- model cases
def test_model_cases_record_every_tap_per_layer():
    model = refimpl.init_model("tiny-moge", seed=2, numerics="bf16")
    ids = [1, 5, 7, 9, 11]
    cases = model_cases(model, ids, layers=[0, 2], model_name="tiny-moge", seed=2)
    assert [c.name for c in cases] == ["tiny-moge-layer0-bf16", "tiny-moge-layer2-bf16",
                                      "tiny-moge-model-bf16"]
    layer2 = {t.name: t for t in cases[1].tensors}
    for tap in ("input_norm", "q", "k", "v", "q_rope", "k_rope", "attn", "attn_out",
                "resid_mid", "post_norm", "router_logits", "expert_ids", "expert_weights",
                "shared_expert_out", "mlp_out", "out"):
        assert layer2[f"layers.2.{tap}"].role == "output", tap
        assert layer2[f"layers.2.{tap}"].produced_by["op"], tap
    assert layer2["layers.2.input"].role == "input"
    assert layer2["model.layers.2.mlp.experts.11.down_proj.weight"].role == "input"
    assert layer2["layers.2.out.ref64"].role == "reference"
    assert layer2["layers.2.expert_ids"].criterion["name"] == "exact"
    assert layer2["layers.2.expert_ids"].criterion["near_ties"] == "layers.2.expert_ids.near_tie"
    assert layer2["layers.2.out"].criterion["name"] == "k-error"
    assert any(n.startswith("layers.2.experts.") and n.endswith(".out") for n in layer2)
    # the layer case alone reproduces its output
    x = layer2["layers.2.input"].array
    y = model.layer(2, x, layer2["cos"].array, layer2["sin"].array)
    np.testing.assert_array_equal(y, layer2["layers.2.out"].array)
    # the float64 reference is the layer in fp64 from the same rounded input
    ref = refimpl.Model(model.config, {k: v.astype(np.float64) for k, v in model.weights.items()},
                        numerics="fp64")
    r = ref.layer(2, x.astype(np.float64), layer2["cos"].array.astype(np.float64),
                  layer2["sin"].array.astype(np.float64))
    np.testing.assert_array_equal(r, layer2["layers.2.out.ref64"].array)
    whole = {t.name: t.array for t in cases[2].tensors}
    np.testing.assert_array_equal(whole["token_ids"], ids)
    np.testing.assert_array_equal(whole["logits"], model.forward(ids))
    assert whole["logits.ref64"].dtype == np.float64


def test_model_case_from_preset_cli_and_no_weights(tmp_path):
    result = cli("golden", "--model", "tiny-dense", "--token-ids", "1,2,3", "--layers", "1",
                 "--numerics", "fp32", "--seed", "4", "--no-weights", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["tiny-dense-layer1-fp32", "tiny-dense-model-fp32"]
    case = load_case(tmp_path / "tiny-dense-layer1-fp32")
    assert not any(n.startswith("model.layers.") for n in case.tensors)
    assert case.manifest["command"] == (
        "python -m refimpl golden --model tiny-dense --token-ids 1,2,3 --layers 1 "
        "--numerics fp32 --seed 4 --no-weights --out DIR")
    model = load_case(tmp_path / "tiny-dense-model-fp32")
    np.testing.assert_array_equal(model.tensors["logits"],
                                  refimpl.init_model("tiny-dense", seed=4).forward([1, 2, 3]))


def test_model_case_from_a_checkpoint_directory(tmp_path):
    from refimpl.io.checkpoint import init_checkpoint, load_model

    init_checkpoint("tiny-moge", tmp_path / "ckpt", seed=5, dtype="bf16", layers=2)
    result = cli("golden", "--model", tmp_path / "ckpt", "--token-ids", "3,4,5", "--layers",
                 "1", "--out", tmp_path / "g")
    assert result.returncode == 0, result.stderr
    case = load_case(tmp_path / "g" / "ckpt-model-bf16")
    assert case.manifest["source"]["kind"] == "checkpoint"
    np.testing.assert_array_equal(case.tensors["logits"],
                                  load_model(tmp_path / "ckpt", numerics="bf16").forward([3, 4, 5]))
    assert "--seed" not in case.manifest["command"]


from .test_checkpoint import sp_model  # noqa: E402,F401  (a 30-piece SentencePiece model)


def test_model_case_from_a_prompt(tmp_path, sp_model):  # noqa: F811
    from refimpl.io.checkpoint import save_checkpoint
    from refimpl.random_init import random_weights
    from refimpl.tokenizer import Tokenizer

    config = preset("tiny-dense").replace(vocab_size=32, num_hidden_layers=1)
    save_checkpoint(tmp_path / "m", config, random_weights(config, 1), "fp32",
                    tokenizer=sp_model)
    result = cli("golden", "--model", tmp_path / "m", "--prompt", "alpha beta", "--out",
                 tmp_path / "g")
    assert result.returncode == 0, result.stderr
    case = load_case(tmp_path / "g" / "m-model-bf16")
    ids = Tokenizer.from_dir(tmp_path / "m").encode("alpha beta")
    np.testing.assert_array_equal(case.tensors["token_ids"], ids)
    assert case.manifest["source"]["prompt"] == "alpha beta"
    assert "--prompt 'alpha beta'" in case.manifest["command"]


# ---------------------------------------------------------------------- reproducibility
THREADS = ({"NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
           {"NUMBA_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"})


def test_same_command_is_bit_identical_with_1_or_2_threads(tmp_path):
    digests = []
    for n, env in enumerate(THREADS):
        out = tmp_path / str(n)
        for args in (["--preset", "tiny-moge", "--numerics", "bf16", "--tokens", "64",
                      "--export", "bin"],
                     ["--model", "tiny-moge", "--token-ids", ",".join(map(str, range(1, 40))),
                      "--layers", "1", "--numerics", "fp32"]):
            result = cli("golden", *args, "--out", out, env=env)
            assert result.returncode == 0, result.stderr
        digests.append(tree_digest(out))
    assert len(digests[0]) > 50
    assert digests[0] == digests[1]


def _environment_matches() -> str | None:
    """Why the committed suite cannot be reproduced bit for bit here, or None."""
    with open(os.path.join(GOLDEN, "environment.json")) as fh:
        env = json.load(fh)
    import platform

    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    here = {"machine": platform.machine(), "numpy": np.__version__,
            "ml_dtypes": ml_dtypes.__version__,
            "blas": f"{blas.get('name')} {blas.get('version')}"}
    differ = [f"{k} {here[k]} (suite made with {env.get(k)})" for k in here
              if here[k] != env.get(k)]
    return ("; ".join(differ)) if differ else None


@pytest.mark.parametrize("threads", THREADS, ids=["1-thread", "2-threads"])
def test_committed_suite_regenerates_bit_identical(tmp_path, threads):
    """Always runs: every case file must come back byte for byte. The versions recorded in
    golden/environment.json are context for a failure, not a reason to skip (a different
    ml_dtypes, for one, writes the same bytes)."""
    why = _environment_matches()
    result = subprocess.run(["bash", os.path.join(GOLDEN, "regenerate.sh"), str(tmp_path)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, **threads, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    committed = {k: v for k, v in tree_digest(GOLDEN).items()
                 if k.startswith(("tiny-dense", "tiny-moge"))}
    fresh = {k: v for k, v in tree_digest(tmp_path).items() if k != "environment.json"}
    context = f" (environment: {why})" if why else " (same environment as the suite)"
    assert sorted(fresh) == sorted(committed), "the regenerated suite has other files" + context
    differ = [k for k in committed if committed[k] != fresh[k]]
    assert not differ, f"{len(differ)} files differ, e.g. {differ[:5]}" + context


def test_committed_suite_covers_every_operator_and_mode_and_is_small():
    cases = gf.find_cases(GOLDEN)
    ops_by_preset = {"tiny-dense": set(OPERATORS) - set(MOGE_OPERATORS),
                     "tiny-moge": set(OPERATORS)}
    seen = set()
    for rel in cases:
        m = gf.read_manifest(os.path.join(GOLDEN, rel))
        seen.add((m["source"].get("preset"), m["operator"], m["numerics"]["mode"]))
    for p, op_names in ops_by_preset.items():
        for op in op_names:
            for mode in ("fp64", "fp32", "bf16", "fp16"):
                assert (p, op, mode) in seen, (p, op, mode)
        assert (p, "decoder_layer", "bf16") in seen and (p, "model", "bf16") in seen
    # the layer and model cases of the W8A8 checkpoints `quantize` writes of each preset
    quantised = {(m["source"].get("path"), m["operator"], m["parameters"]["quantization"]
                  ["linears"].get("model.layers.0.self_attn.q_proj") or
                  m["parameters"]["quantization"]["linears"].get("model_quant_type"))
                 for m in (gf.read_manifest(os.path.join(GOLDEN, rel)) for rel in cases)
                 if "quantization" in m["parameters"]}
    for path, scheme in (("tiny-dense-w8a8", "W8A8"), ("tiny-moge-w8a8", "W8A8"),
                         ("tiny-moge-w8a8_dynamic", "W8A8_DYNAMIC")):
        for op in ("decoder_layer", "model"):
            assert (path, op, scheme) in quantised, (path, op, scheme, sorted(quantised))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(GOLDEN) for f in fs)
    # 15 MiB: 22 operators x 4 modes x 2 presets, the MoE ones under both profiles, and the
    # layer / model cases of the float and the three W8A8 checkpoints
    assert size < 16 * 2**20, size


def test_committed_suite_loads_and_verifies():
    for rel in gf.find_cases(GOLDEN):
        case = load_case(os.path.join(GOLDEN, rel))  # sha256 of every tensor checked
        assert case.entries("output")
        for e in case.entries():
            finite = np.isfinite(case.tensors[e["name"]].astype(np.float64))
            nan_on_purpose = ((case.manifest["operator"] == "paged_attention" and
                               e["name"].endswith("_cache")) or
                              (case.manifest["operator"] == "grouped_matmul" and
                               e["name"] == "x_sorted") or
                              (case.manifest["operator"] == "moe_ep" and e["name"] == "x"))
            if nan_on_purpose:   # unowned cache slots, rows past the last group
                assert not finite.all() and finite.any()
            else:
                assert finite.all(), e["name"]
        assert case.manifest["command"].endswith("--out DIR")


# ---------------------------------------------------------------------- real shapes
@pytest.mark.slow
def test_real_shapes_of_the_1b_and_the_moe_router(tmp_path):
    cases = operator_cases("embedded-1b", ["rms_norm", "rope", "attention", "swiglu"], "bf16",
                           tokens=4)
    t = {c.name: {x.name: x.array for x in c.tensors} for c in cases}
    assert t["embedded-1b-rms-norm-bf16"]["x"].shape == (4, 1536)
    assert t["embedded-1b-rope-long-bf16"]["q"].shape == (4, 12, 128)
    assert t["embedded-1b-rope-long-bf16"]["positions"][-1] == 32767
    assert t["embedded-1b-attention-decode-bf16"]["k"].shape == (4, 6, 128)
    assert t["embedded-1b-swiglu-bf16"]["down_proj.weight"].shape == (1536, 6144)
    (route,) = operator_cases("pro-moe-72b", ["moge_route"], "bf16", tokens=4)
    ids = {x.name: x.array for x in route.tensors}["expert_ids"]
    assert ids.shape == (4, 8)
    assert (ids // 8 == np.arange(8)).all()  # one expert per group of 8


# ---------------------------------------------------------------------- golden/README.md
def _readme_blocks(lang: str) -> list:
    text = open(os.path.join(GOLDEN, "README.md"), encoding="utf-8").read()
    parts = text.split(f"```{lang}\n")[1:]
    return [p.split("```")[0] for p in parts]


@pytest.fixture(scope="module")
def exported_attention(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    result = cli("golden", "--preset", "tiny-dense", "--ops", "attention", "--tokens", "8",
                 "--export", "bin", "--out", out)
    assert result.returncode == 0, result.stderr
    return out / "tiny-dense-attention-prefill-bf16"


def test_readme_python_snippets_run(exported_attention):
    load, raw = _readme_blocks("python")
    result = subprocess.run([sys.executable, "-c", load], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0.25", "(8,", "4,", "16)", "bfloat16", "float64"]
    scope = {}
    exec(raw.replace("CASE", str(exported_attention)), scope)
    expected = load_case(str(exported_attention)).tensors["o"]
    np.testing.assert_array_equal(scope["o"], expected.astype(np.float32))


def test_readme_cpp_snippet_reads_a_bin(tmp_path, exported_attention):
    import shutil

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    (source,) = _readme_blocks("cpp")
    (tmp_path / "read_golden.cpp").write_text(source)
    build = subprocess.run([compiler, "-std=c++17", "-O2", str(tmp_path / "read_golden.cpp"),
                            "-o", str(tmp_path / "read_golden")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(tmp_path / "read_golden"), str(exported_attention / "o.bin"),
                          "8", "4", "16"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    o = load_case(str(exported_attention)).tensors["o"].astype(np.float32).ravel()
    assert run.stdout.strip() == f"512 values, first {o[0]:.9g}, last {o[-1]:.9g}"
    wrong = subprocess.run([str(tmp_path / "read_golden"), str(exported_attention / "o.bin"),
                            "8", "4", "8"], capture_output=True, text=True)
    assert wrong.returncode == 1 and "does not hold 256 bfloat16 values" in wrong.stderr


def test_readme_example_report_is_what_compare_prints(tmp_path):
    case = load_case(os.path.join(GOLDEN, "tiny-dense", "tiny-dense-rope-bf16")).tensors
    for name in ("q_rope", "k_rope"):
        np.save(tmp_path / f"{name}.npy",
                ops.apply_rope_interleaved(case[name[0]], case["cos"], case["sin"]))
    result = cli("compare", os.path.join(GOLDEN, "tiny-dense", "tiny-dense-rope-bf16"), tmp_path)
    assert result.returncode == 1
    readme = open(os.path.join(GOLDEN, "README.md"), encoding="utf-8").read()
    for line in result.stdout.strip().splitlines():
        assert "    " + line in readme, line


def test_the_reference_model_upcasts_where_used_and_equals_a_float64_model():
    """reference_model keeps the weights in their storage dtype (no float64 copy of a large
    weight): its forward equals a float64 Model over weights converted up front, bit for bit,
    with the MoGE routing forced to the low-precision run's."""
    from refimpl.golden import reference_model

    model = refimpl.init_model("tiny-moge", seed=0, numerics="bf16")
    ref = reference_model(model)
    assert ref.w("lm_head.weight").dtype == BF16 and not ref.upcast_weights
    taps = refimpl.Taps([], routing=True)
    ids = np.arange(1, 20)
    model.forward(ids, taps=taps)
    whole = refimpl.Model(model.config, {n: w.astype(np.float64) for n, w in model.weights.items()},
                          numerics="fp64")
    np.testing.assert_array_equal(ref.forward(ids, expert_ids=taps.routing),
                                  whole.forward(ids, expert_ids=taps.routing))


def test_iter_model_cases_gives_the_cases_of_model_cases_one_at_a_time():
    from refimpl.golden import iter_model_cases

    model = refimpl.init_model("tiny-moge", seed=0, numerics="bf16")
    ids = [1, 5, 7, 9]
    listed = model_cases(model, ids, layers=[0, 2])
    it = iter_model_cases(model, ids, layers=[0, 2])
    for want in listed:
        got = next(it)
        assert got.name == want.name
        assert [t.name for t in got.tensors] == [t.name for t in want.tensors]
        for a, b in zip(got.tensors, want.tensors):
            assert gf.sha256_of(a.array) == gf.sha256_of(b.array), a.name
    assert next(it, None) is None
