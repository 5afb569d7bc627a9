"""Mixture of Grouped Experts (MoGE): the Pangu Pro MoE v1 router and block."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..numerics import round_to, to_accum
from .basic import linear, softmax
from .mlp import swiglu


def moge_route(router_logits: np.ndarray, router_scale: np.ndarray, num_groups: int):
    """Pick one expert per group: global softmax, per-group argmax, times router_scale.

    # router_logits [T, E], router_scale [1, E] or [E] -> expert_ids [T, G] int64, weights [T, G]
    p = softmax(logits) over all E experts (accumulation dtype, float32 for half inputs);
    experts are split into G contiguous groups of E/G (group g = ids g*E/G .. (g+1)*E/G - 1);
    e_g = g*E/G + argmax(p[:, group g]) with ties going to the lowest id;
    weight_g = p[:, e_g] * router_scale[e_g]. No renormalisation, no other scaling.
    The weights are returned in the accumulation dtype.
    """
    T, E = router_logits.shape
    if num_groups <= 0 or E % num_groups:
        raise InputError(f"moge_route: {E} experts do not divide into {num_groups} groups")
    size = E // num_groups
    probs = softmax(router_logits, axis=-1)                       # [T, E]
    local = np.argmax(probs.reshape(T, num_groups, size), axis=-1)  # [T, G], first max wins
    expert_ids = (local + np.arange(num_groups)[None, :] * size).astype(np.int64)
    scale = to_accum(np.asarray(router_scale)).reshape(E).astype(probs.dtype)
    weights = np.take_along_axis(probs, expert_ids, axis=1) * scale[expert_ids]
    return expert_ids, weights


def moe_block(x: np.ndarray, gate_weight: np.ndarray, router_scale: np.ndarray, experts,
              shared_expert, num_groups: int, record=None) -> np.ndarray:
    """y = sum_g round(w_g) * Expert_{e_g}(x) + SharedExpert(x), only selected experts run.

    # x [T, H], gate_weight [E, H], router_scale [1, E] -> [T, H]
    `experts[e]` gives expert e's (w_gate, w_up, w_down) and is read only for selected
    experts (so a lazy, memory-mapped sequence is touched only where routing sends tokens);
    `shared_expert` is its (w_gate, w_up, w_down). Accumulation follows Hugging Face's
    index_add_ in the activation dtype: selected experts in ascending id order, each
    weighted output rounded, then added and rounded; the shared expert is added last.
    `record(name, array)`, if given, receives router_logits, expert_ids, expert_weights and
    each selected expert's token indices, input and output.
    """
    dt = x.dtype
    router_logits = linear(x, gate_weight)                        # [T, E]
    expert_ids, weights = moge_route(router_logits, router_scale, num_groups)
    weights_s = weights.astype(dt)                                # [T, G]
    if record:
        record("router_logits", router_logits)
        record("expert_ids", expert_ids)
        record("expert_weights", weights)
    y = np.zeros_like(to_accum(x))                                # [T, H], values in dt
    for e in np.unique(expert_ids):
        tok, slot = np.nonzero(expert_ids == e)                   # tokens routed to e
        w_gate, w_up, w_down = experts[int(e)]
        out = swiglu(x[tok], w_gate, w_up, w_down)                # [n_e, H]
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
