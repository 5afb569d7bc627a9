"""Storage dtypes inside Numba: raw 16-bit views, exact widening, round-to-nearest-even.

Numba has no bfloat16 or (CPU) float16 type, so half-precision arrays enter kernels as raw
16-bit views and the view's integer type says which format the bits are in:

    ml_dtypes.bfloat16 -> uint16 view    np.float16 -> int16 view
    float32, float64   -> as they are

Inside a kernel, `ld(a, i)` reads element i widened to the accumulation dtype (float64 for
float64 arrays, float32 otherwise; widening is exact), `st(a, i, v)` rounds v to a's storage
dtype (round to nearest, ties to even) and stores it, and `rnd(v, a)` is the "round" of the
cast-point table in `refimpl.numerics`: v rounded to a's storage dtype, returned widened.

bfloat16 rounding follows ml_dtypes exactly: NaN -> the quiet NaN 0x7fc0 with the input's
sign, infinities stay, finite values round to nearest even (overflowing to inf), float32
subnormals round like any other value. float16 rounding follows NumPy exactly, NaN payloads
included (the top 10 payload bits are kept, a NaN never becomes inf).
"""

from __future__ import annotations

import os

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.core import cgutils
from numba.extending import intrinsic, overload

from refimpl.errors import InputError
from refimpl.numerics import bfloat16

from ._jit import jit

FLOAT16 = np.dtype(np.float16)
#: storage dtype -> dtype of the array a kernel sees
RAW_VIEW = {np.dtype(np.float64): np.dtype(np.float64), np.dtype(np.float32): np.dtype(np.float32),
            bfloat16: np.dtype(np.uint16), FLOAT16: np.dtype(np.int16)}


