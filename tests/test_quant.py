"""W8A8 (issue 14): the quantised operators, the msModelSlim format, the quantiser, the model
on a quantised checkpoint, C8, and the goldens' verdicts.

Independent checks: the integer path against torch's integer matmul and a transcription of
vllm-ascend's formulas (npu_quantize's x * scale + offset with torch.round, which rounds half
to even; scale_from_float_to_int64 verbatim; the fused MoE of vllm-ascend 728bed0248 written
out with torch ops).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from refimpl import kernels as K
from refimpl import ops
from refimpl.errors import CheckpointError, InputError
from refimpl.golden import operator_cases
from refimpl.golden.compare import Options, compare_paths
from refimpl.golden.format import load_case, write_case
from refimpl.io.checkpoint import (DEFAULT_MODEL_DIR, init_checkpoint, load_model,
                                   load_weights, save_checkpoint)
from refimpl.io.safetensors_io import read_safetensors, write_safetensors
from refimpl.numerics import bfloat16
from refimpl.ops.quant import MAX_INT8_REDUCTION
from refimpl.quant import (DESCRIPTION_NAME, calibration_sequences, quantize_checkpoint,
                           read_description)
from refimpl.quant.quantize import CALIBRATION_TEXT, weight_quant
from refimpl.taps import Taps

from .conftest import candidate_verdicts, cli, one_line_error
from refimpl.tokenizer import Tokenizer

SCHEMES = ("W8A8", "W8A8_DYNAMIC")
EVAL_TEXT = os.path.join(os.path.dirname(CALIBRATION_TEXT), "evaluation.txt")


# ---------------------------------------------------------------------- operators
def test_quantize_rounds_half_to_even_and_clamps():
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, 300.0, -300.0, -128.5]],
                 np.float32)
    q = ops.quantize(x, np.float32(1.0), None, div_mode=False)
    assert q.dtype == np.int8
    assert q.tolist() == [[0, 2, 2, 0, -2, 126, 127, 127, -128, -128]]
    # torch.round rounds half to even too: the same integers
    t = torch.clamp(torch.round(torch.from_numpy(x)), -128, 127).to(torch.int8)
    assert t.numpy().tolist() == q.tolist()


def test_static_quantize_is_vllm_ascends_formula():
    """npu_quantize(x, 1 / input_scale (in the activation dtype), offset, div_mode=False),
    transcribed with torch: clamp(round(x.float() * r.float() + offset))."""
    rng = np.random.default_rng(0)
    for dt, tdt in ((bfloat16, torch.bfloat16), (np.float16, torch.float16)):
        x = (rng.standard_normal((7, 33)) * 3).astype(dt)
        scale, offset = np.array([0.0371], dt), np.array([-5], np.int8)
        ours = ops.static_quantize(x, scale, offset)
        xt = torch.from_numpy(x.astype(np.float32)).to(tdt)
        r = (1 / torch.tensor([float(scale[0])]).to(tdt))         # aclnn_input_scale_reciprocal
        theirs = torch.clamp(torch.round(xt.float() * r.float() + float(offset[0])),
                             -128, 127).to(torch.int8)
        assert np.array_equal(ours, theirs.numpy())


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (17, 33, 65), (64, 130, 257),
                                   (1, 1536, 1536), (130, 96, 1024)])
def test_int8_matmul_is_exact_and_the_kernel_equals_the_spec(shape):
    T, n, k = shape
    rng = np.random.default_rng(T * n + k)
    x = rng.integers(-128, 128, (T, k), dtype=np.int8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    exact = (torch.from_numpy(x).long() @ torch.from_numpy(w).long().T).numpy()
    spec, kern = ops.int8_matmul(x, w), K.int8_matmul(x, w)
    assert spec.dtype == kern.dtype == np.int32
    assert np.array_equal(spec, exact) and np.array_equal(kern, exact)


def test_int8_matmul_extremes_and_torch_int_mm():
    """All -128 (the largest products) at the longest k whose int32 cannot overflow, and
    torch._int_mm (int8 x int8 -> int32) where its shape rules allow."""
    k = 4096
    x = np.full((32, k), -128, np.int8)
    w = np.full((8, k), -128, np.int8)
    assert (K.int8_matmul(x, w) == 128 * 128 * k).all()
    assert (ops.int8_matmul(x, w) == 128 * 128 * k).all()
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (32, 64), dtype=np.int8)
    w = rng.integers(-128, 128, (48, 64), dtype=np.int8)
    t = torch._int_mm(torch.from_numpy(x), torch.from_numpy(w).T.contiguous())
    assert np.array_equal(K.int8_matmul(x, w), t.numpy())


def test_int8_matmul_refuses_bad_input():
    a = np.zeros((2, 4), np.int8)
    with pytest.raises(InputError, match="int8"):
        ops.int8_matmul(a.astype(np.int16), a)
    with pytest.raises(InputError, match="must be"):
        K.int8_matmul(a, np.zeros((3, 5), np.int8))
    with pytest.raises(InputError, match="overflow"):
        ops.int8_matmul(np.zeros((1, MAX_INT8_REDUCTION + 1), np.int8),
                        np.zeros((1, MAX_INT8_REDUCTION + 1), np.int8))


def test_deq_scale_int64_is_scale_from_float_to_int64():
    """vllm-ascend's scale_from_float_to_int64, verbatim: the float32 bits viewed as int32,
    then int64 (sign-extended); decoding gives the float32 back."""
    scale = np.array([1e-4, 3.5e-3, 0.25, 7.0e-6], np.float32)
    theirs = torch.from_numpy(np.frombuffer(torch.from_numpy(scale).numpy().astype(
        np.float32).tobytes(), dtype=np.int32).astype(np.int64))
    ours = ops.encode_deq_scale(scale)
    assert ours.dtype == np.int64 and np.array_equal(ours, theirs.numpy())
    assert np.array_equal(ops.decode_deq_scale(ours), scale)
    negative = np.array([-0.5], np.float32)            # sign bit set: a negative int64
    assert ops.encode_deq_scale(negative)[0] < 0
    assert ops.decode_deq_scale(ops.encode_deq_scale(negative))[0] == np.float32(-0.5)


def test_dynamic_quantize_against_torch():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((9, 70)) * 2).astype(bfloat16)
    x[4] = 0
    q, s = ops.dynamic_quantize(x)
    xt = torch.from_numpy(x.astype(np.float32))
    ts = xt.abs().amax(-1) / 127
    tq = torch.clamp(torch.round(xt / torch.where(ts > 0, ts, 1)[:, None]), -128, 127)
    assert np.array_equal(s, ts.numpy()) and s[4] == 0
    assert np.array_equal(q, tq.to(torch.int8).numpy()) and (q[4] == 0).all()


@pytest.mark.parametrize("dt", [np.float32, bfloat16, np.float16])
def test_w8a8_linear_approximates_the_float_linear(dt):
    """Quantised weights and activations: the static and dynamic linears stay within the
    int8 error of the float product (and the kernel gives the spec's numbers bit for bit)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 96)).astype(dt)
    w = (rng.standard_normal((40, 96)) * 0.05).astype(dt)
    b = (rng.standard_normal(40) * 0.1).astype(dt)
    sdt = np.float32 if dt == np.float32 else dt
    w_q, ws = weight_quant(w, sdt)
    from refimpl.quant.quantize import activation_quant, static_params

    xf = x.astype(np.float32)
    xs, xo = activation_quant(float(xf.min()), float(xf.max()), sdt, False)
    deq_dtype = np.int64 if dt == np.float16 else np.float32
    deq, qb = static_params(w_q, ws, xs, xo, b, deq_dtype)
    ref = xf @ w.astype(np.float32).T + b.astype(np.float32)
    static = {"scheme": "W8A8", "weight": w_q, "weight_scale": ws, "input_scale": xs,
              "input_offset": xo, "deq_scale": deq, "quant_bias": qb, "bias": b}
    dynamic = {"scheme": "W8A8_DYNAMIC", "weight": w_q, "weight_scale": ws, "bias": b}
    for q in (static, dynamic):
        y = ops.w8a8_linear(x, q)
        assert y.dtype == np.dtype(dt)
        assert np.array_equal(K.w8a8_linear(x, q).view(np.uint8), y.view(np.uint8))
        err = np.linalg.norm(y.astype(np.float32) - ref) / np.linalg.norm(ref)
        assert err < 0.02, (q["scheme"], err)


def test_dequant_swiglu_quant_against_an_independent_torch_version():
    rng = np.random.default_rng(4)
    E, I, R = 4, 24, 30
    counts = np.array([7, 0, 13, 10])
    acc = rng.integers(-20000, 20000, (R, 2 * I)).astype(np.int32)
    ws = rng.uniform(1e-4, 1e-3, (E, 2 * I)).astype(np.float32)
    act = rng.uniform(1e-3, 1e-2, R).astype(np.float32)
    h_q, scale = ops.dequant_swiglu_quant(acc, ws, act, np.cumsum(counts))
    groups = np.repeat(np.arange(E), counts)
    v = (torch.from_numpy(acc).float() * torch.from_numpy(ws)[groups]
         * torch.from_numpy(act)[:, None])
    h = torch.nn.functional.silu(v[:, :I]) * v[:, I:]
    ts = h.abs().amax(-1) / 127
    tq = torch.clamp(torch.round(h / ts[:, None]), -128, 127).to(torch.int8)
    d = np.abs(h_q.astype(np.int32) - tq.numpy().astype(np.int32))
    assert d.max() <= 1 and (d > 0).mean() <= 1e-3          # torch's exp vs NumPy's
    np.testing.assert_allclose(scale, ts.numpy(), rtol=2e-7)
    # rows past the groups are not read: zeros
    h_q2, s2 = ops.dequant_swiglu_quant(np.concatenate([acc, acc[:3]]), ws,
                                        np.concatenate([act, act[:3]]), np.cumsum(counts))
    assert (h_q2[R:] == 0).all() and (s2[R:] == 0).all()


def _moe_reference_torch(x, ids, weights, experts, s13, s2, shared):
    """vllm-ascend 728bed0248 fused_experts (static W8A8), written out per token with torch:
    quant_per_tensor(x, s13, div_mode) before dispatch, grouped matmul with scale w13_scale *
    s13 to bf16, npu_swiglu, requant with s2, grouped matmul with w2_scale * s2 to bf16,
    finalize with the routing weights (float32, one rounding), + shared expert."""
    xt = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    x_q = torch.clamp(torch.round(xt.float() / float(s13)), -128, 127)
    T, G = ids.shape
    out = torch.zeros(T, x.shape[1])
    for t in range(T):
        for g in range(G):
            w13, s13v, w2, s2v = experts[int(ids[t, g])]
            acc = x_q[t:t + 1].double() @ torch.from_numpy(w13.astype(np.float64)).T
            gu = (acc.float() * (torch.from_numpy(s13v) * np.float32(s13))).to(torch.bfloat16)
            I = gu.shape[1] // 2
            a = (torch.nn.functional.silu(gu[:, :I].float()).to(torch.bfloat16).float()
                 * gu[:, I:].float()).to(torch.bfloat16)
            a_q = torch.clamp(torch.round(a.float() / float(s2)), -128, 127)
            acc2 = a_q.double() @ torch.from_numpy(w2.astype(np.float64)).T
            down = (acc2.float() * (torch.from_numpy(s2v) * np.float32(s2))).to(torch.bfloat16)
            out[t] += float(np.float32(weights[t, g]).astype(bfloat16)) * down[0].float()
    routed = out.to(torch.bfloat16)
    return (routed.float() + torch.from_numpy(shared.astype(np.float32))).to(torch.bfloat16)


class _Experts(list):
    input_scales = (None, None)


def test_quant_moe_block_is_vllm_ascends_fused_moe():
    rng = np.random.default_rng(5)
    T, H, I, E, G = 10, 32, 16, 8, 2
    experts = _Experts()
    for e in range(E):
        w13, s13 = weight_quant((rng.standard_normal((2 * I, H)) * 0.1).astype(bfloat16),
                                np.float32)
        w2, s2 = weight_quant((rng.standard_normal((H, I)) * 0.1).astype(bfloat16), np.float32)
        experts.append((w13, s13.reshape(-1), w2, s2.reshape(-1)))
    experts.input_scales = (np.float32(0.02), np.float32(0.004))
    x = rng.standard_normal((T, H)).astype(bfloat16)
    gate = (rng.standard_normal((E, H)) * 0.3).astype(bfloat16)
    router_scale = np.ones((1, E), bfloat16)
    shared_out = (rng.standard_normal((T, H)) * 0.1).astype(bfloat16)
    taps = {}
    for backend in (ops, K):
        y = backend.quant_moe_block(x, gate, router_scale, experts,
                                    lambda xs, r: shared_out, G, "W8A8",
                                    record=lambda n, a: taps.__setitem__(n, a))
        ref = _moe_reference_torch(x, taps["expert_ids"], taps["expert_weights"], experts,
                                   *experts.input_scales, shared_out)
        d = np.abs(y.astype(np.float32) - ref.float().numpy())
        # the finalize sums in float32 then rounds once; the per-token loop adds in
        # float32 too: equal but for the order of the G terms
        assert d.max() <= 2 ** -6 * np.abs(ref.float().numpy()).max(), d.max()
        assert taps["stages.x_q"].dtype == np.int8 and taps["stages.gate_up_acc"].dtype == np.int32


def test_kv_quantize_round_trip():
    rng = np.random.default_rng(6)
    kv = rng.standard_normal((5, 2, 8)).astype(bfloat16)
    scale = (np.abs(kv.astype(np.float32)).reshape(5, 16).max(0) / 127).astype(np.float32)
    q = ops.kv_quantize(kv, scale)
    back = ops.kv_dequantize(q, scale, bfloat16)
    assert q.dtype == np.int8 and back.dtype == bfloat16
    assert np.abs(back.astype(np.float32) - kv.astype(np.float32)).max() <= scale.max() * 0.51


# ---------------------------------------------------------------------- safetensors dtypes
def test_safetensors_reads_and_writes_the_integer_and_fp8_dtypes(tmp_path):
    import ml_dtypes

    arrays = {"i8": np.arange(-4, 4, dtype=np.int8), "u8": np.arange(8, dtype=np.uint8),
              "i16": np.arange(-3, 3, dtype=np.int16), "i32": np.arange(5, dtype=np.int32),
              "e4m3": np.linspace(-2, 2, 6).astype(ml_dtypes.float8_e4m3fn),
              "e5m2": np.linspace(-2, 2, 6).astype(ml_dtypes.float8_e5m2)}
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {k: (a.shape, a.dtype) for k, a in arrays.items()},
                      arrays.__getitem__)
    back = read_safetensors(path)
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and np.array_equal(back[k].view(np.uint8),
                                                           a.view(np.uint8))
    # the reference library reads what we wrote (its numpy loader has no float8: the
    # integer tensors only; torch's loader checks the float8 ones)
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch

    ints = {k: a for k, a in arrays.items() if not k.startswith("e")}
    path2 = tmp_path / "ints.safetensors"
    write_safetensors(path2, {k: (a.shape, a.dtype) for k, a in ints.items()}, ints.__getitem__)
    ref = load_file(str(path2))
    tref = load_torch(str(path))
    assert tref["e4m3"].dtype == torch.float8_e4m3fn and tref["e5m2"].dtype == torch.float8_e5m2
    assert np.array_equal(tref["e4m3"].view(torch.uint8).numpy(), arrays["e4m3"].view(np.uint8))
    assert ref["i8"].dtype == np.int8 and np.array_equal(ref["i8"], arrays["i8"])
    assert np.array_equal(ref["u8"], arrays["u8"]) and np.array_equal(ref["i16"], arrays["i16"])


