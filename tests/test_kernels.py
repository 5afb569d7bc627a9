"""The Numba kernels (`refimpl.kernels`) against the NumPy spec (`refimpl.ops`).

Every accelerated operator is run on seeded random inputs of several shapes (odd sizes,
T = 1, a long T = 300) in each numerics mode and compared with the spec on the same inputs.
The error measure is normwise: err = max|kernel - spec| / max|spec|. Tolerances per mode:

=============================  ========  ========  ========  ========
operator class                 fp64      fp32      bf16      fp16
=============================  ========  ========  ========  ========
add, apply_rope (elementwise)  exact     exact     exact     exact
linear, rms_norm, swiglu,      1e-13     2e-6      1e-2      2e-3
moe_block, attention (decode
and the default prefill)
attention (flash=True)         1e-13     5e-6      2e-2      4e-3
moge_route weights             1e-13     1e-6      1e-6      1e-6
=============================  ========  ========  ========  ========

Why these numbers: the kernels sum dot products in a different order from BLAS (16 lanes
and a fixed tree), so in fp32/fp64 results differ by a few ulps of the accumulation dtype;
in bf16/fp16 that difference occasionally flips one rounding of the output, i.e. 1 ulp of
the storage dtype (2^-8 = 3.9e-3 relative for bf16, 2^-11 = 4.9e-4 for fp16) at the largest
element, with headroom for a second flip inside chained roundings (swiglu, moe). The flash
prefill keeps probabilities in float32 instead of rounding them and sums each score over the
head dimension in plain order (see kernels/attention.py), which may move an output by about
two storage ulps (1e-6 in fp32). moge_route returns float32 weights: only the softmax
summation order and exp differ. Float32 exp is the kernels' own `exp32` (at most 1 ulp,
tested below). Elementwise kernels have no reduction and must match bit for bit. Expert ids
must match exactly.

Worst normwise errors measured on these test inputs (fp64 / fp32 / bf16 / fp16): linear
1.1e-15 / 5.4e-7 / 7.9e-6 / 2.5e-4; rms_norm 3.2e-16 / 1.4e-7 / 0 / 0; swiglu 1.5e-15 /
9.1e-7 / 5.4e-3 / 3.4e-4; attention decode 1.6e-15 / 7.0e-7 / 2.4e-3 / 3.0e-4; flash
1.0e-15 / 1.2e-6 / 7.0e-3 / 7.1e-4; moe_block 4.4e-16 / 3.4e-7 / 0 / 3.3e-4; route weights
9.7e-16 / 3.1e-7 / 2.1e-7 / 2.1e-7; tiny models 5.3e-16 / 2.9e-7 / 6.2e-3 / 9.3e-4.

A whole tiny model with backend="numba" must give the numpy backend's logits within
`MODEL_TOL` (normwise, per mode), and prefill + cached decode must agree with one forward.
The thread-count test runs the kernels in subprocesses with NUMBA_NUM_THREADS=1 and =2 (and
REFIMPL_PARALLEL_MIN_WORK=0, so that even small inputs take the parallel paths) and compares
output hashes: they must be bit-identical.
"""

import hashlib
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numba
import numpy as np
import pytest

import refimpl
from refimpl import kernels as K
from refimpl import ops
from refimpl.errors import InputError
from refimpl.kernels import _dtypes
from refimpl.numerics import bfloat16, storage_dtype

from .conftest import near_midpoint

MODES = {"fp64": np.dtype(np.float64), "fp32": np.dtype(np.float32), "bf16": bfloat16,
         "fp16": np.dtype(np.float16)}
TOL = {  # operator class -> mode -> normwise tolerance (the table above)
    "reduce": {"fp64": 1e-13, "fp32": 2e-6, "bf16": 1e-2, "fp16": 2e-3},
    "flash": {"fp64": 1e-13, "fp32": 5e-6, "bf16": 2e-2, "fp16": 4e-3},
    "route": {"fp64": 1e-13, "fp32": 1e-6, "bf16": 1e-6, "fp16": 1e-6},
}
MODEL_TOL = {"fp64": 1e-12, "fp32": 1e-5, "bf16": 5e-2, "fp16": 1e-2}


def err(got, ref) -> float:
    got = np.asarray(got).astype(np.float64)
    ref = np.asarray(ref).astype(np.float64)
    assert got.shape == ref.shape
    return float(np.max(np.abs(got - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0),
                                                               1e-300))


def check(got, ref, cls, mode):
    assert got.dtype == ref.dtype
    e = err(got, ref)
    assert e <= TOL[cls][mode], f"{cls} {mode}: normwise error {e:.3g} > {TOL[cls][mode]:.3g}"


def bits(a) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint8)


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---------------------------------------------------------------------------- rounding helpers
def _all_float32_edges() -> np.ndarray:
    """Every bfloat16 value's float32 bits with low halves that hit exact ties, just-above and
    just-below ties and arbitrary patterns: every sign, exponent (subnormals, inf, NaN)."""
    hi = np.arange(65536, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234, 0xC000], dtype=np.uint32)
    return (hi[:, None] | lows[None, :]).reshape(-1).view(np.float32)


def test_bf16_rounding_helper_equals_ml_dtypes_exactly():
    f = _all_float32_edges()
    with np.errstate(all="ignore"):
        want = f.astype(ml_dtypes.bfloat16)
    got = K.round_to_bf16(f)
    assert got.dtype == bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("value_bits, expected", [
    (0x3F808000, 0x3F80),  # 1 + 2^-8: a tie, rounds down to the even 1.0
    (0x3F818000, 0x3F82),  # a tie with an odd last bit rounds up
    (0x3F808001, 0x3F81),  # just above the tie rounds up
    (0x00008000, 0x0000),  # smallest subnormal tie -> +0
    (0x00018000, 0x0002),  # subnormal tie to even (up)
    (0x7F7FFFFF, 0x7F80),  # float32 max rounds to inf
    (0xFF800000, 0xFF80),  # -inf stays
    (0x7F800001, 0x7FC0),  # signalling NaN -> quiet NaN
    (0xFFC00001, 0xFFC0),  # negative NaN keeps its sign
])
def test_bf16_rounding_named_cases(value_bits, expected):
    f = np.array([value_bits], np.uint32).view(np.float32)
    assert int(K.round_to_bf16(f).view(np.uint16)[0]) == expected
    with np.errstate(all="ignore"):
        assert int(f.astype(ml_dtypes.bfloat16).view(np.uint16)[0]) == expected