# ---------------------------------------------------------------------------- bit casts
@intrinsic
def _u32_as_f32(typingctx, x):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_as_u32(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


# ---------------------------------------------------------------------------- scalar codecs
@jit()
def bf16_bits_to_f32(b):
    """bfloat16 bits (uint16) -> float32, exact."""
    return _u32_as_f32(np.uint32(b) << np.uint32(16))


@jit()
def f32_to_bf16_bits(f):
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN -> sign | 0x7fc0."""
    u = np.int64(_f32_as_u32(np.float32(f)))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16(((u >> 16) & 0x8000) | 0x7FC0)
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@jit()
def f16_bits_to_f32(h):
    """float16 bits (int16 or uint16) -> float32, exact."""
    u = np.int64(h) & 0xFFFF
    sign = (u & 0x8000) << 16
    em = u & 0x7FFF
    if em >= 0x7C00:  # inf / NaN
        mag = (em << 13) | 0x7F800000
    else:  # (em << 13) read as float32 is value * 2^-112 for normal and subnormal halves
        mag = np.int64(_f32_as_u32(_u32_as_f32(np.uint32(em << 13)) * np.float32(2.0 ** 112)))
    return _u32_as_f32(np.uint32(mag | sign))


@jit()
def f32_to_f16_bits(f):
    """float32 -> float16 bits (int16), round to nearest even, as NumPy's astype."""
    u = np.int64(_f32_as_u32(np.float32(f)))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    h = np.int64(0)  # <= 2^-25 (half the smallest subnormal, a tie) rounds to zero
    if a > 0x7F800000:  # NaN keeps its top payload bits and stays NaN
        h = 0x7C00 | ((a & 0x7FFFFF) >> 13)
        h = h if h != 0x7C00 else np.int64(0x7C01)
    elif a >= 0x477FF000:  # >= 65520 (and inf) round to inf
        h = np.int64(0x7C00)
    elif a >= 0x38800000:  # normal half: re-bias the exponent, round 13 bits away
        h = (a + 0xFFF + ((a >> 13) & 1) - 0x38000000) >> 13
    elif a > 0x33000000:  # subnormal half: units of 2^-24
        shift = 126 - (a >> 23)
        m = (a & 0x7FFFFF) | 0x800000
        rem = m & ((np.int64(1) << shift) - 1)
        half = np.int64(1) << (shift - 1)
        h = (m >> shift) + ((rem > half) | ((rem == half) & ((m >> shift) & 1 == 1)))
    return np.int16(h | sign)


# ---------------------------------------------------------------------------- dispatch on dtype
def ld(a, i):
    """a[i] widened to the accumulation dtype (jit only)."""


def st(a, i, v):
    """a[i] = v rounded to a's storage dtype (jit only)."""


def rnd(v, a):
    """v rounded to a's storage dtype, returned in the accumulation dtype (jit only)."""


def acc_zero(a):
    """0 in a's accumulation dtype (jit only)."""


def _dtype_of(a):
    if isinstance(a, types.Array):
        return a.dtype
    raise TypingError(f"refimpl.kernels: expected an array, got {a}")


@overload(ld)
def _ld(a, i):
    dt = _dtype_of(a)
    if dt == types.uint16:
        return lambda a, i: bf16_bits_to_f32(a[i])
    if dt == types.int16:
        return lambda a, i: f16_bits_to_f32(a[i])
    if dt in (types.float32, types.float64):
        return lambda a, i: a[i]
    raise TypingError(f"refimpl.kernels: unsupported dtype {dt}")


@overload(st)
def _st(a, i, v):
    dt = _dtype_of(a)
    if dt == types.uint16:
        def impl(a, i, v):
            a[i] = f32_to_bf16_bits(v)
        return impl
    if dt == types.int16:
        def impl(a, i, v):
            a[i] = f32_to_f16_bits(v)
        return impl
    if dt == types.float32:
        def impl(a, i, v):
            a[i] = np.float32(v)
        return impl
    if dt == types.float64:
        def impl(a, i, v):
            a[i] = np.float64(v)
        return impl
    raise TypingError(f"refimpl.kernels: unsupported dtype {dt}")


@overload(rnd)
def _rnd(v, a):
    dt = _dtype_of(a)
    if dt == types.uint16:
        return lambda v, a: bf16_bits_to_f32(f32_to_bf16_bits(v))
    if dt == types.int16:
        return lambda v, a: f16_bits_to_f32(f32_to_f16_bits(v))
    if dt == types.float32:
        return lambda v, a: np.float32(v)
    if dt == types.float64:
        return lambda v, a: np.float64(v)
    raise TypingError(f"refimpl.kernels: unsupported dtype {dt}")


@overload(acc_zero)
def _acc_zero(a):
    if _dtype_of(a) == types.float64:
        return lambda a: np.float64(0.0)
    return lambda a: np.float32(0.0)


# ---------------------------------------------------------------------------- Python side
#: work (about one multiply-add or element each) below which a kernel runs on the calling
#: thread only: starting the thread pool costs more than such work (and far more when other
#: processes occupy the cores). REFIMPL_PARALLEL_MIN_WORK=0 makes every kernel parallel.
PARALLEL_MIN_WORK = int(os.environ.get("REFIMPL_PARALLEL_MIN_WORK", 1 << 16))


def parallel(work: int) -> bool:
    """Whether a kernel call doing about `work` operations should use the thread pool."""
    return work >= PARALLEL_MIN_WORK


def check_dtype(x: np.ndarray, what: str) -> np.dtype:
    dt = np.dtype(x.dtype)
    if dt not in RAW_VIEW:
        raise InputError(f"{what}: dtype {dt.name} is not a storage dtype "
                         "(float64, float32, bfloat16, float16)")
    return dt


def same_accum(x: np.ndarray, y: np.ndarray) -> bool:
    """y is a storage dtype with the same accumulation dtype as x (then mixing them in a
    kernel computes exactly what the spec computes)."""
    return np.dtype(y.dtype) in RAW_VIEW and acc_np(y.dtype) == acc_np(x.dtype)


def raw(x: np.ndarray) -> np.ndarray:
    """The C-contiguous array a kernel sees: the array itself, or its 16-bit view."""
    x = np.ascontiguousarray(x)
    return x.view(RAW_VIEW[np.dtype(x.dtype)])


def empty(shape, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(array in the storage dtype, its raw view for a kernel) of a fresh output."""
    out = np.empty(shape, dtype)
    return out, out.view(RAW_VIEW[np.dtype(dtype)])


def acc_np(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


@jit(parallel=True)
def _round_bf16_kernel(src, dst):
    for i in numba.prange(src.size):
        dst[i] = f32_to_bf16_bits(src[i])


@jit(parallel=True)
def _round_f16_kernel(src, dst):
    for i in numba.prange(src.size):
        dst[i] = f32_to_f16_bits(src[i])


def round_to_bf16(x) -> np.ndarray:
    """float32 array -> ml_dtypes.bfloat16 array, round to nearest even (the kernels' rounding;
    equals `x.astype(bfloat16)` bit for bit)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint16)
    _round_bf16_kernel(x.reshape(-1), out.reshape(-1))
    return out.view(bfloat16)


def round_to_f16(x) -> np.ndarray:
    """float32 array -> float16 array, round to nearest even (equals `x.astype(np.float16)`
    for every non-NaN value; NaN stays NaN with NumPy's payload rule)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.int16)
    _round_f16_kernel(x.reshape(-1), out.reshape(-1))
    return out.view(np.float16)


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma; float32 or float64 scalars of one type)."""
    if not (a == b == c and a in (types.float32, types.float64)):
        raise TypingError(f"refimpl.kernels.fma: need three float32 or float64, got {a}, {b}, {c}")
    sig = a(a, a, a)

    def codegen(context, builder, signature, args):
        ty = args[0].type
        name = "llvm.fma.f32" if ty == ir.FloatType() else "llvm.fma.f64"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]),
                                            name)
        return builder.call(fn, args)

    return sig, codegen