# ---------------------------------------------------------------------- the quantiser
@pytest.fixture(scope="module")
def default_seqs():
    cfg, _ = load_weights(DEFAULT_MODEL_DIR)
    return calibration_sequences(CALIBRATION_TEXT, Tokenizer.from_dir(DEFAULT_MODEL_DIR),
                                 cfg.vocab_size)


@pytest.fixture(scope="module")
def quantised_default(tmp_path_factory, default_seqs):
    """{scheme: directory} of the default model quantised by the library call."""
    cfg, w = load_weights(DEFAULT_MODEL_DIR)
    out = {}
    for scheme in SCHEMES:
        d = str(tmp_path_factory.mktemp("q") / scheme)
        quantize_checkpoint(cfg, w, d, scheme, default_seqs, tokenizer=DEFAULT_MODEL_DIR,
                            kv_cache="C8" if scheme == "W8A8_DYNAMIC" else None)
        out[scheme] = d
    return out


@pytest.fixture(scope="module")
def tiny_moge_dirs(tmp_path_factory):
    """(float dir, {scheme: quantised dir}) of tiny-moge (random weights, token-id calibration)."""
    base = tmp_path_factory.mktemp("moge")
    float_dir = str(base / "float")
    init_checkpoint("tiny-moge", float_dir, seed=0)
    calib = base / "calib.txt"
    rng = np.random.default_rng(0)
    calib.write_text("\n".join(",".join(map(str, rng.integers(3, 257, 48))) for _ in range(6)))
    out = {}
    for scheme, name in (("W8A8", "w8a8"), ("W8A8_DYNAMIC", "w8a8_dynamic")):
        out[scheme] = str(base / scheme)
        cli("quantize", "--model", float_dir, "--scheme", name, "--calib", str(calib),
            "--out", out[scheme], check_rc=0)
    return float_dir, out, str(calib)