def test_f16_rounding_helper_equals_numpy():
    rng = np.random.default_rng(7)
    f = np.concatenate([_all_float32_edges(),
                        rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
                        .view(np.float32)])
    with np.errstate(all="ignore"):
        want = f.astype(np.float16)
    got = K.round_to_f16(f)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    # a payload that would vanish in 10 bits still gives a NaN, never inf
    assert np.isnan(K.round_to_f16(np.array([0x7F800001], np.uint32).view(np.float32))[0])


@numba.njit(cache=True)
def _widen_all(bits16, out_bf16, out_f16):
    for i in range(bits16.size):
        out_bf16[i] = _dtypes.bf16_bits_to_f32(bits16[i])
        out_f16[i] = _dtypes.f16_bits_to_f32(bits16[i])


def test_widening_is_exact_for_every_16_bit_pattern():
    b = np.arange(65536, dtype=np.uint16)
    got_bf, got_f16 = np.empty(65536, np.float32), np.empty(65536, np.float32)
    _widen_all(b, got_bf, got_f16)
    np.testing.assert_array_equal(got_bf.view(np.uint32),
                                  b.view(bfloat16).astype(np.float32).view(np.uint32))
    np.testing.assert_array_equal(got_f16.view(np.uint32),
                                  b.view(np.float16).astype(np.float32).view(np.uint32))


@numba.njit(cache=True)
def _exp32_all(x, out):
    for i in range(x.size):
        out[i] = _dtypes.exp32(x[i])


def test_exp32_is_within_one_ulp_of_exp():
    """Every 251st float32 in [-104, 89] (the full sweep measured 0.94 ulp at most), against
    exp in float64; overflow, underflow, subnormal results and NaN as NumPy."""
    pos = np.arange(0, np.float32(89.0).view(np.uint32) + 1, 251, dtype=np.uint32)
    neg = np.arange(0x80000000, np.float32(-104.0).view(np.uint32) + 1, 251, dtype=np.uint32)
    x = np.concatenate([pos, neg]).view(np.float32)
    got = np.empty_like(x)
    _exp32_all(x, got)
    exact = np.exp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        rounded = exact.astype(np.float32)
    finite = np.isfinite(rounded)
    ulp = np.maximum(np.spacing(np.abs(rounded[finite])).astype(np.float64), 2.0 ** -149)
    assert np.max(np.abs(got[finite] - exact[finite]) / ulp) <= 1.0
    np.testing.assert_array_equal(got[~finite], rounded[~finite])      # inf above 88.72
    edge = np.array([np.nan, np.inf, -np.inf, -103.9, -200.0, 0.0], np.float32)
    out = np.empty_like(edge)
    _exp32_all(edge, out)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, np.exp(edge))


# ---------------------------------------------------------------------------- operators vs spec
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("M, Kd, N", [(1, 37, 5), (3, 64, 19), (300, 33, 17), (9, 200, 130)])
def test_linear_matches_spec(mode, M, Kd, N):
    rng = np.random.default_rng(M * 1000 + N)
    dt = MODES[mode]
    x = randn(rng, (M, Kd), dt)
    w = randn(rng, (N, Kd), dt, Kd ** -0.5)
    b = randn(rng, N, dt, 0.1)
    check(K.linear(x, w, b), ops.linear(x, w, b), "reduce", mode)
    check(K.linear(x, w), ops.linear(x, w), "reduce", mode)


def test_linear_row_is_the_same_in_any_tile():
    """An output is the same dot product whether computed in a prefill tile (a lane GEMM,
    M >= ROWS_BELOW tokens), in a small group (two weight rows at a time, four tokens or one
    against the pair, an odd last row alone) or alone (the decode matvec): K with and
    without a tail past the last whole chunk, N with an overlapping last tile, the bias and
    gate-up's epilogue too."""
    import importlib
    L = importlib.import_module("refimpl.kernels.linear")
    rng = np.random.default_rng(3)
    for dt in MODES.values():
        for M, Kd, N in ((11, 77, 10), (6, 200, 21), (L.ROWS_BELOW - 1, 77, 33),
                         (L.ROWS_BELOW + 3, 96, 17), (3 * L.MR, 64, 40), (2 * L.ROWS_BELOW, 64, 40)):
            x = randn(rng, (M, Kd), dt)
            w, w2 = randn(rng, (N, Kd), dt, 0.1), randn(rng, (N, Kd), dt, 0.1)
            b = randn(rng, N, dt, 0.1)
            full, h = K.linear(x, w, b), L.gate_up(x, w, w2)
            for t in (0, 5, M - 1):
                assert np.array_equal(bits(K.linear(x[t:t + 1], w, b)), bits(full[t:t + 1]))
                assert np.array_equal(bits(L.gate_up(x[t:t + 1], w, w2)), bits(h[t:t + 1]))


_OTHER_BUILD = textwrap.dedent("""
    import sys
    import ml_dtypes, numpy as np
    from refimpl import kernels as K
    import importlib
    L = importlib.import_module("refimpl.kernels.linear")   # the module, not the function
    V = importlib.import_module("refimpl.kernels._vec")
    print(V.VECTOR_BITS, L.MR, L.NR)
    data = np.load(sys.argv[1])
    out = {}
    for key in [k for k in data.files if k.startswith("x_")]:
        tag = key[2:]
        x, w, w2 = data["x_" + tag], data["w_" + tag], data["u_" + tag]
        if tag.startswith("bf16"):
            x, w, w2 = (a.view(ml_dtypes.bfloat16) for a in (x, w, w2))
        elif tag.startswith("fp16"):
            x, w, w2 = (a.view(np.float16) for a in (x, w, w2))
        out["lin_" + tag] = np.ascontiguousarray(K.linear(x, w)).view(np.uint8)
        out["gu_" + tag] = np.ascontiguousarray(L.gate_up(x, w, w2)).view(np.uint8)
    np.savez(sys.argv[2], **out)
    """)

#: Numba told to compile for a narrower ISA than the host's (every x86-64 host runs it):
#: AVX2 code on an AVX-512 host (256-bit registers, 6-token tiles), SSE4.2 code on an AVX2
#: host (128-bit registers, no FMA instruction: llvm.fma becomes libm's exact fma)
NARROWER_ISA = {
    512: ("haswell", "+avx2,+fma,+avx,+sse4.2,+f16c,+bmi2,-avx512f,-avx512bw,-avx512vl,"
                     "-avx512dq,-avx512cd,-avx512vnni,-avx512bf16"),
    256: ("nehalem", "+sse4.2,-avx,-avx2,-fma,-f16c,-avx512f"),
}


