"""Explicit SIMD building blocks, written as Numba intrinsics that emit LLVM vector IR.

Why: Numba compiles without fast-math, so LLVM may not reassociate a float reduction and
leaves every dot product scalar (and Numba keeps the SLP vectoriser off). These intrinsics
state the vector order of operations themselves, so they vectorise *and* their result is a
fixed function of the inputs (not of the compiler, the block shape or the thread count).

Element kinds are chosen from the Numba array dtype at compile time:

    float64 -> f64 (8 lanes, float64 accumulation)
    float32 -> f32 (16 lanes, float32 accumulation)
    uint16  -> bf16 bits, widened exactly: float32 bits = u << 16
    int16   -> fp16 bits, widened exactly by bit code (no F16C needed)

`dot_MRxNR(a, a_off, a_ld, b, b_off, b_ld, n)` returns the MR*NR dot products
``sum_k A[i, k] * B[j, k]`` (row i of A at element a_off + i*a_ld, row j of B at
b_off + j*b_ld, k < n) as a tuple in row-major (i, j) order. Every product sum is formed the
same way whatever MR, NR: lane l (of 16, or 8 for float64) accumulates k = l, l+16, ...
with a fused multiply-add (`llvm.fma`, one IEEE rounding per step, not a fast-math flag)
(when both operands are bfloat16, steps of 32: lane l accumulates k = 2l then 2l+1, then
32+2l, 32+2l+1, ..., since a 32-bit word widens to two floats with one shift or mask);
the lanes are added in a fixed pairwise tree (0..7 + 8..15, then halves again); the last
n mod 16 products are added in order with fma. So a dot product is bit-identical whether it
is computed in a 4x4 tile (prefill) or alone (decode).

`axpy_rows(y, y_off, p, p_off, x, x_off, x_ld, nrows, n)`: y[y_off + i] += p[p_off + r] *
widen(x[x_off + r*x_ld + i]) for r = 0, 1, ... in order, one fma per step, elementwise in i
(vector lanes run along i, y stays in registers across the rows).

Callers guarantee C-contiguous arrays and in-range offsets: there is no bounds check.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

F32, F64 = ir.FloatType(), ir.DoubleType()
I16, I32, I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)

_KINDS = {types.float64: "f64", types.float32: "f32", types.uint16: "bf16", types.int16: "f16"}


def _kind(arrty) -> str:
    if not isinstance(arrty, types.Array) or arrty.dtype not in _KINDS:
        raise TypingError(f"refimpl.kernels: unsupported array {arrty}")
    return _KINDS[arrty.dtype]


def _acc_of(*kinds):
    """(numba type, llvm type, lanes) of the accumulation for these operand kinds."""
    if "f64" in kinds:
        if any(k != "f64" for k in kinds):
            raise TypingError("refimpl.kernels: float64 operands must not mix with other dtypes")
        return types.float64, F64, 8
    return types.float32, F32, 16


def _splat(ty, value, n):
    return ir.Constant(ir.VectorType(ty, n), [value] * n)


def _fp16_bits_to_f32(builder, bits16, n):
    """<n x i16> fp16 bit patterns -> <n x float>, exactly (normals, subnormals, inf, NaN)."""
    vi = ir.VectorType(I32, n)
    h = builder.zext(bits16, vi)
    sign = builder.shl(builder.and_(h, _splat(I32, 0x8000, n)), _splat(I32, 16, n))
    em = builder.and_(h, _splat(I32, 0x7FFF, n))
    # (em << 13) read as float32 is the value * 2^-112 for normal and subnormal halves.
    scaled = builder.fmul(builder.bitcast(builder.shl(em, _splat(I32, 13, n)),
                                          ir.VectorType(F32, n)),
                          _splat(F32, 2.0 ** 112, n))
    special = builder.or_(builder.shl(em, _splat(I32, 13, n)), _splat(I32, 0x7F800000, n))
    is_special = builder.icmp_unsigned(">=", em, _splat(I32, 0x7C00, n))
    mag = builder.select(is_special, special, builder.bitcast(scaled, vi))
    return builder.bitcast(builder.or_(mag, sign), ir.VectorType(F32, n))


def _load(builder, ptr, off, n, kind, acc_ll):
    """n elements at element offset `off` of `ptr`, widened to <n x acc>; n == 1 gives a
    scalar."""
    p = builder.gep(ptr, [off], inbounds=True)
    if kind in ("f32", "f64"):
        elt = F32 if kind == "f32" else F64
        if n == 1:
            return builder.load(p)
        vt = ir.VectorType(elt, n)
        return builder.load(builder.bitcast(p, vt.as_pointer()), align=_abi(elt))
    vt = ir.VectorType(I16, n)
    raw = builder.load(builder.bitcast(p, vt.as_pointer()), align=2)
    if kind == "bf16":
        wide = builder.shl(builder.zext(raw, ir.VectorType(I32, n)), _splat(I32, 16, n))
        val = builder.bitcast(wide, ir.VectorType(F32, n))
    else:
        val = _fp16_bits_to_f32(builder, raw, n)
    if n == 1:
        return builder.extract_element(val, ir.Constant(I32, 0))
    return val


def _load_bf16_pairs(builder, ptr, off, n):
    """2n bfloat16 values at element offset `off` as (even elements, odd elements), each
    <n x float>: one 32-bit word holds elements 2i (low half) and 2i+1 (high half), so each
    widening is a single shift or mask, with no shuffle."""
    p = builder.bitcast(builder.gep(ptr, [off], inbounds=True), ir.VectorType(I32, n).as_pointer())
    words = builder.load(p, align=2)
    even = builder.shl(words, _splat(I32, 16, n))
    odd = builder.and_(words, _splat(I32, 0xFFFF0000, n))
    vf = ir.VectorType(F32, n)
    return builder.bitcast(even, vf), builder.bitcast(odd, vf)


def _abi(elt):
    return 4 if elt == F32 else 8


def _fma_fn(module, ty):
    name = "llvm.fma." + (f"v{ty.count}{'f32' if ty.element == F32 else 'f64'}"
                          if isinstance(ty, ir.VectorType) else ("f32" if ty == F32 else "f64"))
    return cgutils.get_or_insert_function(module, ir.FunctionType(ty, [ty, ty, ty]), name)


def _tree_sum(builder, v, lanes):
    """Fixed pairwise reduction of a <lanes x T> vector: (lo half + hi half) repeatedly."""
    width = lanes
    while width > 1:
        half = width // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, half), list(range(half))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, half),
                                                      list(range(half, width))))
        v = builder.fadd(lo, hi)
        width = half
    return builder.extract_element(v, ir.Constant(I32, 0))


def _make_dot(MR: int, NR: int):
    @intrinsic
    def dot_tile(typingctx, a, a_off, a_ld, b, b_off, b_ld, n):
        ka, kb = _kind(a), _kind(b)
        acc_ty, acc_ll, lanes = _acc_of(ka, kb)
        sig = types.UniTuple(acc_ty, MR * NR)(a, types.intp, types.intp, b, types.intp,
                                             types.intp, types.intp)

        def codegen(context, builder, signature, args):
            a_, a_off_, a_ld_, b_, b_off_, b_ld_, n_ = args
            ap = context.make_array(signature.args[0])(context, builder, a_).data
            bp = context.make_array(signature.args[3])(context, builder, b_).data
            vt = ir.VectorType(acc_ll, lanes)
            vfma = _fma_fn(builder.module, vt)
            sfma = _fma_fn(builder.module, acc_ll)
            accs = [cgutils.alloca_once_value(builder, _splat(acc_ll, 0.0, lanes))
                    for _ in range(MR * NR)]
            a_rows = [builder.add(a_off_, builder.mul(a_ld_, ir.Constant(I64, i)))
                      for i in range(MR)]
            b_rows = [builder.add(b_off_, builder.mul(b_ld_, ir.Constant(I64, j)))
                      for j in range(NR)]
            pairs = ka == kb == "bf16"
            step = 2 * lanes if pairs else lanes
            nchunk = builder.sdiv(n_, ir.Constant(I64, step))
            with cgutils.for_range(builder, nchunk) as loop:
                k = builder.mul(loop.index, ir.Constant(I64, step))
                # all of B's rows, then A's rows one by one (MR*NR + NR + 1 live vectors)
                if pairs:
                    bv = [_load_bf16_pairs(builder, bp, builder.add(r, k), lanes) for r in b_rows]
                else:
                    bv = [_load(builder, bp, builder.add(r, k), lanes, kb, acc_ll) for r in b_rows]
                av = [None] * MR
                for i in range(MR):
                    if pairs:
                        av[i] = _load_bf16_pairs(builder, ap, builder.add(a_rows[i], k), lanes)
                    else:
                        av[i] = _load(builder, ap, builder.add(a_rows[i], k), lanes, ka, acc_ll)
                    for j in range(NR):
                        slot = accs[i * NR + j]
                        acc = builder.load(slot)
                        if pairs:   # even elements of the 2*lanes, then odd ones
                            acc = builder.call(vfma, [av[i][0], bv[j][0], acc])
                            acc = builder.call(vfma, [av[i][1], bv[j][1], acc])
                        else:
                            acc = builder.call(vfma, [av[i], bv[j], acc])
                        builder.store(acc, slot)
            sums = [cgutils.alloca_once_value(builder, _tree_sum(builder, builder.load(s), lanes))
                    for s in accs]
            start = builder.mul(nchunk, ir.Constant(I64, step))
            with cgutils.for_range_slice(builder, start, n_, ir.Constant(I64, 1), inc=True) as (kk, _):
                av = [_load(builder, ap, builder.add(r, kk), 1, ka, acc_ll) for r in a_rows]
                bv = [_load(builder, bp, builder.add(r, kk), 1, kb, acc_ll) for r in b_rows]
                for i in range(MR):
                    for j in range(NR):
                        slot = sums[i * NR + j]
                        builder.store(builder.call(sfma, [av[i], bv[j], builder.load(slot)]),
                                      slot)
            return context.make_tuple(builder, signature.return_type,
                                      [builder.load(s) for s in sums])

        return sig, codegen

    dot_tile.__name__ = f"dot_{MR}x{NR}"
    return dot_tile


_DOTS: dict = {}


def make_dot(MR: int, NR: int):
    """The dot_MRxNR intrinsic (made once per shape)."""
    if (MR, NR) not in _DOTS:
        _DOTS[MR, NR] = _make_dot(MR, NR)
    return _DOTS[MR, NR]


dot_1x1 = _make_dot(1, 1)
dot_1x4 = _make_dot(1, 4)
dot_4x1 = _make_dot(4, 1)
dot_4x4 = _make_dot(4, 4)



@intrinsic
def axpy_rows(typingctx, y, y_off, p, p_off, x, x_off, x_ld, nrows, n):
    """For r = 0 .. nrows-1 in order: y[y_off + i] = fma(p[p_off + r],
    widen(x[x_off + r*x_ld + i]), y[y_off + i]) for i < n.

    The same roundings and order per element as `nrows` successive elementwise updates, but
    y stays in registers across the rows, 64 elements at a time (P @ V and q . K of
    attention).
    """
    ky, kp, kx = _kind(y), _kind(p), _kind(x)
    acc_ty, acc_ll, lanes = _acc_of(ky, kx)
    if ky not in ("f32", "f64") or kp != ky:
        raise TypingError("refimpl.kernels.axpy_rows: y and p must share float32 or float64")
    sig = types.void(y, types.intp, p, types.intp, x, types.intp, types.intp, types.intp,
                     types.intp)
    CH = 4  # vectors of y held in registers

    def codegen(context, builder, signature, args):
        y_, y_off_, p_, p_off_, x_, x_off_, x_ld_, nrows_, n_ = args
        yp = context.make_array(signature.args[0])(context, builder, y_).data
        pp = context.make_array(signature.args[2])(context, builder, p_).data
        xp = context.make_array(signature.args[4])(context, builder, x_).data
        vt = ir.VectorType(acc_ll, lanes)
        vfma = _fma_fn(builder.module, vt)
        sfma = _fma_fn(builder.module, acc_ll)
        align = _abi(acc_ll)

        def splat(s):
            one = builder.insert_element(ir.Constant(vt, ir.Undefined), s, ir.Constant(I32, 0))
            return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(I32, lanes),
                                                                [0] * lanes))

        def run_block(base, width):  # y[base : base + width*lanes] through all rows
            slots = [cgutils.alloca_once(builder, vt) for _ in range(width)]
            yptrs = [builder.bitcast(builder.gep(yp, [builder.add(y_off_, builder.add(
                base, ir.Constant(I64, c * lanes)))], inbounds=True), vt.as_pointer())
                for c in range(width)]
            for c in range(width):
                builder.store(builder.load(yptrs[c], align=align), slots[c])
            with cgutils.for_range(builder, nrows_) as rl:
                r = rl.index
                pr = splat(builder.load(builder.gep(pp, [builder.add(p_off_, r)], inbounds=True)))
                row = builder.add(x_off_, builder.mul(r, x_ld_))
                for c in range(width):
                    xv = _load(builder, xp, builder.add(row, builder.add(
                        base, ir.Constant(I64, c * lanes))), lanes, kx, acc_ll)
                    builder.store(builder.call(vfma, [pr, xv, builder.load(slots[c])]), slots[c])
            for c in range(width):
                builder.store(builder.load(slots[c]), yptrs[c], align=align)

        big = CH * lanes
        nbig = builder.sdiv(n_, ir.Constant(I64, big))
        with cgutils.for_range(builder, nbig) as bl:
            run_block(builder.mul(bl.index, ir.Constant(I64, big)), CH)
        done = builder.mul(nbig, ir.Constant(I64, big))
        nvec = builder.sdiv(builder.sub(n_, done), ir.Constant(I64, lanes))
        with cgutils.for_range(builder, nvec) as vl:
            run_block(builder.add(done, builder.mul(vl.index, ir.Constant(I64, lanes))), 1)
        start = builder.add(done, builder.mul(nvec, ir.Constant(I64, lanes)))
        with cgutils.for_range_slice(builder, start, n_, ir.Constant(I64, 1), inc=True) as (i, _):
            ypt = builder.gep(yp, [builder.add(y_off_, i)], inbounds=True)
            with cgutils.for_range(builder, nrows_) as rl:
                r = rl.index
                pr = builder.load(builder.gep(pp, [builder.add(p_off_, r)], inbounds=True))
                xs = _load(builder, xp, builder.add(builder.add(x_off_, builder.mul(r, x_ld_)), i),
                           1, kx, acc_ll)
                builder.store(builder.call(sfma, [pr, xs, builder.load(ypt)]), ypt)
        return context.get_dummy_value()

    return sig, codegen