def test_the_format_of_a_quantised_checkpoint(quantised_default):
    d = quantised_default["W8A8"]
    desc = read_description(d)
    assert desc["model_quant_type"] == "W8A8" and desc["version"] == "1.0.0"
    _, w = load_weights(d)
    p = "model.layers.0.self_attn.q_proj."
    assert w[p + "weight"].dtype == np.int8 and desc[p + "weight"] == "W8A8"
    assert w[p + "weight_scale"].shape == (w[p + "weight"].shape[0], 1)
    assert w[p + "weight_scale"].dtype == bfloat16                # the model dtype
    assert w[p + "deq_scale"].dtype == np.float32                 # a bf16 model
    assert w[p + "quant_bias"].dtype == np.int32 and w[p + "input_offset"].dtype == np.int8
    for name in ("model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight", p + "bias"):
        assert desc[name] == "FLOAT" and w[name].dtype == bfloat16
    # deq_scale = input_scale * weight_scale; the integers were made with the stored scale
    deq = (w[p + "input_scale"].astype(np.float32)[0]
           * w[p + "weight_scale"].astype(np.float32).reshape(-1))
    assert np.array_equal(w[p + "deq_scale"], deq)
    dyn = read_description(quantised_default["W8A8_DYNAMIC"])
    assert dyn["model_quant_type"] == "W8A8_DYNAMIC" and dyn["kv_cache_type"] == "C8"
    _, wd = load_weights(quantised_default["W8A8_DYNAMIC"])
    assert p + "input_scale" not in wd and p + "deq_scale" not in wd
    assert wd["model.layers.0.self_attn.k_proj.kv_cache_scale"].shape == (2 * 64,)