def test_linear_bits_do_not_depend_on_the_isa_or_the_tile(tmp_path):
    """The prefill tile and the vector width follow the ISA (`kernels.linear.tile_shape`,
    `_vec.VECTOR_BITS`); every output is the same dot product whatever they are, so a
    process compiled for a narrower ISA, and one forced to another tile height, give the
    bits of this one (linear and gate-up, four modes, K with tails, edge tiles)."""
    import importlib
    L = importlib.import_module("refimpl.kernels.linear")
    V = importlib.import_module("refimpl.kernels._vec")
    rng = np.random.default_rng(5)
    arrays, here = {}, {}
    for mode in ("bf16", "fp32", "fp16", "fp64"):
        dt = MODES[mode]
        for M, Kd, N in ((37, 77, 19), (64, 256, 96), (13, 2048 + 48, 33)):
            tag = f"{mode}_{M}"
            x, w = randn(rng, (M, Kd), dt), randn(rng, (N, Kd), dt, Kd ** -0.5)
            w2 = randn(rng, (N, Kd), dt, Kd ** -0.5)
            raw = (lambda a: a.view(np.uint16)) if mode in ("bf16", "fp16") else (lambda a: a)
            arrays["x_" + tag], arrays["w_" + tag], arrays["u_" + tag] = raw(x), raw(w), raw(w2)
            here["lin_" + tag] = bits(K.linear(x, w))
            here["gu_" + tag] = bits(L.gate_up(x, w, w2))
    np.savez(tmp_path / "in.npz", **arrays)
    cpu, features = NARROWER_ISA.get(V.VECTOR_BITS, NARROWER_ISA[256])
    builds = {"narrower ISA": dict(NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features),
              "other tile": dict(REFIMPL_TILE=f"{L.MR + 1}x{48 if L.NR != 48 else 16}")}
    for name, env in builds.items():
        out = tmp_path / f"out-{len(env)}.npz"
        p = subprocess.run([sys.executable, "-c", _OTHER_BUILD, str(tmp_path / "in.npz"),
                            str(out)], capture_output=True, text=True,
                           env=dict(os.environ, **env), timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        bits_, mr, nr = (int(v) for v in p.stdout.split()[-3:])
        assert (bits_, mr, nr) != (V.VECTOR_BITS, L.MR, L.NR), f"{name}: the build did not change"
        theirs = np.load(out)
        for tag, y in here.items():
            assert np.array_equal(y, theirs[tag]), f"{name}: {tag}"


def test_linear_keeps_leading_dims_and_falls_back_for_dtype_mixes():
    rng = np.random.default_rng(4)
    x = randn(rng, (2, 3, 16), np.float32)
    w = randn(rng, (5, 16), np.float32)
    assert K.linear(x, w).shape == (2, 3, 5)
    check(K.linear(x, w), ops.linear(x, w), "reduce", "fp32")
    w64 = w.astype(np.float64)   # float32 x with float64 W: the spec rounds W; kernel defers
    np.testing.assert_array_equal(K.linear(x, w64), ops.linear(x, w64))
    wbf = w.astype(bfloat16)     # mixed half/float32 operands are exact in float32: kernel
    check(K.linear(x, wbf), ops.linear(x, wbf), "reduce", "fp32")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 64), (300, 33), (2, 1536)])
def test_rms_norm_matches_spec(mode, shape):
    rng = np.random.default_rng(shape[0])
    dt = MODES[mode]
    x = randn(rng, shape, dt, 3.0)
    w = (1 + randn(rng, shape[-1], np.float32, 0.1)).astype(dt)
    check(K.rms_norm(x, w, 1e-5), ops.rms_norm(x, w, 1e-5), "reduce", mode)


def test_rms_norm_rounds_before_the_weight():
    """The spec's cast point: n = round(x * inv_rms), then round(w * n). Small-integer inputs
    make the sum of squares exact in any order, so kernel and spec agree bit for bit, and
    rounding only once (the other possible convention) gives different values."""
    rng = np.random.default_rng(5)
    x = rng.integers(-8, 9, (64, 128)).astype(bfloat16)
    w = np.full(128, 1 + 2.0 ** -7, bfloat16)
    got = K.rms_norm(x, w, 1e-5)
    np.testing.assert_array_equal(bits(got), bits(ops.rms_norm(x, w, 1e-5)))
    xa = x.astype(np.float32)
    inv = 1 / np.sqrt(np.mean(xa * xa, axis=-1, keepdims=True) + np.float32(1e-5))
    once = (w.astype(np.float32) * xa * inv).astype(bfloat16)
    assert np.count_nonzero(got != once) > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 1536), (37, 45), (2, 5, 64), (300, 128)])
def test_add_rms_norm_matches_spec(mode, shape):
    """x_sum is elementwise: bit-equal to the spec's. y within the rms_norm tolerance and
    rstd within 4 ulps of the accumulation dtype (the sum of squares in another order)."""
    rng = np.random.default_rng(shape[-1])
    dt = MODES[mode]
    x, res = randn(rng, shape, dt, 3.0), randn(rng, shape, dt, 3.0)
    w = (1 + randn(rng, shape[-1], np.float32, 0.1)).astype(dt)
    y, x_sum, rstd = K.add_rms_norm(x, res, w, 1e-5)
    y_s, x_sum_s, rstd_s = ops.add_rms_norm(x, res, w, 1e-5)
    np.testing.assert_array_equal(bits(x_sum), bits(x_sum_s))
    check(y, y_s, "reduce", mode)
    assert rstd.dtype == rstd_s.dtype and rstd.shape == shape[:-1] + (1,)
    assert np.all(np.abs(rstd - rstd_s) <= 4 * np.spacing(rstd_s)), mode


@pytest.mark.parametrize("mode", MODES)
def test_add_rms_norm_equals_the_spec_bit_for_bit_on_exact_inputs(mode):
    """Small multiples of a power of two: x + residual and the sum of squares are exact in
    any order, so all three outputs equal the spec's bits, in every mode."""
    dt = storage_dtype(mode)
    x, res = _exact((33, 96), -8, 9, 2, dt, 1), _exact((33, 96), -8, 9, 3, dt, 2)
    w = _exact((96,), 1, 9, 3, dt, 3)
    for got, want in zip(K.add_rms_norm(x, res, w, 1e-6), ops.add_rms_norm(x, res, w, 1e-6)):
        np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T, heads, D", [(1, 12, 128), (7, 3, 10), (300, 2, 8)])
