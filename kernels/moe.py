"""MoGE routing and the MoE block: only selected experts run, each once over its tokens."""

from __future__ import annotations

import numpy as np
from numba import prange

from refimpl import ops as spec
from refimpl.errors import InputError
from refimpl.numerics import round_to, to_accum
from refimpl.ops.moe_stages import slot_token_choice

from ._dtypes import acc_np, acc_zero, check_dtype, empty, ld, like, parallel, raw, rnd, st, vexp
from ._jit import driver, jit
from .linear import linear
from .mlp import swiglu
from .moe_stages import grouped_gate_up, grouped_matmul, moe_combine, moe_dispatch


@jit()
def _route_token(logits, scale, G, t, ids, weights):
    """Token t: softmax over all E experts, argmax in each of G contiguous groups (first
    maximum wins), weight = p[e] * scale[e].

    # logits [T, E] (storage), scale [E] (accumulation) -> ids [T, G] int64, weights [T, G]
    """
    E = logits.shape[1]
    size = E // G
    p = np.empty(E, scale.dtype)
    for e in range(E):
        p[e] = ld(logits, (t, e))
    m = p.max()
    tot = like(0.0, m)
    for e in range(E):
        p[e] = vexp(p[e] - m)
        tot += p[e]
    for e in range(E):
        p[e] = p[e] / tot
    for g in range(G):
        best = g * size
        for e in range(g * size + 1, (g + 1) * size):
            if p[e] > p[best]:
                best = e
        ids[t, g] = best
        weights[t, g] = p[best] * scale[best]


@driver
def _route(logits, scale, G, ids, weights):
    for t in prange(logits.shape[0]):
        _route_token(logits, scale, G, np.int64(t), ids, weights)


def moge_route(router_logits: np.ndarray, router_scale: np.ndarray, num_groups: int,
               expert_ids=None, softmax_dtype: str = "float32", num_voted_experts=None):
    """MoGE router in one pass per token (softmax, per-group argmax, router_scale).

    # router_logits [T, E], router_scale [1, E] or [E] -> expert_ids [T, G] int64, weights [T, G]
    Semantics of `refimpl.ops.moge_route`: global softmax in the accumulation dtype, ties go
    to the lowest id, weights not renormalised, returned in the accumulation dtype. A forced
    selection (`expert_ids`, used by float64 references), the activation-dtype softmax and
    the voted router take the spec's path.
    """
    if expert_ids is not None or num_voted_experts is not None or softmax_dtype != "float32":
        return spec.moge_route(router_logits, router_scale, num_groups, expert_ids,
                               softmax_dtype=softmax_dtype, num_voted_experts=num_voted_experts)
    logits = np.asarray(router_logits)
    check_dtype(logits, "moge_route")
    T, E = logits.shape
    if num_groups <= 0 or E % num_groups:
        raise InputError(f"moge_route: {E} experts do not divide into {num_groups} groups")
    acc = acc_np(logits.dtype)
    scale = np.ascontiguousarray(to_accum(np.asarray(router_scale)).reshape(E).astype(acc))
    ids = np.empty((T, num_groups), np.int64)
    weights = np.empty((T, num_groups), acc)
    if T:
        _route[parallel(logits.size * 8)](raw(logits), scale, num_groups, ids, weights)
    return ids, weights


@jit()
def _combine_token(expert_out, rows, w, shared, t, out):
    """y[t] = round(y + round(w[t, g] * expert_out[rows[t, g]])) over g = 0..G-1 (ascending
    expert id, as groups are ascending id ranges), then round(y + shared[t]).

    # expert_out [T*G, H], rows [T, G], w [T, G] (storage), shared [T, H] -> out [T, H]
    """
    G = rows.shape[1]
    for c in range(out.shape[1]):
        y = acc_zero(out)
        for g in range(G):
            y = rnd(y + rnd(ld(w, (t, g)) * ld(expert_out, (rows[t, g], c)), out), out)
        st(out, (t, c), y + ld(shared, (t, c)))


