"""Mixture of Grouped Experts (MoGE): the Pangu Pro MoE v1 router and block."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..numerics import round_to, to_accum
from .basic import linear, softmax
from .mlp import silu_and_mul, swiglu
from .moe_stages import grouped_matmul, moe_combine, moe_dispatch, slot_token_choice


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


#: the routers: "moge" (one expert per group, the argmax of its probabilities) and
#: "moge_voted" (the 300I Duo deployment's: per group only the `num_voted_experts` experts
#: most often chosen across the batch stay eligible; batch-dependent)
ROUTERS = ("moge", "moge_voted")


def moge_vote(probs: np.ndarray, num_groups: int, num_voted_experts: int) -> np.ndarray:
    """The batch vote of the voted router: which experts of each group stay eligible.

    # probs [T, E] -> keep [G, E/G] bool
    Every token votes, in every group, for its argmax (ties: lowest id); per group the
    experts are ranked by their votes, most first, ties to the lowest id (vllm-ascend's
    torch.argsort(descending=True) is not stable, so its order among experts with equal votes
    is *uncertain*: this is the stated rule), and the first `num_voted_experts` are kept.
    The result depends on every token of the batch. num_voted_experts >= E/G keeps every
    expert (plain MoGE).
    """
    T, E = probs.shape
    size = _group_size(E, num_groups)
    if not isinstance(num_voted_experts, (int, np.integer)) or num_voted_experts < 1:
        raise InputError(f"num_voted_experts must be a positive integer, got "
                         f"{num_voted_experts!r}")
    best = np.argmax(probs.reshape(T, num_groups, size), axis=-1)           # [T, G]
    votes = np.zeros((num_groups, size), np.int64)                          # [G, size]
    for g in range(num_groups):
        votes[g] = np.bincount(best[:, g], minlength=size)
    ranked = np.argsort(-votes, axis=1, kind="stable")                      # most votes first
    keep = np.zeros((num_groups, size), bool)
    np.put_along_axis(keep, ranked[:, :num_voted_experts], True, axis=1)
    return keep


def check_weight_point(weight_point: str) -> None:
    """InputError unless weight_point is one of MOE_WEIGHT_POINTS."""
    if weight_point not in MOE_WEIGHT_POINTS:
        raise InputError(f"MoE weight point {weight_point!r}: choose one of "
                         f"{', '.join(MOE_WEIGHT_POINTS)}")


def moge_route(router_logits: np.ndarray, router_scale: np.ndarray, num_groups: int,
               expert_ids=None, softmax_dtype: str = "float32", num_voted_experts=None):
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

    num_voted_experts (the "moge_voted" router, vllm-ascend's pangu_group8_topk on 300I Duo):
    the argmax of each group runs only over the experts `moge_vote` keeps, those the batch
    chose most; the weight is still p[e] * scale[e]. None (or E/G) is plain MoGE. A token
    whose own argmax was kept gets it; only outvoted choices move.
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
        grouped = probs.reshape(T, num_groups, size)               # [T, G, size]
        if num_voted_experts is not None:
            keep = moge_vote(probs, num_groups, num_voted_experts)  # [G, size]
            grouped = np.where(keep[None], grouped, 0)             # as torch.where(keep, p, 0)
        local = np.argmax(grouped, axis=-1)                        # [T, G], first max
        expert_ids = (local + np.arange(num_groups)[None, :] * size).astype(np.int64)
    else:
        expert_ids = check_expert_ids(expert_ids, T, E, num_groups)
    scale = to_accum(np.asarray(router_scale)).reshape(E).astype(probs.dtype)
    weights = np.take_along_axis(probs, expert_ids, axis=1) * scale[expert_ids]
    if softmax_dtype == "activation":
        weights = round_to(weights, dt)
    return expert_ids, weights


def routing_margins(router_logits: np.ndarray, expert_ids: np.ndarray, num_groups: int,
                    softmax_dtype: str = "float32"):
    """How decisively each choice was made: for token t and group g, the chosen expert's
    logit and probability minus the largest other one of the group.

    # router_logits [T, E], expert_ids [T, G] -> logit_margin [T, G], prob_margin [T, G]
    Both in float64 (from the logits as given, probabilities = softmax in the logits'
    accumulation dtype, as `moge_route` computes them). A margin < 0 means the selection
    is not this router's argmax (a forced or foreign choice); 0 is an exact tie.
    softmax_dtype="activation": the probabilities rounded to the logits' dtype first, as
    that router compares them.
    """
    T, E = router_logits.shape
    size = _group_size(E, num_groups)
    logits = to_accum(router_logits).astype(np.float64).reshape(T, num_groups, size)
    probs = softmax(router_logits, axis=-1)
    if softmax_dtype == "activation":
        probs = round_to(probs, np.asarray(router_logits).dtype)
    probs = probs.astype(np.float64).reshape(T, num_groups, size)
    local = (np.asarray(expert_ids) - np.arange(num_groups)[None, :] * size)[..., None]
    out = []
    for values in (logits, probs):
        chosen = np.take_along_axis(values, local, axis=-1)[..., 0]        # [T, G]
        others = values.copy()
        np.put_along_axis(others, local, -np.inf, axis=-1)
        out.append(chosen - others.max(axis=-1) if size > 1 else np.full_like(chosen, np.inf))
    return out[0], out[1]


def near_ties(router_logits: np.ndarray, expert_ids: np.ndarray, num_groups: int,
              logit_ulps: float, prob_ulps: float, softmax_dtype: str = "float32") -> np.ndarray:
    """Choices a correct kernel may make differently (near-ties).

    # router_logits [T, E], expert_ids [T, G] -> [T, G] bool
    A choice is a near-tie when its logit margin is at most `logit_ulps` units in the last
    place of the logits' dtype (at the larger magnitude of the pair), or its probability
    margin at most `prob_ulps` units in the last place of the probability's accumulation
    dtype. The first is the freedom of a kernel that computes the logits itself (a rounded
    dot product summed in another order can round to a neighbouring value); the second that
    of any softmax (exp and the sum differ by an ulp or so between implementations). An exact
    tie is always a near-tie. The values a case uses are refimpl.golden.ROUTER_LOGIT_ULPS.
    Under softmax_dtype="activation" the probabilities compared are rounded to the logits'
    dtype, so the probability margin is counted in units of that dtype (a softmax whose exp
    differs by an ulp of float32 can round a bf16 probability to its neighbour).
    """
    T, E = router_logits.shape
    size = _group_size(E, num_groups)
    logit_margin, prob_margin = routing_margins(router_logits, expert_ids, num_groups,
                                                softmax_dtype)
    dt = np.asarray(router_logits).dtype
    logits = to_accum(router_logits).astype(np.float64).reshape(T, num_groups, size)
    magnitude = np.abs(logits).max(axis=-1)                                # [T, G]
    logit_ulp = np.spacing(magnitude.astype(dt)).astype(np.float64)        # [T, G]
    probs = softmax(router_logits, axis=-1)                                # [T, E] accum
    if softmax_dtype == "activation":
        probs = round_to(probs, dt).astype(dt)                             # storage values
    chosen = np.take_along_axis(probs, np.asarray(expert_ids), axis=1)     # [T, G]
    prob_ulp = np.spacing(chosen).astype(np.float64)
    return (logit_margin <= logit_ulps * logit_ulp) | (prob_margin <= prob_ulps * prob_ulp)


def moe_route_block(x: np.ndarray, gate_weight: np.ndarray, router_scale: np.ndarray,
                    num_groups: int, expert_ids=None, router_softmax_dtype: str = "float32",
                    num_voted_experts=None):
    """The router of the MoE block: logits, then `moge_route`.
    # x [T, H], gate_weight [E, H] -> router_logits [T, E], expert_ids [T, G], weights [T, G]"""
    router_logits = linear(x, gate_weight)                        # [T, E]
    expert_ids, weights = moge_route(router_logits, router_scale, num_groups, expert_ids,
                                     softmax_dtype=router_softmax_dtype,
                                     num_voted_experts=num_voted_experts)
    return router_logits, expert_ids, weights