def test_apply_rope_is_bit_exact(mode, T, heads, D):
    rng = np.random.default_rng(T)
    dt = MODES[mode]
    x = randn(rng, (T, heads, D), dt)
    for angle_dtype in (np.float64, np.float32):
        cos, sin = ops.rope_tables(np.arange(40, 40 + T), D, 4e6, dtype=angle_dtype)
        assert np.array_equal(bits(K.apply_rope(x, cos, sin)), bits(ops.apply_rope(x, cos, sin)))


@pytest.mark.parametrize("mode", MODES)
def test_add_is_bit_exact(mode):
    rng = np.random.default_rng(6)
    dt = MODES[mode]
    for shape in [(1, 7), (300, 33)]:
        x, y = randn(rng, shape, dt), randn(rng, shape, dt)
        assert np.array_equal(bits(K.add(x, y)), bits(ops.add(x, y)))


ATTN_SHAPES = [  # T, S, Hq, Hkv, D
    (1, 1, 4, 2, 8), (1, 37, 12, 6, 16), (1, 300, 4, 1, 32),
    (5, 5, 4, 4, 18), (70, 70, 6, 2, 32), (33, 100, 2, 1, 64), (300, 300, 2, 1, 16),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T, S, Hq, Hkv, D", ATTN_SHAPES)
def test_attention_matches_spec(mode, T, S, Hq, Hkv, D):
    rng = np.random.default_rng(T * 7 + S)
    dt = MODES[mode]
    q, k, v = randn(rng, (T, Hq, D), dt), randn(rng, (S, Hkv, D), dt), randn(rng, (S, Hkv, D), dt)
    ref = ops.attention(q, k, v)
    check(K.attention(q, k, v, flash=False), ref, "reduce", mode)   # exact cast points
    check(K.attention(q, k, v, flash=True), ref, "flash", mode)     # online softmax
    check(K.attention(q, k, v), ref, "reduce", mode)                # default: exact cast points


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_attention_without_mask_and_with_scale(mode):
    rng = np.random.default_rng(8)
    dt = MODES[mode]
    q, k, v = randn(rng, (9, 4, 16), dt), randn(rng, (13, 2, 16), dt), randn(rng, (13, 2, 16), dt)
    for flash in (False, True):
        check(K.attention(q, k, v, causal=False, scale=0.3, flash=flash),
              ops.attention(q, k, v, causal=False, scale=0.3), "flash", mode)


def test_attention_rejects_what_the_spec_rejects():
    q = np.zeros((3, 6, 8), np.float32)
    with pytest.raises(InputError, match="do not divide"):
        K.attention(q, np.zeros((3, 4, 8), np.float32), np.zeros((3, 4, 8), np.float32))
    with pytest.raises(InputError, match="causal rows"):
        K.attention(q, np.zeros((2, 3, 8), np.float32), np.zeros((2, 3, 8), np.float32))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T, H, I", [(1, 64, 160), (7, 33, 50), (300, 24, 20)])
def test_swiglu_matches_spec(mode, T, H, I):
    rng = np.random.default_rng(T + H)
    dt = MODES[mode]
    x = randn(rng, (T, H), dt)
    wg, wu = randn(rng, (I, H), dt, H ** -0.5), randn(rng, (I, H), dt, H ** -0.5)
    wd = randn(rng, (H, I), dt, I ** -0.5)
    check(K.swiglu(x, wg, wu, wd), ops.swiglu(x, wg, wu, wd), "reduce", mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 7, 300])
def test_moge_route_matches_spec(mode, T):
    rng = np.random.default_rng(T)
    dt = MODES[mode]
    logits = randn(rng, (T, 64), dt, 2.0)
    scale = rng.uniform(0.5, 1.5, (1, 64)).astype(dt)
    ids, w = K.moge_route(logits, scale, 8)
    ids_ref, w_ref = ops.moge_route(logits, scale, 8)
    np.testing.assert_array_equal(ids, ids_ref)
    assert ids.dtype == np.int64 and w.dtype == w_ref.dtype
    check(w, w_ref, "route", mode)


def test_moge_route_ties_go_to_the_lowest_id():
    logits = np.zeros((2, 16), np.float32)
    logits[1, [5, 6]] = 3.0             # tie inside group 1 (experts 4..7)
    ids, w = K.moge_route(logits, np.ones(16, np.float32), 4)
    np.testing.assert_array_equal(ids[0], [0, 4, 8, 12])
    np.testing.assert_array_equal(ids[1], [0, 5, 8, 12])
    np.testing.assert_array_equal(ids, ops.moge_route(logits, np.ones(16, np.float32), 4)[0])


class _Experts:
    """experts[e] for a list of weights, remembering which experts were read."""

    def __init__(self, weights):
        self.weights, self.read = weights, set()

    def __getitem__(self, e):
        self.read.add(int(e))
        return self.weights[int(e)]

    def __len__(self):
        return len(self.weights)


def _moe_inputs(rng, dt, T, H=24, E=16, G=4, I=20):
    x = randn(rng, (T, H), dt)
    gate = randn(rng, (E, H), dt)
    scale = rng.uniform(0.5, 1.5, (1, E)).astype(dt)
    experts = [tuple(randn(rng, s, dt, 0.25) for s in [(I, H), (I, H), (H, I)])
               for _ in range(E)]
    shared = tuple(randn(rng, s, dt, 0.25) for s in [(2 * I, H), (2 * I, H), (H, 2 * I)])
    return x, gate, scale, experts, shared, G


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 5, 300])
def test_moe_block_matches_spec_and_records_the_same(mode, T):
    rng = np.random.default_rng(T + 11)
    x, gate, scale, experts, shared, G = _moe_inputs(rng, MODES[mode], T)
    got_rec, ref_rec = {}, {}
    ex = _Experts(experts)
    got = K.moe_block(x, gate, scale, ex, shared, G, record=got_rec.__setitem__)
    ref = ops.moe_block(x, gate, scale, experts, shared, G, record=ref_rec.__setitem__)
    check(got, ref, "reduce", mode)
    assert sorted(got_rec) == sorted(ref_rec)
    np.testing.assert_array_equal(got_rec["expert_ids"], ref_rec["expert_ids"])
    assert ex.read == set(np.unique(ref_rec["expert_ids"]).tolist())  # only selected experts
    for name, arr in ref_rec.items():
        if name.endswith("token_idx") or name.endswith(".in"):
            np.testing.assert_array_equal(got_rec[name], arr)


