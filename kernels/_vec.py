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
n mod 16 (in pairs n mod 32) products are added in order with fma. So a dot product is
bit-identical whether it is computed in a tile or alone.

`axpy_rows(y, y_off, p, p_off, x, x_off, x_ld, nrows, n)`: y[y_off + i] += p[p_off + r] *
widen(x[x_off + r*x_ld + i]) for r = 0, 1, ... in order, one fma per step, elementwise in i
(vector lanes run along i, y stays in registers across the rows).

`make_lane_gemm(MR)` computes the same dot products for prefill GEMMs (`kernels.linear`),
organised differently: lane l of a dot product is a chain of fmas over its own k, untouched
by the other lanes until the tree, so the lanes of MR x 16 dot products are 16 small GEMMs
(one per lane, each in the lane's k order). Each runs as an outer product (a token value
broadcast against 16 weight rows: `pack_tokens` / `pack_lanes` lay the operands out per
lane), and the tree is applied to whole tiles in its own pairing as the lanes finish
(`lane_order`). The bits are those of `dot_1x1`, on every ISA: a vector register's width
changes how many rows one instruction carries, not any sum.

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


dot_1x1 = _make_dot(1, 1)
dot_1x4 = _make_dot(1, 4)
dot_4x2 = _make_dot(4, 2)
dot_1x2 = _make_dot(1, 2)



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


# ---------------------------------------------------------------------------- lane GEMMs
def vector_bits() -> int:
    """Bits of the widest vector register Numba compiles for: 512 with AVX-512F, 256 with
    AVX/AVX2, else 128 (NUMBA_CPU_FEATURES when set, else the host's features)."""
    from numba.core import config

    features = config.CPU_FEATURES
    if features is None:
        import llvmlite.binding as ll

        features = ll.get_host_cpu_features().flatten()
    flags = set(features.split(","))
    if "+avx512f" in flags:
        return 512
    return 256 if flags & {"+avx2", "+avx"} else 128


#: width of the vector registers the lane GEMM uses
VECTOR_BITS = vector_bits()

#: weight rows of a lane-GEMM tile (the vector dimension: one zmm or two ymm of float32)
LANE_NR = 16