def test_quant_bias_folds_the_bias_and_the_offset(quantised_default):
    _, w = load_weights(quantised_default["W8A8"])
    p = "model.layers.1.self_attn.k_proj."
    w_q, deq = w[p + "weight"].astype(np.int64), w[p + "deq_scale"].astype(np.float64)
    o = int(w[p + "input_offset"][0])
    bias = w[p + "bias"].astype(np.float64)
    assert np.array_equal(w[p + "quant_bias"], np.rint(bias / deq) - o * w_q.sum(1))


def test_fp16_models_store_deq_scale_as_int64(tmp_path):
    d, q = str(tmp_path / "f16"), str(tmp_path / "q16")
    init_checkpoint("tiny-dense", d, dtype="fp16")
    cfg, w = load_weights(d)
    quantize_checkpoint(cfg, w, q, "W8A8", [[1, 5, 9, 33, 7, 200]])
    _, wq = load_weights(q)
    deq = wq["model.layers.0.mlp.down_proj.deq_scale"]
    assert deq.dtype == np.int64
    m16, f16 = load_model(q, numerics="fp16"), load_model(d, numerics="fp16")
    a, b = m16.forward([1, 5, 9, 33]), f16.forward([1, 5, 9, 33])
    assert np.linalg.norm(a.astype(np.float32) - b) / np.linalg.norm(b.astype(np.float32)) < 0.1


def test_quantize_is_deterministic_and_round_trips(tmp_path, quantised_default, default_seqs):
    """Same command, same bytes; and a W8A8 directory read and written back through the
    checkpoint writer gives the same tensor bytes (nothing lost on the way in or out)."""
    cfg, w = load_weights(DEFAULT_MODEL_DIR)
    again = str(tmp_path / "again")
    quantize_checkpoint(cfg, w, again, "W8A8", default_seqs, tokenizer=DEFAULT_MODEL_DIR)
    first = quantised_default["W8A8"]
    for f in ("model.safetensors", DESCRIPTION_NAME, "config.json"):
        with open(os.path.join(first, f), "rb") as a, open(os.path.join(again, f), "rb") as b:
            assert a.read() == b.read(), f
    qcfg, qw = load_weights(first)
    copy = str(tmp_path / "copy")
    save_checkpoint(copy, qcfg, dict(qw), specs={n: (a.shape, a.dtype) for n, a in qw.items()},
                    extra_json={DESCRIPTION_NAME: read_description(first)})
    with open(os.path.join(first, "model.safetensors"), "rb") as a, \
            open(os.path.join(copy, "model.safetensors"), "rb") as b:
        assert a.read() == b.read()
    assert read_description(copy) == read_description(first)


def _break(src, dst, edit):
    """A copy of a quantised checkpoint with one tensor (or the description) edited."""
    shutil.copytree(src, dst)
    cfg, w = load_weights(src)
    w, desc = dict(w), read_description(src)
    edit(w, desc)
    os.remove(os.path.join(dst, "model.safetensors"))
    write_safetensors(os.path.join(dst, "model.safetensors"),
                      {n: (a.shape, a.dtype) for n, a in w.items()}, w.__getitem__)
    with open(os.path.join(dst, DESCRIPTION_NAME), "w") as fh:
        json.dump(desc, fh)
    return dst