@driver
def _combine(expert_out, rows, w, shared, out):
    for t in prange(out.shape[0]):
        _combine_token(expert_out, rows, w, shared, np.int64(t), out)


def moe_block(x: np.ndarray, gate_weight: np.ndarray, router_scale: np.ndarray, experts,
              shared_expert, num_groups: int, record=None, expert_ids=None,
              router_softmax_dtype: str = "float32",
              weight_point: str = "after_down", num_voted_experts=None,
              stage_taps: bool = False) -> np.ndarray:
    """y = sum_g round(w_g) * Expert_{e_g}(x) + SharedExpert(x), as `refimpl.ops.moe_block`,
    in the same serving stages: route, dispatch (`moe_stages.moe_dispatch`, a counting sort),
    the fused gate-up grouped matmul with SwiGLU (`grouped_gate_up`), under weight_point
    "before_down" each row times its routing weight, the down grouped matmul, then combine:
    "after_down" adds the weighted rows per token in ascending expert id with the spec's
    roundings, "before_down" sums a token's K rows in float32 in choice order and rounds once
    (`moe_combine`); then the shared expert. Unselected experts are never read from
    `experts`. `record` receives the spec's names. The activation-dtype softmax, the voted
    router and a forced selection route through the spec's `moge_route`; `stage_taps` (the
    golden's stage tensors) computes the spec.
    """
    if stage_taps:
        return spec.moe_block(x, gate_weight, router_scale, experts, shared_expert, num_groups,
                              record=record, expert_ids=expert_ids,
                              router_softmax_dtype=router_softmax_dtype,
                              weight_point=weight_point, num_voted_experts=num_voted_experts,
                              stage_taps=True)
    spec.moe.check_weight_point(weight_point)
    x = np.asarray(x)
    check_dtype(x, "moe_block")
    dt = x.dtype
    T, H = x.shape
    router_logits = linear(x, gate_weight)                          # [T, E]
    E = router_logits.shape[1]
    expert_ids, weights = moge_route(router_logits, router_scale, num_groups, expert_ids,
                                     softmax_dtype=router_softmax_dtype,
                                     num_voted_experts=num_voted_experts)
    G = expert_ids.shape[1]
    weights_s = weights.astype(dt)                                  # [T, G] storage
    if record:
        record("router_logits", router_logits)
        record("expert_ids", expert_ids)
        record("expert_weights", weights)
    d = moe_dispatch(expert_ids, E, "v1", x)                        # slot(t, k) = k*T + t
    src = d["sorted_row_idx"]
    chosen = {int(e): experts[int(e)] for e in np.flatnonzero(d["expert_counts"])}
    act = grouped_gate_up(d["expanded_x"], chosen, d["expert_cumsum"])   # [T*G, I]
    if weight_point == "before_down":
        w_rows = weights_s[slot_token_choice(src, T, G)]            # each row's weight
        act = round_to(to_accum(act) * to_accum(w_rows)[:, None], dt).astype(dt)
    down = grouped_matmul(act, spec.moe.ExpertPart(chosen, 2, E), d["expert_cumsum"])  # [T*G, H]
    bounds = np.r_[0, d["expert_cumsum"]]
    if record:
        for e in chosen:
            tok = slot_token_choice(src[bounds[e]:bounds[e + 1]], T, G)[0]
            record(f"experts.{e}.token_idx", tok.astype(np.int64))
            record(f"experts.{e}.in", x[tok])
            record(f"experts.{e}.out", down[bounds[e]:bounds[e + 1]])
    shared = swiglu(x, *shared_expert)                              # [T, H]
    if record:
        record("shared_expert_out", shared)
    if weight_point == "before_down":
        routed = moe_combine(down, np.ones((T, G), acc_np(dt)), d["expanded_row_idx"])
        return round_to(to_accum(routed) + to_accum(shared), dt).astype(dt)
    y, y_raw = empty((T, H), dt)
    if T:
        rows = d["expanded_row_idx"].reshape(G, T).T.copy()         # [T, G] row of (t, g)
        _combine[parallel(down.size)](raw(down), rows, raw(weights_s), raw(shared), y_raw)
    return y