def make_lane_gemm(MR: int, NR: int = 16):
    """The intrinsic lane_gemm(a, a_off, b, b_off, nchunks, per_chunk, b_cs, c, c_off, nmerge,
    m_stride): one lane of the MR x NR dot products of a tile, as an outer-product GEMM over
    that lane's nchunks * per_chunk steps.

    Lane l of a dot product (`dot_1x1`) is a chain of fmas over its own k in increasing
    order, independent of the other lanes until the tree; so the lanes of MR x NR dot
    products are 16 (8 in float64) small GEMMs, each with the chain order. Here one of them:

        c[c_off + i*NR + j] = fma(a[s, i], b[s, j], ... fma(a[0, i], b[0, j], 0))
        a[s, i] = a[a_off + s*MR + i]   (step s of token i of the tile, packed)
        b[s, j] = b[b_off + (s // Q)*b_cs + (s % Q)*NR + j]   (weight row j, packed)

    for s < nchunks * Q, Q = per_chunk (1, or 2 in bfloat16 pairs): the weight panel is laid
    out chunk after chunk (`pack_lanes`), b_cs apart.

    A token value is broadcast against NR weight rows: MR*NR/V accumulators, NR/V weight
    vectors and one broadcast in registers (AVX2 6 x 16: 12 + 2 + 1 of 16 ymm; AVX-512
    8 x 32: 16 + 2 + 1 of 32 zmm), one token value loaded per NR/V fmas.

    Then the lane tree, folded in: with the lanes run in the tree's post-order (`lane_order`),
    the sibling subtrees this lane completes are the last `nmerge` tiles stored before it,
    at c_off + m*m_stride (m = nmerge-1 .. 0, nearest first); each is added as
    stored + this (the lower lanes' subtree first, as `_tree_sum`'s lo + hi), and the
    result is stored at c_off. a, b, c: float32 or float64 arrays of one dtype.
    """
    @intrinsic
    def lane_gemm(typingctx, a, a_off, b, b_off, nchunks, per_chunk, b_cs, c, c_off, nmerge,
                  m_stride):
        if not (a.dtype == b.dtype == c.dtype and a.dtype in (types.float32, types.float64)):
            raise TypingError("refimpl.kernels.lane_gemm: a, b, c of one float dtype")
        acc_ll = F64 if a.dtype == types.float64 else F32
        V = min(NR, VECTOR_BITS // (64 if acc_ll == F64 else 32))
        NV = NR // V
        sig = types.void(a, types.intp, b, types.intp, types.intp, types.intp, types.intp, c,
                         types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            a_, a_off_, b_, b_off_, nch_, q_, bcs_, c_, c_off_, nm_, ms_ = args
            ap = context.make_array(signature.args[0])(context, builder, a_).data
            bp = context.make_array(signature.args[2])(context, builder, b_).data
            cp = context.make_array(signature.args[7])(context, builder, c_).data
            vt = ir.VectorType(acc_ll, V)
            vfma = _fma_fn(builder.module, vt)
            align = _abi(acc_ll)

            def vptr(base, off):
                return builder.bitcast(builder.gep(base, [off], inbounds=True), vt.as_pointer())

            accs = [cgutils.alloca_once_value(builder, _splat(acc_ll, 0.0, V))
                    for _ in range(MR * NV)]

            def step(bo, ao):   # one step: NR weights at bo, MR token values at ao
                bv = [builder.load(vptr(bp, builder.add(bo, ir.Constant(I64, v * V))),
                                   align=align) for v in range(NV)]
                for i in range(MR):
                    s = builder.load(builder.gep(ap, [builder.add(ao, ir.Constant(I64, i))],
                                                 inbounds=True))
                    one = builder.insert_element(ir.Constant(vt, ir.Undefined), s,
                                                 ir.Constant(I32, 0))
                    sv = builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(I32, V),
                                                                      [0] * V))
                    for v in range(NV):
                        slot = accs[i * NV + v]
                        builder.store(builder.call(vfma, [sv, bv[v], builder.load(slot)]), slot)

            def chunks(q):      # every chunk's q steps written out (no inner loop)
                with cgutils.for_range(builder, nch_) as chunk:
                    bo = builder.add(b_off_, builder.mul(chunk.index, bcs_))
                    ao = builder.add(a_off_, builder.mul(chunk.index, ir.Constant(I64, q * MR)))
                    for st in range(q):
                        step(builder.add(bo, ir.Constant(I64, st * NR)),
                             builder.add(ao, ir.Constant(I64, st * MR)))

            two = builder.icmp_signed("==", q_, ir.Constant(I64, 2))
            with builder.if_else(two) as (pairs, single):
                with pairs:
                    chunks(2)
                with single:
                    chunks(1)
            # the tree: stored sibling subtree (lower lanes) + this one, nmerge times
            with cgutils.for_range(builder, nm_) as loop:
                m = builder.sub(builder.sub(nm_, ir.Constant(I64, 1)), loop.index)
                base = builder.add(c_off_, builder.mul(m, ms_))
                for i in range(MR):
                    for v in range(NV):
                        off = builder.add(base, ir.Constant(I64, i * NR + v * V))
                        slot = accs[i * NV + v]
                        builder.store(builder.fadd(builder.load(vptr(cp, off), align=align),
                                                   builder.load(slot)), slot)
            for i in range(MR):
                for v in range(NV):
                    off = builder.add(c_off_, ir.Constant(I64, i * NR + v * V))
                    builder.store(builder.load(accs[i * NV + v]), vptr(cp, off), align=align)
            return context.get_dummy_value()

        return sig, codegen

    lane_gemm.__name__ = f"lane_gemm_{MR}x{NR}"
    return lane_gemm