# ---------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moge"])
@pytest.mark.parametrize("mode", MODES)
def test_tiny_model_numba_equals_numpy(preset, mode):
    ids = np.array([1, 17, 99, 3, 250, 42, 7, 7, 0, 128, 64])
    ref = refimpl.init_model(preset, seed=2, numerics=mode, backend="numpy").forward(ids)
    got = refimpl.init_model(preset, seed=2, numerics=mode, backend="numba").forward(ids)
    assert got.dtype == ref.dtype
    e = err(got, ref)
    assert e <= MODEL_TOL[mode], f"{preset} {mode}: {e:.3g}"


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moge"])
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_numba_prefill_then_cached_decode(preset, mode):
    model = refimpl.init_model(preset, seed=3, numerics=mode, backend="numba")
    ids = np.array([1, 5, 9, 200, 31, 77, 4, 12, 150, 2])
    full = model.forward(ids)
    cache = model.new_cache(4)            # small, so the cache grows while decoding
    steps = [model.forward(ids[:6], cache, last_only=True)]
    for t in range(6, len(ids)):
        steps.append(model.forward(ids[t:t + 1], cache))
    assert cache.length == len(ids)
    got = np.concatenate(steps)
    e = err(got, full[5:])
    assert e <= MODEL_TOL[mode], f"{preset} {mode}: {e:.3g}"
    assert np.array_equal(np.argmax(got, -1), np.argmax(full[5:], -1)) or mode == "bf16"


# ---------------------------------------------------------------------------- threads
_THREAD_SCRIPT = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    import refimpl
    from refimpl import kernels as K
    from refimpl.numerics import bfloat16
    h = hashlib.sha256()
    for dt in (np.float32, bfloat16, np.float16, np.float64):
        rng = np.random.default_rng(0)
        r = lambda *s: rng.standard_normal(s).astype(dt)
        x, w, b = r(37, 40), r(45, 40), r(45)
        q, k, v = r(37, 6, 16), r(37, 2, 16), r(37, 2, 16)
        cos, sin = refimpl.ops.rope_tables(np.arange(37), 16, 1e4)
        outs = [K.linear(x, w, b), K.linear(x[:1], w), K.rms_norm(x, w[0], 1e-5),
                K.apply_rope(q, cos, sin), K.attention(q, k, v), K.attention(q[:1], k, v),
                K.add(x, x), K.swiglu(x, w, w, r(40, 45)), K.moge_route(r(37, 16), r(16), 4)[1],
                K.attention_varlen(q[:12], k, v, np.array([1, 9, 2]), np.array([5, 30, 2])),
                *K.add_rms_norm(x, x[::-1], w[0], 1e-5),
                K.paged_attention(q[:2], k[:32].reshape(4, 8, 2, 16), v[:32].reshape(4, 8, 2, 16),
                                  np.array([[3, 1], [0, 2]], np.int32), np.array([9, 16]))]
        experts = [(r(8, 40), r(8, 40), r(40, 8)) for _ in range(16)]
        outs.append(K.moe_block(x, r(16, 40), np.abs(r(1, 16)), experts,
                                (r(8, 40), r(8, 40), r(40, 8)), 4))
        for o in outs:
            h.update(np.ascontiguousarray(o).tobytes())
    m = refimpl.init_model("tiny-moge", seed=1, numerics="bf16", backend="numba")
    h.update(m.forward(np.arange(1, 40)).tobytes())
    import numba
    print(numba.get_num_threads(), h.hexdigest())