P = "model.layers.0.self_attn.q_proj."
BAD_CHECKPOINTS = {
    "missing scale": (lambda w, d: (w.pop(P + "deq_scale"), d.pop(P + "deq_scale")),
                      "deq_scale is missing"),
    "scale shape": (lambda w, d: w.__setitem__(P + "weight_scale", w[P + "weight_scale"][:3]),
                    "expected shape"),
    "scale dtype": (lambda w, d: w.__setitem__(P + "quant_bias",
                                               w[P + "quant_bias"].astype(np.float32)),
                    "dtype float32"),
    "absent tensor": (lambda w, d: d.__setitem__("model.layers.0.mlp.nonexistent", "W8A8"),
                      "the checkpoint does not hold"),
    "zero scale": (lambda w, d: w.__setitem__(P + "input_scale",
                                              np.zeros_like(w[P + "input_scale"])), "is zero"),
    "nan scale": (lambda w, d: w.__setitem__(P + "weight_scale",
                                             np.full_like(w[P + "weight_scale"], np.nan)),
                  "not finite"),
    "weight not int8": (lambda w, d: w.__setitem__(P + "weight",
                                                   w[P + "weight"].astype(np.int16)), "not int8"),
    "unknown scheme": (lambda w, d: d.__setitem__(P + "weight", "W4A16"), "W4A16"),
}


@pytest.mark.parametrize("defect", sorted(BAD_CHECKPOINTS))
def test_a_bad_quantised_checkpoint_is_one_line_exit_2(quantised_default, tmp_path, defect):
    edit, message = BAD_CHECKPOINTS[defect]
    d = _break(quantised_default["W8A8"], str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(d)
    line = one_line_error(cli("run", "--model", d, "--max-new-tokens", "1"))
    assert message.split()[0] in line


def test_a_corrupt_description_is_one_line_exit_2(quantised_default, tmp_path):
    d = str(tmp_path / "bad")
    shutil.copytree(quantised_default["W8A8"], d)
    with open(os.path.join(d, DESCRIPTION_NAME), "w") as fh:
        fh.write("{not json")
    assert "not valid JSON" in one_line_error(cli("run", "--model", d))


def test_quantize_refuses_bad_options(tmp_path, quantised_default):
    assert "already exists" in one_line_error(
        cli("quantize", "--scheme", "w8a8", "--out", quantised_default["W8A8"]))
    assert "cannot read" in one_line_error(
        cli("quantize", "--scheme", "w8a8", "--calib", str(tmp_path / "nope.txt"),
            "--out", str(tmp_path / "x")))
    assert "invalid choice" in one_line_error(
        cli("quantize", "--scheme", "w4a16", "--out", str(tmp_path / "x")))
    assert "already quantised" in one_line_error(
        cli("quantize", "--model", quantised_default["W8A8"], "--scheme", "w8a8",
            "--out", str(tmp_path / "y")))
    assert "no tokenizer" in one_line_error(
        cli("quantize", "--model", "tiny-dense", "--scheme", "w8a8", "--out",
            str(tmp_path / "z")))
    assert "outside the vocabulary" in one_line_error(
        cli("quantize", "--scheme", "w8a8", "--calib", _ids_file(tmp_path, "1,2,99999"),
            "--out", str(tmp_path / "w")))
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "w")
    assert "a preset" in one_line_error(cli("run", "--model", "tiny-dense", "--numerics", "w8a8"))


def _ids_file(tmp_path, text):
    p = tmp_path / "ids.txt"
    p.write_text(text + "\n")
    return str(p)


# ---------------------------------------------------------------------- the model
def _eval_ids():
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    with open(EVAL_TEXT, encoding="utf-8") as fh:
        return [list(tok.encode(ln.strip())) for ln in fh if ln.strip()][:4]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_quantised_default_model_predicts_like_bf16(quantised_default, scheme):
    """Next-token predictions on held-out text: top-1 agreement with the bf16 model at least
    95% (measured: 98-99%, tools/measure_quant.py), numpy and numba backends alike."""
    f = load_model(DEFAULT_MODEL_DIR, numerics="bf16")
    for backend in ("numpy", "numba"):
        m = load_model(quantised_default[scheme], numerics="w8a8", backend=backend)
        assert m.scheme == scheme and m.numerics == "bf16"
        agree = total = 0
        for ids in _eval_ids():
            a, b = m.forward(ids), f.forward(ids)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += len(ids)
        assert agree / total >= 0.95, (backend, agree / total)


def test_taps_hold_the_integer_intermediates(quantised_default):
    m = load_model(quantised_default["W8A8_DYNAMIC"], numerics="w8a8")
    taps = Taps([0])
    m.forward([1, 40, 41, 42], taps=taps)
    assert taps["layers.0.self_attn.q_proj.x_q"].dtype == np.int8
    assert taps["layers.0.mlp.down_proj.acc"].dtype == np.int32
    assert taps["layers.0.mlp.up_proj.token_scale"].dtype == np.float32


def test_numba_and_numpy_give_the_same_integers(quantised_default):
    """On the same float input the integer path is exact: the q/k/v projections of layer 0
    (their input is the RMSNorm of the embedding, bit-equal between backends in bf16)."""
    taps = {}
    for backend in ("numpy", "numba"):
        m = load_model(quantised_default["W8A8"], numerics="w8a8", backend=backend)
        t = Taps([0])
        m.forward([1, 40, 41, 42, 43], taps=t)
        taps[backend] = t
    for name in ("layers.0.input_norm", "layers.0.self_attn.q_proj.x_q",
                 "layers.0.self_attn.q_proj.acc", "layers.0.q"):
        a, b = taps["numpy"][name], taps["numba"][name]
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), name


def test_decode_with_a_cache_matches_the_whole_forward(quantised_default):
    m = load_model(quantised_default["W8A8"], numerics="w8a8")
    ids = [1, 40, 41, 42, 43, 44]
    full = m.forward(ids).astype(np.float32)
    cache = m.new_cache()
    m.forward(ids[:3], cache)
    steps = [m.forward([t], cache).astype(np.float32)[0] for t in ids[3:]]
    np.testing.assert_allclose(np.stack(steps), full[3:], atol=0.1, rtol=0.05)


