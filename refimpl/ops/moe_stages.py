"""The MoE layer's serving stages (DEPLOYMENT.md section 3): dispatch (init_routing), grouped
matmul, combine (finalize_routing).

For routed ids `expert_ids [N, K]` (N tokens, K choices each) a *slot* names one (token,
choice) pair; the two conventions of the Ascend operators number them differently:

  v1 (npu_moe_init_routing):     slot(t, k) = k * N + t     (choice-major, "column order")
  v2 (npu_moe_init_routing_v2):  slot(t, k) = t * K + k     (token-major, "row order")

Dispatch sorts the flattened ids (token-major order, stably) by expert: destination row i of
the expanded input holds the slot `sorted_row_idx[i]`, and `expanded_row_idx[slot]` is the
destination row of a slot. In either convention the rows of one expert are its tokens in
ascending token order, which is the order `refimpl.ops.moe_block` computes them in.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..numerics import to_accum
from .basic import linear

ROW_IDX_CONVENTIONS = ("v1", "v2")
GROUP_LIST_TYPES = ("cumsum", "count")


def _slots(N: int, K: int, convention: str) -> np.ndarray:
    """slot[t, k] of the convention. # -> int64 [N, K]"""
    if convention not in ROW_IDX_CONVENTIONS:
        raise InputError(f"row index convention {convention!r}: choose v1 or v2")
    t, k = np.meshgrid(np.arange(N), np.arange(K), indexing="ij")
    return (k * N + t if convention == "v1" else t * K + k).astype(np.int64)


def slot_token_choice(slots, N: int, K: int, convention: str = "v1"):
    """(token, choice) of each slot: (s % N, s // N) in v1, (s // K, s % K) in v2.
    # slots int [R] -> int64 [R], int64 [R]"""
    slots = np.asarray(slots, np.int64)
    if convention == "v1":
        return slots % max(N, 1), slots // max(N, 1)
    return slots // max(K, 1), slots % max(K, 1)


