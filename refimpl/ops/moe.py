"""Mixture of Grouped Experts (MoGE): the Pangu Pro MoE v1 router and block."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..numerics import round_to, to_accum
from .basic import linear, softmax
from .mlp import silu_and_mul, swiglu
from .moe_stages import grouped_matmul, moe_combine, moe_dispatch


def _group_size(num_experts: int, num_groups: int) -> int:
    if num_groups <= 0 or num_experts % num_groups:
        raise InputError(f"moge_route: {num_experts} experts do not divide into {num_groups} "
                         "groups")
    return num_experts // num_groups


def check_expert_ids(expert_ids, num_tokens: int, num_experts: int, num_groups: int):
    """A forced expert selection as int64 [T, G]; InputError unless column g holds ids of
    group g (g*E/G .. (g+1)*E/G - 1)."""
    size = _group_size(num_experts, num_groups)
    ids = np.asarray(expert_ids)
    if ids.shape != (num_tokens, num_groups) or ids.dtype.kind not in "iu":
        raise InputError(f"expert_ids must be integers of shape [{num_tokens}, {num_groups}], "
                         f"got {list(ids.shape)} of {ids.dtype}")
    ids = ids.astype(np.int64)
    if ((ids // size) != np.arange(num_groups)[None, :]).any():
        raise InputError("expert_ids: column g must hold an expert of group g "
                         f"(ids g*{size} .. g*{size}+{size - 1})")
    return ids


#: where the router's softmax is rounded: "float32" (Hugging Face eager: p stays in the
#: accumulation dtype) or "activation" (vllm-ascend: p rounded to the logits' dtype, then the
#: group argmax on those values, weights = round(p[e] * router_scale[e]))
ROUTER_SOFTMAX_DTYPES = ("float32", "activation")
#: where a token's routing weight is applied: "after_down" (HF: w * down(act), then HF's
#: index_add order) or "before_down" (vllm-ascend: down(round(act * w)), then the K rows of a
#: token summed in float32 in choice order and rounded once, as reshape(T, K, H).sum(1))
MOE_WEIGHT_POINTS = ("after_down", "before_down")


def moge_route(router_logits: np.ndarray, router_scale: np.ndarray, num_groups: int,
               expert_ids=None, softmax_dtype: str = "float32"):
    """Pick one expert per group: global softmax, per-group argmax, times router_scale.

    # router_logits [T, E], router_scale [1, E] or [E] -> expert_ids [T, G] int64, weights [T, G]
    p = softmax(logits) over all E experts (accumulation dtype, float32 for half inputs);
    experts are split into G contiguous groups of E/G (group g = ids g*E/G .. (g+1)*E/G - 1);
    e_g = g*E/G + argmax(p[:, group g]) with ties going to the lowest id;
    weight_g = p[:, e_g] * router_scale[e_g]. No renormalisation, no other scaling.
    The weights are returned in the accumulation dtype.

    expert_ids [T, G], if given, is the selection to use instead of the argmax (the weights
    are still this call's p[e] * router_scale[e]): the float64 reference of a low-precision
    run takes that run's selection, so the two differ only by arithmetic, never by routing.

    softmax_dtype="activation" (the vllm-ascend convention): p is rounded to the logits'
    dtype before the argmax (ties: lowest id) and the weights are round(p[e] * scale[e]) in
    that dtype (returned in the accumulation dtype, holding storage values). Identical to
    "float32" when the logits are float32 or float64.
    """
    T, E = router_logits.shape
    size = _group_size(E, num_groups)
    if softmax_dtype not in ROUTER_SOFTMAX_DTYPES:
        raise InputError(f"router softmax dtype {softmax_dtype!r}: choose one of "
                         f"{', '.join(ROUTER_SOFTMAX_DTYPES)}")
    dt = np.asarray(router_logits).dtype
    probs = softmax(router_logits, axis=-1)                       # [T, E]
    if softmax_dtype == "activation":
        probs = round_to(probs, dt)
    if expert_ids is None:
        local = np.argmax(probs.reshape(T, num_groups, size), axis=-1)  # [T, G], first max
        expert_ids = (local + np.arange(num_groups)[None, :] * size).astype(np.int64)
    else:
        expert_ids = check_expert_ids(expert_ids, T, E, num_groups)
    scale = to_accum(np.asarray(router_scale)).reshape(E).astype(probs.dtype)
    weights = np.take_along_axis(probs, expert_ids, axis=1) * scale[expert_ids]
    if softmax_dtype == "activation":
        weights = round_to(weights, dt)
    return expert_ids, weights


def routing_margins(router_logits: np.ndarray, expert_ids: np.ndarray, num_groups: int):
    """How decisively each choice was made: for token t and group g, the chosen expert's
    logit and probability minus the largest other one of the group.

    # router_logits [T, E], expert_ids [T, G] -> logit_margin [T, G], prob_margin [T, G]
    Both in float64 (from the logits as given, probabilities = softmax in the logits'
    accumulation dtype, as `moge_route` computes them). A margin < 0 means the selection
    is not this router's argmax (a forced or foreign choice); 0 is an exact tie.
    """
    T, E = router_logits.shape
    size = _group_size(E, num_groups)
    logits = to_accum(router_logits).astype(np.float64).reshape(T, num_groups, size)
    probs = softmax(router_logits, axis=-1).astype(np.float64).reshape(T, num_groups, size)
    local = (np.asarray(expert_ids) - np.arange(num_groups)[None, :] * size)[..., None]
    out = []
    for values in (logits, probs):
        chosen = np.take_along_axis(values, local, axis=-1)[..., 0]        # [T, G]
        others = values.copy()
        np.put_along_axis(others, local, -np.inf, axis=-1)
        out.append(chosen - others.max(axis=-1) if size > 1 else np.full_like(chosen, np.inf))
    return out[0], out[1]


def near_ties(router_logits: np.ndarray, expert_ids: np.ndarray, num_groups: int,
              logit_ulps: float, prob_ulps: float) -> np.ndarray:
    """Choices a correct kernel may make differently (near-ties).

    # router_logits [T, E], expert_ids [T, G] -> [T, G] bool
    A choice is a near-tie when its logit margin is at most `logit_ulps` units in the last
    place of the logits' dtype (at the larger magnitude of the pair), or its probability
    margin at most `prob_ulps` units in the last place of the probability's accumulation
    dtype. The first is the freedom of a kernel that computes the logits itself (a rounded
    dot product summed in another order can round to a neighbouring value); the second that
    of any softmax (exp and the sum differ by an ulp or so between implementations). An exact
    tie is always a near-tie. The values a case uses are refimpl.golden.ROUTER_LOGIT_ULPS.
    """
    T, E = router_logits.shape
    size = _group_size(E, num_groups)
    logit_margin, prob_margin = routing_margins(router_logits, expert_ids, num_groups)
    dt = np.asarray(router_logits).dtype
    logits = to_accum(router_logits).astype(np.float64).reshape(T, num_groups, size)
    magnitude = np.abs(logits).max(axis=-1)                                # [T, G]
    logit_ulp = np.spacing(magnitude.astype(dt)).astype(np.float64)        # [T, G]
    probs = softmax(router_logits, axis=-1)                                # [T, E] accum
    chosen = np.take_along_axis(probs, np.asarray(expert_ids), axis=1)     # [T, G]
    prob_ulp = np.spacing(chosen).astype(np.float64)
    return (logit_margin <= logit_ulps * logit_ulp) | (prob_margin <= prob_ulps * prob_ulp)


def moe_block(x: np.ndarray, gate_weight: np.ndarray, router_scale: np.ndarray, experts,
              shared_expert, num_groups: int, record=None, expert_ids=None,
              router_softmax_dtype: str = "float32",
              weight_point: str = "after_down") -> np.ndarray:
    """y = sum_g round(w_g) * Expert_{e_g}(x) + SharedExpert(x), only selected experts run.

    # x [T, H], gate_weight [E, H], router_scale [1, E] -> [T, H]
    `experts[e]` gives expert e's (w_gate, w_up, w_down) and is read only for selected
    experts (so a lazy, memory-mapped sequence is touched only where routing sends tokens);
    `shared_expert` is its (w_gate, w_up, w_down). Computed in the serving stages
    (`refimpl.ops.moe_stages`): dispatch (v1), grouped matmuls for gate and up, SwiGLU,
    grouped matmul for down; each expert's rows are its tokens in ascending order, so each
    product is the one `swiglu(x[tokens])` computes. Accumulation follows Hugging Face's
    index_add_ in the activation dtype: selected experts in ascending id order, each
    weighted output rounded, then added and rounded; the shared expert is added last.
    `expert_ids` [T, G], if given, forces the selection (see `moge_route`).
    The defaults are Hugging Face eager's conventions; `router_softmax_dtype="activation"`
    and `weight_point="before_down"` are vllm-ascend's (ROUTER_SOFTMAX_DTYPES,
    MOE_WEIGHT_POINTS; `refimpl.config.CONVENTION_PROFILES`).
    `record(name, array)`, if given, receives router_logits, expert_ids, expert_weights and
    each selected expert's token indices, input and output.
    """
    dt = x.dtype
    T = x.shape[0]
    router_logits = linear(x, gate_weight)                        # [T, E]
    E = router_logits.shape[1]
    if weight_point not in MOE_WEIGHT_POINTS:
        raise InputError(f"MoE weight point {weight_point!r}: choose one of "
                         f"{', '.join(MOE_WEIGHT_POINTS)}")
    expert_ids, weights = moge_route(router_logits, router_scale, num_groups, expert_ids,
                                     softmax_dtype=router_softmax_dtype)
    weights_s = weights.astype(dt)                                # [T, G]
    if record:
        record("router_logits", router_logits)
        record("expert_ids", expert_ids)
        record("expert_weights", weights)
    # dispatch -> grouped matmuls (gate, up; SwiGLU; down) -> combine in HF's order
    d = moe_dispatch(expert_ids, E, "v1", x)                      # slot(t, k) = k*T + t
    rows = d["expanded_x"]                                        # [T*G, H] by expert
    group_list = d["expert_cumsum"]
    chosen = {int(e): experts[int(e)] for e in np.flatnonzero(d["expert_counts"])}  # read once
    gate = grouped_matmul(rows, _ExpertWeights(chosen, 0, E), group_list)
    up = grouped_matmul(rows, _ExpertWeights(chosen, 1, E), group_list)
    act = silu_and_mul(gate, up)                                  # [T*G, I]
    bounds = np.r_[0, group_list]
    if weight_point == "before_down":
        src = d["sorted_row_idx"]
        w_rows = to_accum(weights_s[src % T, src // T])[:, None]  # each row's weight
        act = round_to(to_accum(act) * w_rows, dt).astype(dt)     # round(act * w)
    down = grouped_matmul(act, _ExpertWeights(chosen, 2, E), group_list)
    if weight_point == "before_down":
        routed = moe_combine(down, np.ones(expert_ids.shape), d["expanded_row_idx"])
        if record:
            for e in np.flatnonzero(d["expert_counts"]):
                tok = d["sorted_row_idx"][bounds[e]:bounds[e + 1]] % T
                record(f"experts.{int(e)}.token_idx", tok.astype(np.int64))
                record(f"experts.{int(e)}.in", x[tok])
                record(f"experts.{int(e)}.out", down[bounds[e]:bounds[e + 1]])
        shared = swiglu(x, *shared_expert)                        # [T, H]
        if record:
            record("shared_expert_out", shared)
        return round_to(to_accum(routed) + to_accum(shared), dt).astype(dt)
    y = np.zeros_like(to_accum(x))                                # [T, H], values in dt
    for e in np.flatnonzero(d["expert_counts"]):                  # ascending expert id
        src = d["sorted_row_idx"][bounds[e]:bounds[e + 1]]
        tok, slot = src % T, src // T                             # tokens in ascending order
        out = down[bounds[e]:bounds[e + 1]]                       # [n_e, H] = expert(x[tok])
        contrib = round_to(to_accum(out) * to_accum(weights_s[tok, slot])[:, None], dt)
        y[tok] = round_to(y[tok] + contrib, dt)
        if record:
            record(f"experts.{int(e)}.token_idx", tok.astype(np.int64))
            record(f"experts.{int(e)}.in", x[tok])
            record(f"experts.{int(e)}.out", out)
    shared = swiglu(x, *shared_expert)                            # [T, H]
    if record:
        record("shared_expert_out", shared)
    return round_to(y + to_accum(shared), dt).astype(dt)


class _ExpertWeights:
    """weights[e] = chosen[e][part] (0 gate, 1 up, 2 down) of the selected experts' weights
    (each read once from `experts`), as a grouped matmul's weight list."""

    def __init__(self, experts, part: int, num_experts: int):
        self.experts, self.part, self.n = experts, part, num_experts

    def __getitem__(self, e):
        return self.experts[int(e)][self.part]

    def __len__(self):
        return self.n
