"""The MoE serving stages as kernels: dispatch (a counting sort), grouped matmul (the linear
kernel per group; gate and up fused per group), combine (one pass per token).

Semantics, names and signatures of `refimpl.ops.moe_stages`.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from refimpl import ops as spec
from refimpl.errors import InputError
from refimpl.numerics import to_accum

from ._dtypes import acc_np, acc_zero, check_dtype, empty, ld, parallel, raw, st
from ._jit import driver, jit
from .linear import _kernel_ok, gate_up, linear


@jit()
def _dispatch(flat, N, K, E, v1, sorted_ids, sorted_row_idx, expanded_row_idx, counts):
    """Counting sort of the flattened ids (token-major i = t*K + k), stable, so equal to
    the spec's stable argsort. # flat [N*K] -> the four int64 outputs"""
    for i in range(N * K):
        counts[flat[i]] += 1
    start = np.zeros(E, np.int64)
    run = 0
    for e in range(E):
        start[e] = run
        run += counts[e]
    for i in range(N * K):
        e = flat[i]
        pos = start[e]
        start[e] += 1
        t, k = i // K, i % K
        slot = k * N + t if v1 else i
        sorted_ids[pos] = e
        sorted_row_idx[pos] = slot
        expanded_row_idx[slot] = pos


def moe_dispatch(expert_ids, num_experts: int, convention: str = "v1", x=None) -> dict:
    """`refimpl.ops.moe_dispatch` by a counting sort in one pass (exactly its outputs).
    # expert_ids int [N, K] (, x [N, H]) -> dict (see the spec)"""
    if convention not in spec.moe_stages.ROW_IDX_CONVENTIONS:
        raise InputError(f"row index convention {convention!r}: choose v1 or v2")
    ids = spec.moe_stages.check_routed_ids(expert_ids, num_experts)
    N, K = ids.shape
    flat = np.ascontiguousarray(ids.reshape(-1))
    out = {name: np.empty(N * K, np.int64) for name in
           ("sorted_expert_ids", "sorted_row_idx", "expanded_row_idx")}
    counts = np.zeros(num_experts, np.int64)
    _dispatch(flat, N, K, num_experts, convention == "v1", out["sorted_expert_ids"],
              out["sorted_row_idx"], out["expanded_row_idx"], counts)
    out["expert_counts"], out["expert_cumsum"] = counts, np.cumsum(counts)
    if x is not None:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] != N:
            raise InputError(f"x must be [{N}, hidden] for {N} tokens, got {list(x.shape)}")
        src = out["sorted_row_idx"]
        out["expanded_x"] = x[spec.moe_stages.slot_token_choice(src, N, K, convention)[0]]
    return out


def grouped_matmul(x_sorted: np.ndarray, weights, group_list,
                   group_list_type: str = "cumsum") -> np.ndarray:
    """`refimpl.ops.grouped_matmul` with the linear kernel per group (bit-equal to the spec's
    linear where the kernel's sum order is exact; rows past the last group never read).
    # x_sorted [R, in], weights [E, out, in], group_list [E] -> [R, out]"""
    return spec.grouped_matmul(x_sorted, weights, group_list, group_list_type, product=linear)


def grouped_gate_up(x_sorted: np.ndarray, experts, group_list) -> np.ndarray:
    """act = round(round(silu(gmm(x, W_gate))) * gmm(x, W_up)) with gate and up of each
    group computed together (`linear.gate_up`, the fused w13 grouped matmul: the [R, I]
    gate and up are never stored). # x_sorted [R, H], experts[e] = (gate, up, down)
    -> [R, I]"""
    R = x_sorted.shape[0]
    bounds = np.r_[0, np.asarray(group_list, np.int64)]
    out = None
    for e in np.flatnonzero(np.diff(bounds)):
        a, b = int(bounds[e]), int(bounds[e + 1])
        wg, wu = experts[int(e)][0], experts[int(e)][1]
        rows = x_sorted[a:b]
        if _kernel_ok(rows, wg, wu):
            act = gate_up(rows, wg, wu)                           # [n_e, I]
        else:
            act = spec.silu_and_mul(spec.linear(rows, wg), spec.linear(rows, wu))
        if out is None:
            out = np.zeros((R, act.shape[1]), x_sorted.dtype)
        out[a:b] = act
    return out if out is not None else np.zeros((R, 0), x_sorted.dtype)


@jit()
def _combine_token(rows, sca, dst, skips, n_skips, v1, t, out):
    """out[t] = round(skips... + sum_k sca[t, k] * rows[dst[slot(t, k)]]), accumulation
    in order: the skips, then k = 0 .. K-1 (a dropped slot adds 0.0, as the spec's where)."""
    N, K = sca.shape
    for c in range(out.shape[1]):
        acc = acc_zero(out)
        for s in range(n_skips):
            acc = acc + ld(skips, (s, t, c))
        for k in range(K):
            d = dst[k * N + t] if v1 else dst[t * K + k]
            if d >= 0:
                acc = acc + sca[t, k] * ld(rows, (d, c))
            else:
                acc = acc + acc_zero(out)
        st(out, (t, c), acc)


@driver
def _combine(rows, sca, dst, skips, n_skips, v1, out):
    for t in prange(out.shape[0]):
        _combine_token(rows, sca, dst, skips, n_skips, v1, np.int64(t), out)


def moe_combine(rows: np.ndarray, scales, expanded_row_idx, skip=None, bias=None,
                expert_ids=None, convention: str = "v1") -> np.ndarray:
    """`refimpl.ops.moe_combine` in one pass per token, the same order and single rounding
    (bit-equal to the spec). A bias (Pangu's experts have none) takes the spec's path.
    # rows [R, H], scales [N, K], expanded_row_idx [N*K], skip [N, H] or a tuple -> [N, H]"""
    rows = np.asarray(rows)
    skips = [] if skip is None else [s for s in (skip if isinstance(skip, tuple) else (skip,))
                                     if s is not None]
    sc = np.asarray(scales)
    if bias is not None or rows.ndim != 2 or sc.ndim != 2 or \
            any(np.asarray(s).shape != (sc.shape[0], rows.shape[1]) for s in skips):
        return spec.moe_combine(rows, scales, expanded_row_idx, skip, bias, expert_ids,
                                convention)
    check_dtype(rows, "moe_combine")
    if convention not in spec.moe_stages.ROW_IDX_CONVENTIONS:
        raise InputError(f"row index convention {convention!r}: choose v1 or v2")
    sc, dst = spec.moe_stages.check_combine(rows, sc, expanded_row_idx)
    N, K = sc.shape
    dst = np.ascontiguousarray(dst)
    if any(np.asarray(s).dtype != rows.dtype for s in skips):   # mixed dtypes: the spec
        return spec.moe_combine(rows, scales, expanded_row_idx, skip, bias, expert_ids,
                                convention)
    sca = np.ascontiguousarray(to_accum(sc).astype(acc_np(rows.dtype)))
    H = rows.shape[1]
    stack = np.zeros((max(len(skips), 1), N, H), rows.dtype)
    for i, s in enumerate(skips):
        stack[i] = s
    y, y_raw = empty((N, H), rows.dtype)
    if N:
        _combine[parallel(N * K * H)](raw(rows), sca, dst, raw(stack), len(skips),
                                      convention == "v1", y_raw)
    return y


__all__ = ["moe_dispatch", "grouped_matmul", "grouped_gate_up", "moe_combine"]