""")


def test_results_do_not_depend_on_the_thread_count():
    """Every kernel's parallel form (`kernels._jit.driver`, REFIMPL_PARALLEL_MIN_WORK=0: taken
    however small the inputs) on 1 and on 2 threads, and every kernel's serial form (a
    threshold no input reaches), give the same bits."""
    digests = {}
    for n, min_work in ((1, "0"), (2, "0"), (2, str(1 << 62))):
        env = dict(os.environ, NUMBA_NUM_THREADS=str(n), REFIMPL_PARALLEL_MIN_WORK=min_work)
        res = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT], env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        threads, digest = res.stdout.split()[-2:]
        assert int(threads) == n
        digests[n, min_work] = digest
    assert len(set(digests.values())) == 1, digests


# ---------------------------------------------------------------------------- real shapes
@pytest.mark.slow
def test_real_shapes_embedded_1b_layer():
    """The operators at the Embedded-1B shapes (hidden 1536, 12/6 heads of 128, MLP 6144) in
    bf16, T = 1 and T = 300 against the spec."""
    rng = np.random.default_rng(10)
    dt = bfloat16
    H, I, D = 1536, 6144, 128
    wq = randn(rng, (12 * D, H), dt, H ** -0.5)
    wg, wu = randn(rng, (I, H), dt, H ** -0.5), randn(rng, (I, H), dt, H ** -0.5)
    wd = randn(rng, (H, I), dt, I ** -0.5)
    for T in (1, 300):
        x = randn(rng, (T, H), dt)
        check(K.linear(x, wq), ops.linear(x, wq), "reduce", "bf16")
        check(K.swiglu(x, wg, wu, wd), ops.swiglu(x, wg, wu, wd), "reduce", "bf16")
        q, k, v = randn(rng, (T, 12, D), dt), randn(rng, (300, 6, D), dt), randn(rng, (300, 6, D), dt)
        check(K.attention(q, k, v), ops.attention(q, k, v), "reduce", "bf16")


def test_kernels_compile_at_their_own_llvm_level_and_leave_numbas_alone():
    """`kernels._jit.jit` holds Numba's optimisation level at KERNEL_OPT while one of our
    functions compiles (seen from inside the compile, where a callee is typed) and restores
    the process's level after; a `driver`'s two forms are cached under their own names (Numba's
    cache does not key on compile options) and compute the same."""
    from numba import types
    from numba.core import config
    from numba.extending import intrinsic

    from refimpl.kernels import _jit

    seen = []

    @intrinsic
    def probe(typingctx):
        seen.append(int(config.OPT))
        return types.int64(), lambda context, builder, sig, args: context.get_constant(
            types.int64, 1)

    def body(n):
        return n + probe()

    before = config.OPT
    f = _jit.jit()(body)
    assert f(41) == 42
    assert seen == [_jit.KERNEL_OPT] and config.OPT == before

    def loop(a, out):
        for i in numba.prange(a.size):
            out[i] = a[i] * 2.0

    d = _jit.Driver(loop)
    assert d.serial.py_func.__qualname__ != d.parallel.py_func.__qualname__
    a = np.arange(100.0)
    out1, out2 = np.empty_like(a), np.empty_like(a)
    d[False](a, out1)
    d[True](a, out2)
    assert np.array_equal(out1, out2) and np.array_equal(out1, 2 * a)


def test_the_numba_cache_is_keyed_on_every_kernel_source(tmp_path):
    """Compiled code is looked up in a directory named after a hash of all kernels/*.py:
    an edit to a helper module (which Numba's own index does not notice) changes it."""
    import shutil

    import numba

    from refimpl.kernels import _cache

    here = os.path.dirname(_cache.__file__)
    assert numba.config.CACHE_DIR == _cache.cache_dir(here)
    assert os.path.basename(numba.config.CACHE_DIR) == f"numba-{_cache.source_hash(here)}"
    copy = tmp_path / "kernels"
    shutil.copytree(here, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert _cache.source_hash(str(copy)) == _cache.source_hash(here)
    with open(copy / "_vec.py", "a") as fh:
        fh.write("\n# an edit\n")
    assert _cache.source_hash(str(copy)) != _cache.source_hash(here)


# ---------------------------------------------------------------------- bit for bit on exact inputs
def _exact(shape, lo, hi, shift, dtype, seed):
    """Integers in [lo, hi) times 2**-shift: every summation order gives the same sum."""
    return (np.random.default_rng(seed).integers(lo, hi, size=shape) * 2.0 ** -shift).astype(dtype)


def _exact_moe_inputs(dt, T, E=16, G=4, H=32, I=24):
    """A MoGE block's inputs whose every sum is exact (`_exact`)."""
    x = _exact((T, H), 0, 4, 2, dt, T)
    gate = _exact((E, H), -3, 4, 3, dt, 1)
    scale = _exact((1, E), 2, 7, 2, dt, 2)
    experts = [(_exact((I, H), -1, 3, 2, dt, 10 * e), _exact((I, H), -1, 3, 2, dt, 10 * e + 1),
                _exact((H, I), -2, 3, 3, dt, 10 * e + 2)) for e in range(E)]
    shared = (_exact((40, H), -1, 3, 2, dt, 3), _exact((40, H), -1, 3, 2, dt, 4),
              _exact((H, 40), -2, 3, 3, dt, 5))
    return x, gate, scale, experts, shared, G


EXACT_MODES = ("fp64", "fp32", "bf16", "fp16")
#: modes where the operators below can be exact: their intermediates (silu(g) * u, the
#: probabilities) are rounded to an 8- or 11-bit significand, so the next product's sum is
#: exact in float32 too. In fp32/fp64 those intermediates are arbitrary floats (and silu's
#: exp is the kernels' exp32, within 1 ulp of NumPy's), so no input makes the later sums
#: order-independent: there the invariant is the error bound of the tests above (TOL).
HALF_MODES = ("bf16", "fp16")


@pytest.mark.parametrize("mode", EXACT_MODES)
@pytest.mark.parametrize("M, Kd, N", [(1, 64, 37), (33, 96, 130), (128, 256, 72)])
def test_linear_equals_the_spec_bit_for_bit_on_exact_inputs(mode, M, Kd, N):
    dt = storage_dtype(mode)
    x, w = _exact((M, Kd), -8, 9, 3, dt, M), _exact((N, Kd), -8, 9, 4, dt, N)
    b = _exact((N,), -8, 9, 5, dt, Kd)
    np.testing.assert_array_equal(bits(K.linear(x, w, b)), bits(ops.linear(x, w, b)))


@pytest.mark.parametrize("mode", HALF_MODES)
@pytest.mark.parametrize("T, H, I", [(1, 64, 96), (37, 48, 40), (64, 128, 160)])
def test_swiglu_equals_the_spec_bit_for_bit_on_exact_inputs(mode, T, H, I):
    dt = storage_dtype(mode)
    x = _exact((T, H), 0, 4, 2, dt, T)
    wg, wu = _exact((I, H), -1, 3, 2, dt, H), _exact((I, H), -1, 3, 2, dt, I)
    wd = _exact((H, I), -2, 3, 3, dt, H + I)
    np.testing.assert_array_equal(bits(K.swiglu(x, wg, wu, wd)), bits(ops.swiglu(x, wg, wu, wd)))


@pytest.mark.parametrize("mode", HALF_MODES)
@pytest.mark.parametrize("T", [1, 40])
def test_moe_block_equals_the_spec_bit_for_bit_on_exact_inputs(mode, T):
    dt = storage_dtype(mode)
    x, gate, scale, experts, shared, G = _exact_moe_inputs(dt, T)
    got, want = {}, {}
    y = K.moe_block(x, gate, scale, experts, shared, G, record=got.__setitem__)
    ref = ops.moe_block(x, gate, scale, experts, shared, G, record=want.__setitem__)
    np.testing.assert_array_equal(got["expert_ids"], want["expert_ids"])
    np.testing.assert_array_equal(bits(y), bits(ref))


@pytest.mark.parametrize("mode, T, S, Hq, Hkv, D", [
    (m, *shape) for m in HALF_MODES for shape in
    ((1, 37, 4, 2, 16), (16, 16, 4, 2, 16), (48, 64, 8, 2, 64))] + [
    ("bf16", 1, 300, 12, 6, 128), ("bf16", 70, 200, 12, 6, 128)])
def test_attention_equals_the_spec_bit_for_bit_on_exact_inputs(mode, T, S, Hq, Hkv, D):
    """Decode (T = 1) and the blocked prefill kernel: scores and p @ v exact in float32
    (small integers over powers of two, probabilities in a few binades). The probabilities
    come from a float32 exp, which differs between NumPy and the kernels' exp32 by up to an
    ulp, and the denominator is summed in another order: rows with a probability within 8
    float32 ulps of a rounding midpoint are left out (`near_midpoint`), every other row is
    bit-equal. float16's 11-bit probabilities sit near a midpoint too often for rows of
    hundreds of keys, so fp16 is checked on rows of up to 64. The flash kernel (flash=True)
    keeps p in float32 and is not expected to be bit-equal."""
    dt = storage_dtype(mode)
    q = _exact((T, Hq, D), -2, 3, 2, dt, T)
    k = _exact((S, Hkv, D), -2, 3, 2, dt, S)
    v = _exact((S, Hkv, D), -4, 5, 1, dt, S + 1)
    kv = np.arange(Hq) // (Hq // Hkv)
    qa, ka = q.astype(np.float32).transpose(1, 0, 2), k.astype(np.float32)[:, kv].transpose(1, 2, 0)
    scores = ((qa @ ka).astype(dt).astype(np.float32) * np.float32(D ** -0.5)).astype(dt)
    scores = np.where(ops.causal_mask(T, S)[None], scores.astype(np.float32), -np.inf)
    p32 = ops.softmax(scores)                                        # [Hq, T, S] float32
    p = p32.astype(dt).astype(np.float64)
    va = v.astype(np.float64)[:, kv].transpose(1, 0, 2)
    assert np.array_equal(p.astype(np.float32) @ va.astype(np.float32), p @ va)  # exact sums
    ambiguous = near_midpoint(p32, dt, ulps=8).any(axis=-1).T       # [T, Hq] rows
    assert ambiguous.mean() <= 0.25, ambiguous.mean()   # most rows are judged
    got, want = bits(K.attention(q, k, v, causal=True)), bits(ops.attention(q, k, v, causal=True))
    print(f"kernels | attention {mode} T={T} S={S}: {int(ambiguous.sum())} of {ambiguous.size} "
          f"rows near a midpoint, {int((got != want).any(axis=-1).sum())} rows differ")
    np.testing.assert_array_equal(got[~ambiguous], want[~ambiguous])


# ---------------------------------------------------------------------- paged decode
def _paged_inputs(rng, dt, lens, bs, Hq=8, Hkv=2, D=64):
    """A paged cache (shuffled blocks, NaN in every unowned slot) holding contiguous
    per-sequence keys and values, and the block tables."""
    nb = sum(-(-n // bs) for n in lens) + 2
    tables, slots = ops.allocate_blocks(lens, bs, rng.permutation(nb))
    kc = np.full((nb * bs, Hkv, D), np.nan, np.float32).astype(dt)
    vc = kc.copy()
    keys, values = [], []
    for n, sl in zip(lens, slots):
        keys.append(randn(rng, (n, Hkv, D), dt))
        values.append(randn(rng, (n, Hkv, D), dt))
        kc[sl], vc[sl] = keys[-1], values[-1]
    shape = (nb, bs, Hkv, D)
    return (randn(rng, (len(lens), Hq, D), dt), kc.reshape(shape), vc.reshape(shape), tables,
            np.array(lens, np.int32), keys, values)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bs", [128, 16])
def test_paged_attention_kernel_equals_the_decode_kernel_bit_for_bit(mode, bs):
    """Through the block table, in place: the same bits as the contiguous decode kernel on
    the gathered keys, context lengths 1, 127, 128, 129 and 4097; within the decode
    tolerance of the spec; NaN slots outside the tables are never read."""
    rng = np.random.default_rng(bs)
    dt = storage_dtype(mode)
    q, kc, vc, tables, lens, keys, values = _paged_inputs(rng, dt, [1, 127, 128, 129, 4097], bs)
    got = K.paged_attention(q, kc, vc, tables, lens)
    assert np.isfinite(got.astype(np.float64)).all()
    for b in range(len(lens)):
        want = K.attention(q[b:b + 1], keys[b], values[b], causal=True)
        np.testing.assert_array_equal(bits(got[b:b + 1]), bits(want))
    check(got, ops.paged_attention(q, kc, vc, tables, lens), "reduce", mode)


# ---------------------------------------------------------------------- packed sequences
def _varlen_inputs(rng, dt, q_lens, kv_lens, Hq=8, Hkv=2, D=64):
    q_lens, kv_lens = np.array(q_lens, np.int32), np.array(kv_lens, np.int32)
    return (randn(rng, (int(q_lens.sum()), Hq, D), dt), randn(rng, (int(kv_lens.sum()), Hkv, D), dt),
            randn(rng, (int(kv_lens.sum()), Hkv, D), dt), q_lens, kv_lens)


def _per_sequence(fn, q, k, v, q_lens, kv_lens):
    qs, ks = np.cumsum(np.r_[0, q_lens]), np.cumsum(np.r_[0, kv_lens])
    return [fn(q[qs[b]:qs[b + 1]], k[ks[b]:ks[b + 1]], v[ks[b]:ks[b + 1]])
            for b in range(len(q_lens))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunked", [False, True])
def test_attention_varlen_kernel_is_the_blocked_kernel_per_sequence(mode, chunked):
    """One parallel loop over the whole batch: each sequence of more than one query is
    bit-equal to the blocked prefill kernel on that sequence alone (which equals the spec
    bit for bit on exact inputs, above); every sequence (one-query ones included) is within
    the prefill tolerance of the spec. Lengths 1, 127, 128, 129, an odd 301 and 4097; a
    sequence with no new queries."""
    rng = np.random.default_rng(5)
    dt = storage_dtype(mode)
    kv_lens = [1, 127, 128, 129, 301, 4097, 6]
    q_lens = [1, 40, 1, 129, 7, 33, 0] if chunked else kv_lens
    q, k, v, ql, kl = _varlen_inputs(rng, dt, q_lens, kv_lens)
    got = K.attention_varlen(q, k, v, ql, kl)
    check(got, ops.attention_varlen(q, k, v, ql, kl), "reduce", mode)
    qs = np.cumsum(np.r_[0, ql])
    for b, want in enumerate(_per_sequence(lambda *a: K.attention(*a, causal=True),
                                           q, k, v, ql, kl)):
        if ql[b] > 1:
            np.testing.assert_array_equal(bits(got[qs[b]:qs[b + 1]]), bits(want))


def test_attention_varlen_kernel_non_causal_and_refusals():
    rng = np.random.default_rng(6)
    q, k, v, ql, kl = _varlen_inputs(rng, np.float32, [3, 50], [9, 40])
    check(K.attention_varlen(q, k, v, ql, kl, causal=False, scale=0.2),
          ops.attention_varlen(q, k, v, ql, kl, causal=False, scale=0.2), "reduce", "fp32")
    with pytest.raises(InputError, match="sequence 1: 50 queries but 40 keys"):
        K.attention_varlen(q, k, v, ql, kl)
    with pytest.raises(InputError, match="q_lens sum to 52"):
        K.attention_varlen(q, k, v, np.array([3, 49]), kl, causal=False)


@pytest.mark.slow
def test_attention_varlen_kernel_at_32768_positions():
    """A chunk of 100 queries at the end of a 32768-position sequence beside short ones, at
    the embedded-1b attention shape: bit-equal to the blocked kernel alone, within the
    tolerance of the spec."""
    rng = np.random.default_rng(8)
    q, k, v, ql, kl = _varlen_inputs(rng, bfloat16, [100, 1, 5], [32768, 3, 5], 12, 6, 128)
    got = K.attention_varlen(q, k, v, ql, kl)
    np.testing.assert_array_equal(bits(got[:100]), bits(K.attention(q[:100], k[:32768],
                                                                    v[:32768])))
    check(got, ops.attention_varlen(q, k, v, ql, kl), "reduce", "bf16")


def test_paged_attention_kernel_refuses_what_the_spec_refuses():
    cache = np.zeros((4, 8, 1, 2), np.float32)
    q = np.ones((1, 2, 2), np.float32)
    with pytest.raises(InputError, match="block table entry 9 is outside"):
        K.paged_attention(q, cache, cache.copy(), np.array([[9]], np.int32), np.array([3]))
    with pytest.raises(InputError, match="share memory"):
        K.paged_attention(q, cache, cache, np.array([[0]], np.int32), np.array([3]))


@pytest.mark.slow
def test_paged_attention_kernel_at_32768_positions():
    rng = np.random.default_rng(7)
    q, kc, vc, tables, lens, keys, values = _paged_inputs(rng, bfloat16, [32768, 5], 128,
                                                          Hq=12, Hkv=6, D=128)
    got = K.paged_attention(q, kc, vc, tables, lens)
    np.testing.assert_array_equal(bits(got[:1]), bits(K.attention(q[:1], keys[0], values[0])))


# ---------------------------------------------------------------------------- MoE stages
@pytest.mark.parametrize("conv", ["v1", "v2"])
@pytest.mark.parametrize("N, K_, E", [(1, 8, 64), (7, 3, 12), (129, 8, 64), (5, 2, 40)])
def test_moe_dispatch_kernel_is_the_spec(conv, N, K_, E):
    rng = np.random.default_rng(N + E)
    ids = rng.integers(0, E // 2 if E > 12 else E, (N, K_))     # experts with no tokens
    x = randn(rng, (N, 9), bfloat16)
    got, want = K.moe_dispatch(ids, E, conv, x), ops.moe_dispatch(ids, E, conv, x)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(bits(got[name]), bits(want[name]), err_msg=name)
    with pytest.raises(InputError, match="outside"):
        K.moe_dispatch(ids + E, E, conv)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("conv", ["v1", "v2"])
def test_moe_combine_kernel_is_the_spec_bit_for_bit(mode, conv):
    dt = MODES[mode]
    rng = np.random.default_rng(3)
    for N, K_, H in ((1, 8, 5), (37, 3, 130), (64, 8, 64)):
        rows = randn(rng, (N * K_ + 2, H), dt)
        scales = rng.uniform(0.05, 1, (N, K_)).astype(np.float32)
        dst = rng.permutation(N * K_ + 2)[:N * K_].astype(np.int64)
        dst[rng.random(N * K_) < 0.1] = -1                       # dropped slots
        skip1, skip2 = randn(rng, (N, H), dt), randn(rng, (N, H), dt)
        for skip in (None, skip1, (skip1, skip2)):
            got = K.moe_combine(rows, scales, dst, skip=skip, convention=conv)
            want = ops.moe_combine(rows, scales, dst, skip=skip, convention=conv)
            np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("mode", MODES)
def test_grouped_matmul_kernels_match_the_spec(mode):
    dt = MODES[mode]
    rng = np.random.default_rng(5)
    E, H, I = 6, 33, 17
    counts = np.array([3, 0, 1, 7, 0, 2])
    R = int(counts.sum())
    x = np.full((R + 3, H), np.nan, dt)
    x[:R] = randn(rng, (R, H), dt)
    experts = [tuple(randn(rng, s, dt, 0.3) for s in ((I, H), (I, H), (H, I))) for _ in range(E)]
    cs = np.cumsum(counts)
    w_gate = np.stack([e[0] for e in experts])
    got = K.grouped_matmul(x, w_gate, cs)[:R]
    check(got, ops.grouped_matmul(x, w_gate, cs)[:R], "reduce", mode)
    np.testing.assert_array_equal(bits(K.grouped_matmul(x, w_gate, counts, "count")[:R]),
                                  bits(got))
    xe = x.copy()
    xe[:R] = _exact((R, H), -3, 4, 2, dt, 1)                   # every sum order exact
    we = _exact((E, I, H), -2, 3, 3, dt, 2)
    np.testing.assert_array_equal(bits(K.grouped_matmul(xe, we, cs)[:R]),
                                  bits(ops.grouped_matmul(xe, we, cs)[:R]))
    act = K.grouped_gate_up(x, experts, cs)[:R]
    ref = ops.silu_and_mul(ops.grouped_matmul(x, w_gate, cs)[:R],
                           ops.grouped_matmul(x, np.stack([e[1] for e in experts]), cs)[:R])
    check(act, ref, "reduce", mode)
    assert np.isfinite(act.astype(np.float64)).all()            # the NaN rows never read


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 5, 300])
def test_moe_block_vllm_ascend_profile_matches_spec(mode, T):
    rng = np.random.default_rng(T + 21)
    x, gate, scale, experts, shared, G = _moe_inputs(rng, MODES[mode], T)
    kw = {"router_softmax_dtype": "activation", "weight_point": "before_down"}
    got_rec, ref_rec = {}, {}
    got = K.moe_block(x, gate, scale, _Experts(experts), shared, G, record=got_rec.__setitem__,
                      **kw)
    ref = ops.moe_block(x, gate, scale, experts, shared, G, record=ref_rec.__setitem__, **kw)
    check(got, ref, "reduce", mode)
    assert sorted(got_rec) == sorted(ref_rec)
    np.testing.assert_array_equal(got_rec["expert_ids"], ref_rec["expert_ids"])


@pytest.mark.parametrize("mode", HALF_MODES)
@pytest.mark.parametrize("T", [1, 40])
@pytest.mark.parametrize("point", ["after_down", "before_down"])
def test_moe_block_profiles_equal_the_spec_bit_for_bit_on_exact_inputs(mode, T, point):
    dt = storage_dtype(mode)
    x, gate, scale, experts, shared, G = _exact_moe_inputs(dt, T)
    kw = {"router_softmax_dtype": "activation", "weight_point": point}
    y = K.moe_block(x, gate, scale, experts, shared, G, **kw)
    np.testing.assert_array_equal(bits(y), bits(ops.moe_block(x, gate, scale, experts, shared,
                                                              G, **kw)))