def test_c8_cache_prefill_unquantised_decode_dequantised(quantised_default):
    m = load_model(quantised_default["W8A8_DYNAMIC"], numerics="w8a8")
    assert m.kv_cache_type == "C8"
    cache = m.new_cache()
    assert type(cache).__name__ == "QuantKVCache"
    ids = [1, 40, 41, 42]
    plain = m.forward(ids)                                 # no cache: unquantised K/V
    prefill = m.forward(ids, cache)
    assert np.array_equal(prefill.view(np.uint16), plain.view(np.uint16))
    assert cache._k[0].dtype == np.int8 and cache.nbytes() == 2 * 4 * 4 * 2 * 64
    step = m.forward([43], cache).astype(np.float32)
    whole = m.forward(ids + [43]).astype(np.float32)[-1:]
    assert not np.array_equal(step, whole)                 # decode read the int8 cache
    assert np.abs(step - whole).max() < 0.25 * np.abs(whole).max()
    with pytest.raises(InputError, match="chunked prefill"):
        m.forward([44, 45], cache)
    with pytest.raises(InputError, match="paged"):
        m.new_paged_cache(4, 16)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_quantised_moge_model_runs_and_routes_like_the_float_one(tiny_moge_dirs, scheme):
    float_dir, qdirs, _ = tiny_moge_dirs
    f = load_model(float_dir, numerics="bf16")
    ids = list(np.random.default_rng(1).integers(3, 257, 24))
    b = f.forward(ids).astype(np.float32)
    for backend in ("numpy", "numba"):
        m = load_model(qdirs[scheme], numerics="w8a8", backend=backend)
        taps = Taps([0])
        a = m.forward(ids, taps=taps).astype(np.float32)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.05
        assert taps["layers.0.stages.gate_up_acc"].dtype == np.int32
    desc = read_description(qdirs[scheme])
    assert desc["model.layers.0.mlp.gate.weight"] == "FLOAT"        # router never quantised
    if scheme == "W8A8":
        _, w = load_weights(qdirs[scheme])
        scales = {float(w[f"model.layers.0.mlp.experts.{e}.gate_proj.input_scale"][0])
                  for e in range(12)}
        assert len(scales) == 1                  # one activation scale per layer


def test_quantize_run_golden_end_to_end(tmp_path, tiny_moge_dirs):
    """quantize -> run -> golden -> compare from the CLI, on the default model and on a
    MoGE checkpoint; the golden of a quantised layer fails a kernel that drops quant_bias."""
    q = str(tmp_path / "q")
    cli("quantize", "--scheme", "w8a8", "--out", q, check_rc=0)
    p = cli("run", "--model", q, "--max-new-tokens", "8", "--backend", "numba", check_rc=0)
    assert "w8a8, numba" in p.stderr
    g = str(tmp_path / "g")
    cli("golden", "--model", q, "--token-ids", "1,40,41,42", "--layers", "0", "--out", g,
        check_rc=0)
    cases = sorted(os.listdir(g))
    assert any("layer0" in c for c in cases)
    case = os.path.join(g, next(c for c in cases if "layer0" in c))
    manifest = json.load(open(os.path.join(case, "manifest.json")))
    names = {t["name"]: t for t in manifest["tensors"]}
    assert names["layers.0.self_attn.q_proj.x_q"]["dtype"] == "int8"
    assert names["layers.0.self_attn.q_proj.acc"]["role"] == "reference"
    assert "model.layers.0.self_attn.q_proj.deq_scale" in names
    float_dir, qdirs, _ = tiny_moge_dirs
    cli("run", "--model", qdirs["W8A8"], "--token-ids", "1,2,3", "--max-new-tokens", "4",
        check_rc=0)
    gm = str(tmp_path / "gm")
    cli("golden", "--model", qdirs["W8A8_DYNAMIC"], "--token-ids", "1,5,7,9", "--layers", "0",
        "--out", gm, check_rc=0)
    # the numba backend's layer passes its golden
    m = load_model(qdirs["W8A8_DYNAMIC"], numerics="w8a8", backend="numba")
    taps = Taps([0])
    m.forward([1, 5, 7, 9], taps=taps)
    cand = tmp_path / "cand"
    cand.mkdir()
    for name, a in taps.arrays.items():
        np.save(cand / f"{name}.npy", a.view(np.uint16) if a.dtype == bfloat16 else a)
    layer = os.path.join(gm, next(c for c in os.listdir(gm) if "layer0" in c))
    report = compare_paths(layer, str(cand), Options())
    bad = [o for c in report["cases"] for o in c["outputs"] if o["verdict"] == "fail"]
    assert not bad, bad


# ---------------------------------------------------------------------- golden verdicts
@pytest.fixture(scope="module", params=["tiny-dense", "embedded-1b"])
def quant_matmul_cases(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("gq")
    out = []
    for mode in ("bf16", "fp16"):
        for case in operator_cases(request.param, ["quant_matmul", "dynamic_quant_matmul"],
                                   mode, tokens=16):
            out.append(write_case(str(d), case))
    return out


def _static_candidate(t, bug=None, backend=ops):
    x, dt = t["x"], t["x"].dtype
    r = ops.quant.static_input_reciprocal(t["input_scale"], dt)
    v = x.astype(np.float32) * r.astype(np.float32) + np.float32(t["input_offset"][0])
    if bug == "round_half_away":
        x_q = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -128, 127).astype(np.int8)
    elif bug == "no_clamp":
        x_q = np.rint(v).astype(np.int64).astype(np.int8)          # wraps around
    elif bug == "offset_subtracted":
        v = x.astype(np.float32) * r.astype(np.float32) - np.float32(t["input_offset"][0])
        x_q = np.clip(np.rint(v), -128, 127).astype(np.int8)
    elif bug == "divide_by_scale_not_reciprocal":
        v = x.astype(np.float32) / t["input_scale"].astype(np.float32) \
            + np.float32(t["input_offset"][0])
        x_q = np.clip(np.rint(v), -128, 127).astype(np.int8)
    else:
        x_q = np.clip(np.rint(v), -128, 127).astype(np.int8)
    acc = backend.int8_matmul(x_q, t["weight"])
    deq = ops.decode_deq_scale(t["deq_scale"])
    if bug == "deq_scale_int64_as_number":
        deq = t["deq_scale"].astype(np.float32)
    qb = None if bug == "no_quant_bias" else t["quant_bias"]
    y = ops.dequantize(acc, deq, dt, qb)
    if bug == "bias_after_dequant":
        y = ops.dequantize(acc, deq, dt)
        y = (y.astype(np.float32) + t["quant_bias"].astype(np.float32)).astype(dt)
    if bug == "transposed_weight_rows":
        y = y[:, ::-1]
    return {"x_q": x_q, "acc": acc, "y": y}