def moe_experts(rows: np.ndarray, group_list, experts, row_weights=None, record=None):
    """The experts' part of the block on dispatched rows: two grouped matmuls (gate, up),
    SwiGLU, optionally each row times its routing weight, the down grouped matmul.

    # rows [R, H] grouped by expert, group_list [E] (cumsum), experts[e] = (gate, up, down)
    # row_weights [R] or None -> down [R, H]
    gate = gmm(rows, W_gate); up = gmm(rows, W_up); act = round(round(silu(gate)) * up);
    with row_weights (weight_point "before_down"): act = round(act * w_row);
    down = gmm(act, W_down). Only experts with rows are read, each once.
    `record(name, array)` receives stages.gate_up ([R, 2I], gate then up), stages.act and
    (with row_weights) stages.act_weighted.
    """
    dt = rows.dtype
    counts = np.diff(np.r_[0, np.asarray(group_list)])
    chosen = {int(e): experts[int(e)] for e in np.flatnonzero(counts)}   # each read once
    E = len(counts)
    if not chosen:                                   # no rows at all (an idle EP rank)
        return np.zeros(rows.shape, dt)
    gate = grouped_matmul(rows, ExpertPart(chosen, 0, E), group_list)  # [R, I]
    up = grouped_matmul(rows, ExpertPart(chosen, 1, E), group_list)    # [R, I]
    act = silu_and_mul(gate, up)                                           # [R, I]
    if record:
        record("stages.gate_up", np.concatenate([gate, up], axis=1))
        record("stages.act", act)
    if row_weights is not None:
        act = round_to(to_accum(act) * to_accum(np.asarray(row_weights))[:, None],
                       dt).astype(dt)                                      # round(act * w)
        if record:
            record("stages.act_weighted", act)
    return grouped_matmul(act, ExpertPart(chosen, 2, E), group_list)   # [R, H]