def lane_order(lanes: int) -> list:
    """(lane, merges, stack position) for the lanes of a tree over `lanes` lanes in post-order:
    position i runs lane bitreverse(i); it completes trailing_ones(i) sibling subtrees, which
    sit at the top of a stack of popcount(i) stored tiles, and stores at popcount(i) - that."""
    bits = lanes.bit_length() - 1
    out = []
    for i in range(lanes):
        lane = int(format(i, f"0{bits}b")[::-1], 2) if bits else 0
        merges = len(format(i, "b")) - len(format(i, "b").rstrip("1")) if i else 0
        out.append((lane, merges, bin(i).count("1") - merges))
    return out


def _shuffle(builder, x, y, mask):
    return builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(I32, len(mask)), mask))


def _transpose(builder, rows):
    """The n x n transpose of n vectors of n elements: for n = 8 the network of AVX's
    in-lane unpack, shufps and vperm2f128 (24 shuffles), for other powers of two n rounds of
    the perfect shuffle, r'[2i] = interleave_lo(r[i], r[i + n/2]), r'[2i+1] = interleave_hi
    (AVX-512: one two-source permute each)."""
    n = len(rows)
    if n == 8:
        t = []
        for i in range(0, 8, 2):                      # unpcklps / unpckhps
            t += [_shuffle(builder, rows[i], rows[i + 1], [0, 8, 1, 9, 4, 12, 5, 13]),
                  _shuffle(builder, rows[i], rows[i + 1], [2, 10, 3, 11, 6, 14, 7, 15])]
        u = []
        for i in (0, 4):                              # shufps
            for x, y in ((t[i], t[i + 2]), (t[i + 1], t[i + 3])):
                u += [_shuffle(builder, x, y, [0, 1, 8, 9, 4, 5, 12, 13]),
                      _shuffle(builder, x, y, [2, 3, 10, 11, 6, 7, 14, 15])]
        lo, hi = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]   # vperm2f128
        return ([_shuffle(builder, u[c], u[c + 4], lo) for c in range(4)]
                + [_shuffle(builder, u[c], u[c + 4], hi) for c in range(4)])
    half = n // 2
    lo = [x for i in range(half) for x in (i, n + i)]
    hi = [x for i in range(half, n) for x in (i, n + i)]
    for _ in range(n.bit_length() - 1):
        rows = [_shuffle(builder, rows[i], rows[i + half], m)
                for i in range(half) for m in (lo, hi)]
    return rows


