"""W8A8: the int8 x int8 -> int32 matmul, and the spec's quantised operators running on it.

The accumulator is exact integer arithmetic, so this kernel equals `refimpl.ops.int8_matmul`
bit for bit on every input (no summation-order question arises: integer addition is
associative and no partial sum of k <= `MAX_INT8_REDUCTION` products can overflow int32).
Everything before and after the accumulator (quantise, dequantise, the fused MoE
activation) is the spec's own code, called with this matmul (`matmul=`), so there is one
copy of each formula.

Layout of the kernel: threads share output channels (weight rows, `prange` over blocks of
ROW_BLOCK rows), each thread computing every token of its rows. In a block, each weight row
is read once per token block of TOKEN_BLOCK rows while it is in L1 (a row of k = 8192 int8
values is 8 KiB), and each dot product is a plain int32 loop that LLVM vectorises (int8
widened to int16 pairs, multiply-add into int32 lanes: vpmaddwd, or VNNI where the CPU has
it) without fast-math, because integer sums are exact in any order. Decode (one token)
streams each weight row once: half the bytes of a bf16 matvec.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from refimpl import ops as spec
from refimpl.ops.quant import check_int8, check_int8_shapes

from ._dtypes import parallel
from ._jit import driver, jit

#: weight rows per parallel work item
ROW_BLOCK = 16
#: tokens per pass over a block of weight rows
TOKEN_BLOCK = 64


@jit(inline="always")
def _dot_i8(x, t, w, n, k):
    """sum_j x[t, j] * w[n, j] as int32 (exact for k <= MAX_INT8_REDUCTION). Written on 2-D
    indices: LLVM then vectorises it (flat offsets with Numba's negative-index wrap do not).
    Numba types integer arithmetic as int64; truncating every partial sum to int32 lets LLVM
    use 32-bit lanes (twice as many as int64: 2x at T = 64, tools/measure_quant.py). The
    truncation loses nothing: an int8 product fits in int16 and no partial sum leaves int32."""
    acc = np.int32(0)
    for j in range(k):
        acc = np.int32(acc + np.int32(np.int16(x[t, j]) * np.int16(w[n, j])))
    return acc


@jit(inline="always")
def _row_block(x, w, out, n0, T, N, K):
    n1 = min(n0 + ROW_BLOCK, N)
    for t0 in range(0, T, TOKEN_BLOCK):
        t1 = min(t0 + TOKEN_BLOCK, T)
        for n in range(n0, n1):
            for t in range(t0, t1):
                out[t, n] = _dot_i8(x, t, w, n, K)


@driver
def _int8_matmul(x, w, out):
    T, K = x.shape
    N = w.shape[0]
    for b in prange((N + ROW_BLOCK - 1) // ROW_BLOCK):
        _row_block(x, w, out, np.int64(b) * ROW_BLOCK, T, N, K)


def int8_matmul(x_q: np.ndarray, w_q: np.ndarray) -> np.ndarray:
    """acc = x_q @ w_q^T as int32, exact (the spec's `int8_matmul`, bit for bit).
    # x_q int8 [T, k], w_q int8 [n, k] -> int32 [T, n]"""
    x_q, w_q = check_int8("x_q", x_q), check_int8("weight", w_q)
    check_int8_shapes(x_q, w_q)
    T, K = x_q.shape
    N = w_q.shape[0]
    out = np.zeros((T, N), np.int32)
    if T and N and K:
        _int8_matmul[parallel(T * N * K)](np.ascontiguousarray(x_q), np.ascontiguousarray(w_q),
                                          out)
    return out


def quant_matmul(x_q, w_q, deq_scale, dtype, quant_bias=None, pertoken_scale=None):
    """`refimpl.ops.quant_matmul` on the Numba int8 matmul. # int8 [T, k], [n, k] -> [T, n]"""
    return spec.quant_matmul(x_q, w_q, deq_scale, dtype, quant_bias, pertoken_scale,
                             matmul=int8_matmul)


def w8a8_linear(x, q, record=None):
    """`refimpl.ops.w8a8_linear` on the Numba int8 matmul. # [T, k] -> [T, n]"""
    return spec.w8a8_linear(x, q, record, matmul=int8_matmul)


def quant_grouped_matmul(x_q, weights, group_list, group_list_type="cumsum"):
    """`refimpl.ops.quant_grouped_matmul` on the Numba int8 matmul. # [R, k] -> int32 [R, n]"""
    return spec.quant_grouped_matmul(x_q, weights, group_list, group_list_type,
                                     matmul=int8_matmul)


def quant_moe_block(x, gate_weight, router_scale, experts, shared_expert, num_groups, scheme,
                    record=None, expert_ids=None, router_softmax_dtype="float32",
                    num_voted_experts=None):
    """`refimpl.ops.quant_moe_block` on the Numba int8 matmul. # [T, H] -> [T, H]"""
    return spec.quant_moe_block(x, gate_weight, router_scale, experts, shared_expert,
                                num_groups, scheme, record, expert_ids, router_softmax_dtype,
                                num_voted_experts, matmul=int8_matmul)