def check_routed_ids(expert_ids, num_experts: int) -> np.ndarray:
    """Routed ids as int64 [N, K]; InputError unless integers in [0, num_experts)."""
    ids = np.asarray(expert_ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise InputError(f"expert_ids must be integers [tokens, k], got {list(ids.shape)} of "
                         f"{ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        bad = int(ids[(ids < 0) | (ids >= num_experts)][0])
        raise InputError(f"expert id {bad} is outside [0, {num_experts})")
    return ids


def check_combine(rows: np.ndarray, scales, expanded_row_idx):
    """The combine's index inputs: (scales [N, K], expanded_row_idx as int64 [N*K]);
    InputError unless every entry is a row of `rows` or -1 (a dropped slot)."""
    sc = np.asarray(scales)
    if sc.ndim != 2:
        raise InputError(f"scales must be [tokens, k], got {list(sc.shape)}")
    N, K = sc.shape
    dst = np.asarray(expanded_row_idx)
    if dst.shape != (N * K,) or dst.dtype.kind not in "iu":
        raise InputError(f"expanded_row_idx must be {N * K} integers, got {list(dst.shape)} "
                         f"of {dst.dtype}")
    dst = dst.astype(np.int64)
    if (dst >= rows.shape[0]).any() or (dst < -1).any():
        bad = int(dst[(dst >= rows.shape[0]) | (dst < -1)][0])
        raise InputError(f"expanded_row_idx entry {bad} is outside the {rows.shape[0]} rows "
                         "(or -1 for a dropped slot)")
    return sc, dst


def moe_dispatch(expert_ids, num_experts: int, convention: str = "v1", x=None) -> dict:
    """Permute (token, choice) slots into expert order.

    # expert_ids int [N, K] (, x [N, H]) -> dict of
    #   sorted_expert_ids int64 [N*K]  the ids in ascending order (stable: ties in token order)
    #   sorted_row_idx    int64 [N*K]  the slot at destination row i
    #   expanded_row_idx  int64 [N*K]  the destination row of slot s (its inverse)
    #   expert_counts     int64 [E]    rows per expert (zero for an expert nobody chose)
    #   expert_cumsum     int64 [E]    their inclusive cumulative sum (the group_list)
    #   expanded_x        [N*K, H]     x[token of sorted_row_idx[i]] (when x is given)
    The token of a slot is slot % N in v1 and slot // K in v2.
    """
    ids = check_routed_ids(expert_ids, num_experts)
    N, K = ids.shape
    flat = ids.reshape(-1)                                   # token-major: t * K + k
    order = np.argsort(flat, kind="stable")                  # destination i -> flat position
    sorted_row_idx = _slots(N, K, convention).reshape(-1)[order]
    expanded_row_idx = np.empty_like(sorted_row_idx)
    expanded_row_idx[sorted_row_idx] = np.arange(sorted_row_idx.size)
    counts = np.bincount(flat, minlength=num_experts).astype(np.int64)
    out = {"sorted_expert_ids": flat[order], "sorted_row_idx": sorted_row_idx,
           "expanded_row_idx": expanded_row_idx, "expert_counts": counts,
           "expert_cumsum": np.cumsum(counts)}
    if x is not None:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] != N:
            raise InputError(f"x must be [{N}, hidden] for {N} tokens, got {list(x.shape)}")
        token, _ = slot_token_choice(sorted_row_idx, N, K, convention)
        out["expanded_x"] = x[token]
    return out


def group_bounds(group_list, num_groups: int, num_rows: int,
                 group_list_type: str = "cumsum") -> np.ndarray:
    """Row ranges of the groups of a grouped matmul. # -> int64 [G + 1] (starts, then end)
    group_list: the inclusive cumulative row counts (`cumsum`) or the counts (`count`)."""
    if group_list_type not in GROUP_LIST_TYPES:
        raise InputError(f"group_list_type {group_list_type!r}: choose cumsum or count")
    g = np.asarray(group_list)
    if g.shape != (num_groups,) or g.dtype.kind not in "iu":
        raise InputError(f"group_list must be {num_groups} integers, got {list(g.shape)} of "
                         f"{g.dtype}")
    g = g.astype(np.int64)
    ends = np.cumsum(g) if group_list_type == "count" else g
    if (g < 0).any() if group_list_type == "count" else (np.diff(np.r_[0, ends]) < 0).any():
        raise InputError(f"group_list ({group_list_type}) must describe non-negative counts")
    if ends.size and ends[-1] > num_rows:
        raise InputError(f"group_list covers {int(ends[-1])} rows, the input has {num_rows}")
    return np.r_[0, ends]


def grouped_matmul(x_sorted: np.ndarray, weights, group_list,
                   group_list_type: str = "cumsum", product=None,
                   out_dtype=None) -> np.ndarray:
    """One product per group: rows of group e times weights[e]^T.

    # x_sorted [R, in], weights [E, out, in] (or a sequence of E [out, in]), group_list [E]
    # -> [R, out]
    Rows start .. end - 1 of group e (from `group_bounds`) give `product(rows, weights[e])`,
    by default `linear`: accumulation in float32 (float64 in fp64), one rounding to x's
    dtype. Rows past the last group are never read (they may hold anything, NaN included)
    and come back as zeros; a group of zero rows reads nothing of its weight. `product` and
    `out_dtype` (default x's dtype) let the kernels and the int8 path (`quant_grouped_matmul`:
    int8_matmul to int32) share this loop.
    """
    product = product or linear
    out_dtype = x_sorted.dtype if out_dtype is None else np.dtype(out_dtype)
    R = x_sorted.shape[0]
    E = len(weights)
    bounds = group_bounds(group_list, E, R, group_list_type)
    out = None
    for e in range(E):
        a, b = int(bounds[e]), int(bounds[e + 1])
        if b > a:
            y = product(x_sorted[a:b], weights[e])             # [n_e, in] -> [n_e, out]
            if out is None:
                out = np.zeros((R, y.shape[1]), out_dtype)
            out[a:b] = y
    if out is None:                                            # no rows at all
        out = np.zeros((R, np.asarray(weights[0]).shape[0] if E else 0), out_dtype)
    return out


def moe_combine(rows: np.ndarray, scales, expanded_row_idx, skip=None, bias=None,
                expert_ids=None, convention: str = "v1") -> np.ndarray:
    """The finalize formula: un-permute, weight and sum each token's expert rows.

    # rows [R, H] (expert outputs in dispatch order), scales [N, K], expanded_row_idx [N*K],
    # skip: None, [N, H] or a tuple of them, bias [E, H] with expert_ids [N, K] -> [N, H]
    out[t] = skip1[t] + skip2[t] + sum_k scales[t, k] * (rows[expanded_row_idx[slot(t, k)]]
             + bias[expert_ids[t, k]]), slot(t, k) = k*N + t (v1) or t*K + k (v2); a slot
    whose destination row is -1 was dropped and adds nothing. Numerics (this spec's; the
    Ascend kernel's internal precision is not documented): everything upcast to float32
    (float64 in fp64), the skips added first, then k = 0 .. K-1 in order, one rounding to
    rows' dtype at the end.
    """
    rows = np.asarray(rows)
    sc, dst = check_combine(rows, scales, expanded_row_idx)
    N, K = sc.shape
    acc = to_accum(rows)
    out = np.zeros((N, rows.shape[1]), acc.dtype)
    for s in (skip if isinstance(skip, tuple) else (skip,)) if skip is not None else ():
        if s is not None:
            out = out + to_accum(np.asarray(s))
    slot = _slots(N, K, convention)                                       # [N, K]
    if bias is not None:
        if expert_ids is None:
            raise InputError("moe_combine: a bias needs the expert_ids it is indexed by")
        bias_a = to_accum(np.asarray(bias))
        ids = np.asarray(expert_ids).astype(np.int64)
    sca = to_accum(sc).astype(acc.dtype)
    for k in range(K):
        d = dst[slot[:, k]]                                               # [N]
        kept = d >= 0
        term = acc[np.where(kept, d, 0)]                                  # [N, H]
        if bias is not None:
            term = term + bias_a[ids[:, k]]
        out = out + np.where(kept[:, None], sca[:, k:k + 1] * term, 0)
    return out.astype(rows.dtype)


__all__ = ["ROW_IDX_CONVENTIONS", "GROUP_LIST_TYPES", "slot_token_choice", "check_routed_ids",
           "check_combine",
           "moe_dispatch", "group_bounds",
           "grouped_matmul", "moe_combine"]