def moe_unpermute(down: np.ndarray, dispatch: dict, weights_s: np.ndarray,
                  weight_point: str = "after_down") -> np.ndarray:
    """Each token's expert rows summed back (the combine), in the block's convention.

    # down [T*G, H] in dispatch (v1) order, dispatch = moe_dispatch(ids, E, "v1"),
    # weights_s [T, G] in the storage dtype -> routed [T, H]
    after_down (Hugging Face's index_add_ in the activation dtype): y = 0; for each expert
    in ascending id, y[tok] = round(y[tok] + round(w * down_row)).
    before_down (the rows already carry their weight): the finalize formula with unit
    scales, `moe_combine` (float32 sum in choice order, one rounding).
    """
    dt = down.dtype
    T, G = weights_s.shape
    if weight_point == "before_down":
        return moe_combine(down, np.ones(weights_s.shape), dispatch["expanded_row_idx"])
    bounds = np.r_[0, dispatch["expert_cumsum"]]
    y = np.zeros((T, down.shape[1]), to_accum(down[:0]).dtype)   # [T, H], values in dt
    for e in np.flatnonzero(dispatch["expert_counts"]):           # ascending expert id
        src = dispatch["sorted_row_idx"][bounds[e]:bounds[e + 1]]
        tok, slot = slot_token_choice(src, T, G)                  # tokens in ascending order
        contrib = round_to(to_accum(down[bounds[e]:bounds[e + 1]])
                           * to_accum(weights_s[tok, slot])[:, None], dt)
        y[tok] = round_to(y[tok] + contrib, dt)
    return y.astype(dt)