def _transpose_blocks(builder, rows, width):
    """The transpose of len(rows) vectors of as many elements, in width x width blocks
    (width: the register's lanes): returns out[c][rg], the register-wide piece of column c
    holding rows rg*width .. rg*width + width - 1."""
    n = len(rows)
    if width >= n:
        return [[col] for col in _transpose(builder, rows)]
    pieces = [[_shuffle(builder, r, r, list(range(g * width, (g + 1) * width)))
               for g in range(n // width)] for r in rows]     # pieces[row][lane group]
    out = [[None] * (n // width) for _ in range(n)]
    for rg in range(n // width):
        for lg in range(n // width):
            cols = _transpose(builder, [pieces[rg * width + j][lg] for j in range(width)])
            for c in range(width):
                out[lg * width + c][rg] = cols[c]
    return out


@intrinsic
def pack_lanes(typingctx, w, w_off, w_ld, pairs, dst, d_off, d_ld, d_odd):
    """One chunk of 16 weight rows packed for `lane_gemm`: row j at w_off + j*w_ld, the
    chunk's S elements (16 float32 lanes, or 32 in bfloat16 pairs; 8 float64 lanes) widened
    and transposed, lane l's values of the 16 rows stored at dst[d_off + l*d_ld + 0..15]
    (pairs: the even elements 2l there, the odd ones 2l+1 at + d_odd).
    # w [N, K] storage dtype -> dst lane panels (accumulation dtype)"""
    kw = _kind(w)
    acc_ty, acc_ll, L = _acc_of(kw)
    if dst.dtype != acc_ty:
        raise TypingError("refimpl.kernels.pack_lanes: dst must be the accumulation dtype")
    sig = types.void(w, types.intp, types.intp, types.intp, dst, types.intp, types.intp,
                     types.intp)

    def codegen(context, builder, signature, args):
        w_, w_off_, w_ld_, pairs_, d_, d_off_, d_ld_, d_odd_ = args
        wp = context.make_array(signature.args[0])(context, builder, w_).data
        dp = context.make_array(signature.args[4])(context, builder, d_).data
        R = LANE_NR
        width = min(R, VECTOR_BITS // (64 if acc_ll == F64 else 32))
        vt = ir.VectorType(acc_ll, width)

        def row(j, extra):
            return builder.add(builder.add(w_off_, builder.mul(w_ld_, ir.Constant(I64, j))),
                               ir.Constant(I64, extra))

        def put(v, l, parity, rg):   # rows rg*width.. of lane l (parity: odd elements)
            off = builder.add(builder.add(d_off_, builder.mul(d_ld_, ir.Constant(I64, l))),
                              builder.add(builder.mul(d_odd_, ir.Constant(I64, parity)),
                                          ir.Constant(I64, rg * width)))
            builder.store(v, builder.bitcast(builder.gep(dp, [off], inbounds=True),
                                             vt.as_pointer()), align=_abi(acc_ll))

        def store(rows, parity):
            # column l of the transpose: lane l of every row; only the first L are lanes
            cols = _transpose_blocks(builder, rows, width)
            for l in range(L):
                for rg, piece in enumerate(cols[l]):
                    put(piece, l, parity, rg)

        def pad(v, n):  # <n x T> -> <R x T> (n <= R), zeros past n
            if n == R:
                return v
            return builder.shuffle_vector(v, ir.Constant(v.type, None), ir.Constant(
                ir.VectorType(I32, R), list(range(n)) + [n] * (R - n)))

        def natural():
            store([pad(_load(builder, wp, row(j, 0), L, kw, acc_ll), L) for j in range(R)], 0)

        if kw == "bf16":
            is_pairs = builder.icmp_signed("!=", pairs_, ir.Constant(I64, 0))
            with builder.if_else(is_pairs) as (then, other):
                with then:   # transpose the 32-bit words (element 2l | 2l+1), then widen
                    wt = ir.VectorType(I32, L)
                    words = [builder.load(builder.bitcast(builder.gep(wp, [row(j, 0)],
                                                                      inbounds=True),
                                                          wt.as_pointer()), align=2)
                             for j in range(R)]
                    cols = _transpose_blocks(builder, words, width)
                    for l in range(L):
                        for rg, piece in enumerate(cols[l]):
                            even = builder.bitcast(builder.shl(piece, _splat(I32, 16, width)),
                                                   vt)
                            odd = builder.bitcast(builder.and_(piece, _splat(I32, 0xFFFF0000,
                                                                             width)), vt)
                            put(even, l, 0, rg)
                            put(odd, l, 1, rg)
                with other:
                    natural()
        else:
            natural()
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch(typingctx, a, off):
    """Ask for the cache line holding a[off] into L2 (llvm.prefetch, read, locality 2); a
    hint only, never a fault."""
    sig = types.void(a, types.intp)

    def codegen(context, builder, signature, args):
        a_, off_ = args
        p = builder.gep(context.make_array(signature.args[0])(context, builder, a_).data,
                        [off_], inbounds=True)
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, I32, I32, I32]),
            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(p, i8p), ir.Constant(I32, 0), ir.Constant(I32, 2),
                          ir.Constant(I32, 1)])
        return context.get_dummy_value()

    return sig, codegen