def _dynamic_candidate(t, bug=None, backend=ops):
    x, dt = t["x"], t["x"].dtype
    xa = x.astype(np.float32)
    amax = np.abs(xa).max(-1)
    s = amax / np.float32(128.0 if bug == "scale_over_128" else 127.0)
    safe = np.where(s > 0, s, 1).astype(np.float32)
    x_q = np.clip(np.rint(xa / safe[:, None]), -128, 127).astype(np.int8)
    acc = backend.int8_matmul(x_q, t["weight"])
    ws = t["weight_scale"].astype(np.float32).reshape(-1)
    y = acc.astype(np.float32) * ws
    if bug != "no_token_scale":
        y = y * s[:, None]
    if "bias" in t and bug != "no_bias":
        y = y + t["bias"].astype(np.float32)
    if bug == "correct_other_order":                 # (ws * t) first: a correct kernel
        y = acc.astype(np.float32) * (ws[None, :] * s[:, None])
        if "bias" in t:
            y = y + t["bias"].astype(np.float32)
    return {"x_q": x_q, "token_scale": s.astype(np.float32), "acc": acc, "y": y.astype(dt)}


STATIC_BUGS = ("round_half_away", "no_clamp", "offset_subtracted", "no_quant_bias",
               "bias_after_dequant", "transposed_weight_rows", "divide_by_scale_not_reciprocal")


def test_quant_matmul_goldens_fail_wrong_kernels_and_pass_correct_ones(quant_matmul_cases,
                                                                       tmp_path):
    """Every correct kernel passes every case; every bug fails at least one case of its
    operator in each mode (the tie case catches rounding and clamping, the calibrated one
    a division by input_scale)."""
    n = 0
    caught: dict = {}
    for case_dir in quant_matmul_cases:
        case = load_case(case_dir)
        t = {name: case.tensors[name] for name in case.tensors}
        static = case.manifest["operator"] == "quant_matmul"
        mode = case.manifest["numerics"]["mode"]
        make = _static_candidate if static else _dynamic_candidate
        correct = [make(t, backend=ops), make(t, backend=K)]
        if not static:
            correct.append(make(t, "correct_other_order"))
        for arrays in correct:
            n += 1
            got = candidate_verdicts(case_dir, tmp_path / f"ok{n}" / "cand", arrays)
            assert set(got.values()) == {"pass"}, (case_dir, got)
        bugs = STATIC_BUGS if static else ("scale_over_128", "no_token_scale") + \
            (("no_bias",) if "bias" in t else ())
        if static and mode == "fp16":
            bugs = bugs + ("deq_scale_int64_as_number",)
        for bug in bugs:
            n += 1
            with np.errstate(over="ignore"):      # a wrong deq_scale overflows fp16: the bug
                arrays = make(t, bug)
            got = candidate_verdicts(case_dir, tmp_path / f"bug{n}" / "cand", arrays)
            caught.setdefault((mode, bug), []).append("fail" in got.values())
    missed = sorted(k for k, v in caught.items() if not any(v))
    assert not missed, missed


@pytest.fixture(scope="module")
def moe_quant_cases(tmp_path_factory):
    d = tmp_path_factory.mktemp("gmq")
    return [write_case(str(d), c) for c in operator_cases(
        "tiny-moge", ["quant_grouped_matmul", "dequant_swiglu_quant"], "bf16", tokens=32)]


def _dsq_candidate(t, bug=None):
    acc, ws, act, gl = t["acc"], t["weight_scale"], t["activation_scale"], t["group_list"]
    counts = np.diff(np.r_[0, gl])
    group = np.repeat(np.arange(len(counts)), counts)
    if bug == "expert_off_by_one":
        group = np.minimum(group + 1, len(counts) - 1)
    R = int(gl[-1])
    v = torch.tensor(acc[:R]).float() * torch.tensor(ws)[group]
    if bug != "no_activation_scale":
        v = v * torch.tensor(act[:R])[:, None]
    I = v.shape[1] // 2
    g, u = (v[:, I:], v[:, :I]) if bug == "activate_right" else (v[:, :I], v[:, I:])
    h = torch.nn.functional.silu(g) * u                    # torch's exp: correct, different
    s = h.abs().amax(-1) / 127
    q = h / s[:, None]
    q = torch.trunc(q) if bug == "truncate" else torch.round(q)
    h_q = np.zeros((acc.shape[0], I), np.int8)
    scale = np.zeros(acc.shape[0], np.float32)
    h_q[:R] = torch.clamp(q, -128, 127).to(torch.int8).numpy()
    scale[:R] = s.numpy()
    return {"h_q": h_q, "scale": scale}