def moe_block(x: np.ndarray, gate_weight: np.ndarray, router_scale: np.ndarray, experts,
              shared_expert, num_groups: int, record=None, expert_ids=None,
              router_softmax_dtype: str = "float32",
              weight_point: str = "after_down", num_voted_experts=None,
              stage_taps: bool = False) -> np.ndarray:
    """y = sum_g round(w_g) * Expert_{e_g}(x) + SharedExpert(x), only selected experts run.

    # x [T, H], gate_weight [E, H], router_scale [1, E] -> [T, H]
    `experts[e]` gives expert e's (w_gate, w_up, w_down) and is read only for selected
    experts (so a lazy, memory-mapped sequence is touched only where routing sends tokens);
    `shared_expert` is its (w_gate, w_up, w_down). Computed in the serving stages:
    route (`moe_route_block`), dispatch (`moe_dispatch`, v1 slots), `moe_experts` (grouped
    matmuls for gate and up, SwiGLU, grouped matmul for down), combine (`moe_unpermute`),
    then the shared expert added: round(routed + shared). Each expert's rows are its tokens
    in ascending order, so each product is the one `swiglu(x[tokens])` computes.
    The defaults are Hugging Face eager's conventions; `router_softmax_dtype="activation"`
    and `weight_point="before_down"` are vllm-ascend's (ROUTER_SOFTMAX_DTYPES,
    MOE_WEIGHT_POINTS; `refimpl.config.CONVENTION_PROFILES`); `num_voted_experts` selects
    the voted router (`moge_route`). `expert_ids` [T, G], if given, forces the selection.
    `record(name, array)`, if given, receives router_logits, expert_ids, expert_weights,
    each selected expert's token indices, input and output, shared_expert_out, and with
    `stage_taps` every stage's tensors: stages.{sorted_row_idx, expanded_row_idx,
    expert_counts, expert_cumsum, expanded_x, gate_up, act, act_weighted (before_down),
    down, routed} (routed: the combine's output, before the shared expert).
    """
    dt = x.dtype
    T = x.shape[0]
    check_weight_point(weight_point)
    router_logits, expert_ids, weights = moe_route_block(
        x, gate_weight, router_scale, num_groups, expert_ids, router_softmax_dtype,
        num_voted_experts)
    E, G = router_logits.shape[1], expert_ids.shape[1]
    weights_s = weights.astype(dt)                                # [T, G]
    if record:
        record("router_logits", router_logits)
        record("expert_ids", expert_ids)
        record("expert_weights", weights)
    stage = record if (record and stage_taps) else None
    d = moe_dispatch(expert_ids, E, "v1", x)                      # slot(t, k) = k*T + t
    if stage:
        for name in ("sorted_row_idx", "expanded_row_idx", "expert_counts", "expert_cumsum",
                     "expanded_x"):
            stage(f"stages.{name}", d[name])
    src = d["sorted_row_idx"]
    row_weights = (weights_s[slot_token_choice(src, T, G)] if weight_point == "before_down"
                   else None)
    down = moe_experts(d["expanded_x"], d["expert_cumsum"], experts, row_weights, stage)
    routed = moe_unpermute(down, d, weights_s, weight_point)     # [T, H]
    if stage:
        stage("stages.down", down)
        stage("stages.routed", routed)
    if record:
        bounds = np.r_[0, d["expert_cumsum"]]
        for e in np.flatnonzero(d["expert_counts"]):
            tok = slot_token_choice(src[bounds[e]:bounds[e + 1]], T, G)[0]
            record(f"experts.{int(e)}.token_idx", tok.astype(np.int64))
            record(f"experts.{int(e)}.in", x[tok])
            record(f"experts.{int(e)}.out", down[bounds[e]:bounds[e + 1]])
    shared = swiglu(x, *shared_expert)                            # [T, H]
    if record:
        record("shared_expert_out", shared)
    return round_to(to_accum(routed) + to_accum(shared), dt).astype(dt)


class ExpertPart:
    """weights[e] = experts[e][part] (0 gate, 1 up, 2 down): one projection of every expert
    as a grouped matmul's weight list, read only where asked. `experts` is indexable by
    expert id (a list, a lazy sequence, or a dict of the selected experts)."""

    def __init__(self, experts, part: int, num_experts: int):
        self.experts, self.part, self.n = experts, part, num_experts

    def __getitem__(self, e):
        return self.experts[int(e)][self.part]

    def __len__(self):
        return self.n