@jit()
def exp32(x):
    """exp(x) for float32 x, branch-free so loops of it vectorise (libm's expf is a call).

    exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 (two-part ln 2, fma), exp(r) by
    its degree-7 Taylor polynomial (|r| <= 0.35: truncation < 3e-9, far below an ulp), 2^n
    applied in two exact halves so subnormal results round once. Max error measured over
    every float32 in [-104, 89]: see tests/test_kernels.py (about 1 ulp). NaN -> NaN,
    x > 88.73 -> inf, x < -103.98 -> 0.
    """
    xc = min(max(x, np.float32(-104.0)), np.float32(89.0))
    n = np.floor(xc * np.float32(1.44269504) + np.float32(0.5))
    r = fma(n, np.float32(-0.693145752), xc)       # ln 2 high part (exact in n * hi)
    r = fma(n, np.float32(-1.42860677e-06), r)     # ln 2 low part
    p = np.float32(1.0 / 5040.0)
    p = fma(p, r, np.float32(1.0 / 720.0))
    p = fma(p, r, np.float32(1.0 / 120.0))
    p = fma(p, r, np.float32(1.0 / 24.0))
    p = fma(p, r, np.float32(1.0 / 6.0))
    p = fma(p, r, np.float32(0.5))
    p = fma(p, r, np.float32(1.0))
    p = fma(p, r, np.float32(1.0))
    ni = np.int32(n)
    n1 = ni >> 1
    n2 = ni - n1
    s1 = _u32_as_f32(np.uint32((n1 + 127) << 23))
    s2 = _u32_as_f32(np.uint32((n2 + 127) << 23))
    y = (p * s1) * s2
    return y if x == x else x


def vexp(x):
    """exp in x's own float type: exp32 for float32, np.exp for float64 (jit only)."""


@overload(vexp)
def _vexp(x):
    if x == types.float32:
        return lambda x: exp32(x)
    if x == types.float64:
        return lambda x: np.exp(x)
    raise TypingError(f"refimpl.kernels.vexp: unsupported {x}")


def like(v, ref):
    """v converted to the (scalar) type of ref (jit only)."""


def silu(g):
    """g / (1 + exp(-g)) in g's own float type (jit only), as the spec's `ops.silu` (float32
    uses `exp32`)."""


@overload(like)
def _like(v, ref):
    if ref == types.float64:
        return lambda v, ref: np.float64(v)
    if ref == types.float32:
        return lambda v, ref: np.float32(v)
    raise TypingError(f"refimpl.kernels.like: unsupported {ref}")


@overload(silu)
def _silu(g):
    if g == types.float64:
        return lambda g: g / (np.float64(1.0) + np.exp(-g))
    if g == types.float32:
        return lambda g: g / (np.float32(1.0) + exp32(-g))
    raise TypingError(f"refimpl.kernels.silu: unsupported {g}")