def test_moe_quant_goldens_fail_wrong_kernels_and_pass_correct_ones(moe_quant_cases, tmp_path):
    gmm, dsq = moe_quant_cases
    t = load_case(gmm).tensors
    acc = K.quant_grouped_matmul(t["x_q"], t["weights"], t["group_list"])
    y = ops.group_dequantize(acc, t["weight_scale"] * t["x_scale"][0], t["group_list"],
                             bfloat16)
    got = candidate_verdicts(gmm, tmp_path / "g1" / "cand", {"acc": acc, "y": y})
    assert set(got.values()) == {"pass"}
    shifted = ops.quant_grouped_matmul(t["x_q"], t["weights"][::-1].copy(), t["group_list"])
    got = candidate_verdicts(gmm, tmp_path / "g2" / "cand", {"acc": shifted, "y": y})
    assert got["acc"] == "fail"
    y_no_xscale = ops.group_dequantize(acc, t["weight_scale"], t["group_list"], bfloat16)
    got = candidate_verdicts(gmm, tmp_path / "g3" / "cand", {"acc": acc, "y": y_no_xscale})
    assert got["y"] == "fail"
    td = load_case(dsq).tensors
    crit = {e["name"]: e["criterion"]["name"] for e in load_case(dsq).manifest["tensors"]
            if e["role"] == "output"}
    assert crit["h_q"] == "exact"             # torch's silu below, NumPy's in the spec
    ok = candidate_verdicts(dsq, tmp_path / "d0" / "cand", _dsq_candidate(td))
    assert set(ok.values()) == {"pass"}, ok
    for i, bug in enumerate(("expert_off_by_one", "no_activation_scale", "activate_right",
                             "truncate")):
        got = candidate_verdicts(dsq, tmp_path / f"d{i + 1}" / "cand", _dsq_candidate(td, bug))
        assert got["h_q"] == "fail", (bug, got)


def _to_float(w, d, float_weights, prefixes):
    """Turn the quantised linears `prefixes` back to their float weights, marked FLOAT."""
    for p in prefixes:
        for n in [n for n in w if n.startswith(p + ".")]:
            del w[n]
            d.pop(n, None)
        for n in (p + ".weight", p + ".bias"):
            if n in float_weights:
                w[n], d[n] = float_weights[n], "FLOAT"


def test_a_partly_quantised_mlp_runs_each_linear_as_stored(quantised_default, tmp_path):
    """msModelSlim may leave single linears FLOAT (a sensitive down_proj, say): the MLP then
    runs gate and up in W8A8 and down as the float linear, never an int8 weight as a float."""
    _, fw = load_weights(DEFAULT_MODEL_DIR)
    down = "model.layers.0.mlp.down_proj"
    d = _break(quantised_default["W8A8"], str(tmp_path / "mixed"),
               lambda w, desc: _to_float(w, desc, fw, [down]))
    m = load_model(d, numerics="w8a8")
    assert down not in m.quant and "model.layers.0.mlp.gate_proj" in m.quant
    t = Taps([0])
    m.forward([1, 5, 9], taps=t)
    x = t["layers.0.post_norm"]
    pfx = "model.layers.0.mlp."
    want = ops.linear(ops.silu_and_mul(ops.w8a8_linear(x, m.quant_params(pfx + "gate_proj")),
                                       ops.w8a8_linear(x, m.quant_params(pfx + "up_proj"))),
                      m.w(down + ".weight"))
    assert np.array_equal(m.mlp(x, pfx).view(np.uint16), want.view(np.uint16))
    assert np.array_equal(t["layers.0.mlp_out"].view(np.uint16), want.view(np.uint16))
    # and the attention's q_proj alone FLOAT: the other projections stay W8A8
    q = "model.layers.1.self_attn.q_proj"
    d2 = _break(quantised_default["W8A8"], str(tmp_path / "mixed2"),
                lambda w, desc: _to_float(w, desc, fw, [q]))
    m2 = load_model(d2, numerics="w8a8")
    assert q not in m2.quant and "model.layers.1.self_attn.k_proj" in m2.quant
    assert np.isfinite(m2.forward([1, 5, 9]).astype(np.float32)).all()


def test_a_partly_quantised_expert_layer_is_refused(tiny_moge_dirs, tmp_path):
    float_dir, qdirs, _ = tiny_moge_dirs
    _, fw = load_weights(float_dir)
    d = _break(qdirs["W8A8"], str(tmp_path / "mixed"), lambda w, desc: _to_float(
        w, desc, fw, ["model.layers.0.mlp.experts.3.down_proj"]))
    with pytest.raises(CheckpointError, match="partly quantised expert layer"):
        load_model(d)
    assert "all or none" in one_line_error(cli("run", "--model", d, "--max-new-tokens", "1"))


def test_info_reports_the_quantisation(quantised_default):
    """info on a W8A8 directory: the scheme, the int8 linears, the C8 cache, and the bytes
    as stored (int8 weights: about two thirds of the bf16 model here, the embedding stays)."""
    from refimpl.commands.info import model_info

    info = model_info(quantised_default["W8A8_DYNAMIC"])
    c = info["config"]
    assert info["quantization"]["scheme"] == "W8A8_DYNAMIC"
    assert info["quantization"]["quantised_linears"] == 7 * c["num_hidden_layers"]
    assert info["quantization"]["kv_cache_type"] == "C8"
    w8a8, bf16 = info["memory"]["w8a8"], info["memory"]["bf16"]
    assert 0.5 < w8a8["weights_bytes"] / bf16["weights_bytes"] < 0.75
    assert w8a8["kv_cache_bytes_per_1000_tokens"] * 2 == bf16["kv_cache_bytes_per_1000_tokens"]
    assert model_info(DEFAULT_MODEL_DIR)["quantization"] is None
    out = cli("info", "--model", quantised_default["W8A8"], check_rc=0).stdout
    assert "quantised: W8A8 (msModelSlim)" in out and "KV cache float" in out
