"""Expert parallelism of the MoE block, specified: the experts split over `ep_size` ranks,
tokens sent to the rank of each chosen expert (all-to-all), computed there, sent back and
combined (DEPLOYMENT.md section 3).

The layout this spec fixes (the one vLLM's default linear expert map gives):

* expert e lives on rank e // (E / ep_size) (contiguous blocks; ep_size divides E). With
  Pro-MoE's 64 experts in 8 groups, ep_size 8 puts one group on each rank, 16 half a group.
* the T tokens of the step are split into ep_size contiguous shards (`np.array_split`
  sizes): shard s is the tokens source rank s owns (data-parallel attention before the MoE).
* the router and the shared expert are evaluated on all T tokens at once, as every rank
  does in vllm-ascend's all-gather scheme (the voted router's vote needs the whole batch).
* source rank s dispatches its tokens (`moe_dispatch`, v1 slots, over its shard): its rows
  are in expert order, hence in destination-rank order, and it sends the rows of rank r's
  experts to r: send_counts[s, r] rows.
* rank r receives from s = 0, 1, ... in order, sorts the received rows stably by local
  expert (so an expert's rows are its tokens in ascending global order), runs
  `moe_experts` with its local group_list, and returns each row to where it came from.
* source s combines its tokens' rows (`moe_unpermute`) and adds the shared expert.

Every expert therefore multiplies exactly the rows, in exactly the order, that the
single-device block gives it, and every combine is per token: the result equals
`moe_block` bit for bit, on any BLAS.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..numerics import round_to, to_accum
from .basic import softmax
from .mlp import swiglu
from .moe import check_weight_point, moe_experts, moe_route_block, moe_unpermute
from .moe_stages import moe_dispatch, slot_token_choice


def expert_rank(num_experts: int, ep_size: int) -> np.ndarray:
    """The rank holding each expert: e // (E / ep_size). # -> int64 [E]"""
    if not isinstance(ep_size, (int, np.integer)) or ep_size < 1 or num_experts % ep_size:
        raise InputError(f"ep_size {ep_size!r} must be a positive divisor of the "
                         f"{num_experts} experts")
    return np.arange(num_experts, dtype=np.int64) // (num_experts // ep_size)


def token_shards(num_tokens: int, ep_size: int) -> np.ndarray:
    """Bounds of the source ranks' token shards (np.array_split sizes). # -> int64 [ep + 1]"""
    sizes = [len(a) for a in np.array_split(np.arange(num_tokens), ep_size)]
    return np.r_[0, np.cumsum(sizes)].astype(np.int64)


def rank_loads(expert_ids, num_experts: int, ep_size: int) -> np.ndarray:
    """Rows each rank computes: the (token, choice) pairs routed to its experts.
    # expert_ids [T, K] -> int64 [ep_size]"""
    ranks = expert_rank(num_experts, ep_size)[np.asarray(expert_ids).reshape(-1)]
    return np.bincount(ranks, minlength=ep_size).astype(np.int64)


def load_spread(loads) -> float:
    """The spread of the ranks' loads: population standard deviation / mean (0 = even)."""
    loads = np.asarray(loads, np.float64)
    return float(loads.std() / loads.mean()) if loads.mean() > 0 else 0.0


def global_topk_ids(router_logits: np.ndarray, k: int) -> np.ndarray:
    """The router MoGE replaces, for the load comparison: the k most probable experts of
    softmax(logits) over all experts (ties: lowest id), in ascending id.
    # router_logits [T, E] -> int64 [T, k]"""
    p = softmax(router_logits, axis=-1).astype(np.float64)
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return np.sort(top, axis=1).astype(np.int64)


class _LocalExperts:
    """experts[first + j] as local expert j of a rank."""

    def __init__(self, experts, first: int, count: int):
        self.experts, self.first, self.count = experts, first, count

    def __getitem__(self, j):
        return self.experts[self.first + int(j)]

    def __len__(self):
        return self.count


def moe_block_ep(x: np.ndarray, gate_weight: np.ndarray, router_scale: np.ndarray, experts,
                 shared_expert, num_groups: int, ep_size: int, expert_ids=None,
                 router_softmax_dtype: str = "float32", weight_point: str = "after_down",
                 num_voted_experts=None):
    """The MoE block computed over ep_size expert-parallel ranks (see the module docstring).

    # x [T, H] -> y [T, H] (== moe_block(...) bit for bit), plan
    plan: dict of
      router_logits [T, E], expert_ids [T, G], expert_weights [T, G] (as moe_block records)
      token_bounds  int64 [ep + 1]    source rank s owns tokens token_bounds[s] .. [s+1] - 1
      send_counts   int64 [ep, ep]    rows source s sends to rank r (rank r sends the same
                                      number back); loads = send_counts.sum(0)
      ranks: one dict per rank r with
        experts         [first, last + 1) the global ids it holds
        recv_token_idx  int64 [n_r]     global token of each received row (receive order:
                                        source 0's rows first, each source's in its
                                        dispatch order)
        recv_expert_ids int64 [n_r]     global expert of each received row
        x               [n_r, H]        the received rows
        row_weights     [n_r]           their routing weights (storage dtype; used before
                                        down_proj under weight_point "before_down")
        local_order     int64 [n_r]     the stable sort by local expert (received row of
                                        local row i)
        group_list      int64 [E_r]     cumulative rows per local expert
        out             [n_r, H]        the expert outputs, in receive order (what it sends
                                        back)
    """
    check_weight_point(weight_point)
    dt = x.dtype
    T = x.shape[0]
    router_logits, ids, weights = moe_route_block(x, gate_weight, router_scale, num_groups,
                                                  expert_ids, router_softmax_dtype,
                                                  num_voted_experts)
    E, G = router_logits.shape[1], ids.shape[1]
    owner = expert_rank(E, ep_size)                                   # [E]
    per_rank = E // ep_size
    weights_s = weights.astype(dt)                                    # [T, G]
    bounds = token_shards(T, ep_size)
    send_counts = np.zeros((ep_size, ep_size), np.int64)
    # each source's dispatch, and the pieces it sends: (rows, token, expert, weight) per rank
    pieces = []
    for s in range(ep_size):
        a, b = int(bounds[s]), int(bounds[s + 1])
        d = moe_dispatch(ids[a:b], E, "v1", x[a:b])                   # over the shard
        src = d["sorted_row_idx"]
        tok, choice = slot_token_choice(src, b - a, G)
        dest = owner[d["sorted_expert_ids"]]                          # non-decreasing
        send_counts[s] = np.bincount(dest, minlength=ep_size)
        cut = np.r_[0, np.cumsum(send_counts[s])]
        pieces.append([(d["expanded_x"][cut[r]:cut[r + 1]], a + tok[cut[r]:cut[r + 1]],
                        d["sorted_expert_ids"][cut[r]:cut[r + 1]],
                        weights_s[a + tok[cut[r]:cut[r + 1]], choice[cut[r]:cut[r + 1]]])
                       for r in range(ep_size)])
    ranks = []
    for r in range(ep_size):
        parts = [pieces[s][r] for s in range(ep_size)]
        xr = np.concatenate([p[0] for p in parts])
        token = np.concatenate([p[1] for p in parts]).astype(np.int64)
        expert = np.concatenate([p[2] for p in parts]).astype(np.int64)
        w_rows = np.concatenate([p[3] for p in parts]).astype(dt)
        local = expert - r * per_rank
        order = np.argsort(local, kind="stable")                      # local row -> received
        group_list = np.cumsum(np.bincount(local, minlength=per_rank)).astype(np.int64)
        out_sorted = moe_experts(xr[order], group_list,
                                 _LocalExperts(experts, r * per_rank, per_rank),
                                 w_rows[order] if weight_point == "before_down" else None)
        out = np.empty_like(out_sorted)
        out[order] = out_sorted                                       # back to receive order
        ranks.append({"experts": (r * per_rank, (r + 1) * per_rank), "recv_token_idx": token,
                      "recv_expert_ids": expert, "x": xr, "row_weights": w_rows,
                      "local_order": order.astype(np.int64), "group_list": group_list,
                      "out": out})
    shared = swiglu(x, *shared_expert)                                # [T, H] on all tokens
    y = moe_ep_combine([rank["out"] for rank in ranks], ids, weights_s, send_counts, bounds,
                       shared, E, weight_point)
    plan = {"router_logits": router_logits, "expert_ids": ids, "expert_weights": weights,
            "token_bounds": bounds, "send_counts": send_counts, "ranks": ranks}
    return y, plan


def moe_ep_combine(rank_outputs, expert_ids, weights_s, send_counts, token_bounds, shared,
                   num_experts: int, weight_point: str = "after_down") -> np.ndarray:
    """The sources' side of the return trip: each source rank combines what the ranks send
    back for its tokens, then adds the shared expert.

    # rank_outputs: ep arrays [n_r, H] (each rank's outputs in receive order), expert_ids
    # [T, G], weights_s [T, G] (storage dtype), send_counts [ep, ep], token_bounds [ep + 1],
    # shared [T, H] -> y [T, H]
    Rank r's outputs hold source 0's rows first (send_counts[0, r] of them), then source
    1's, ...; each source's rows from all ranks, concatenated in rank order, are its
    dispatch buffer (its rows in expert order), combined by `moe_unpermute`;
    y = round(routed + shared).
    """
    ep = len(rank_outputs)
    send_counts = np.asarray(send_counts, np.int64)
    if send_counts.shape != (ep, ep):
        raise InputError(f"send_counts must be [{ep}, {ep}] for {ep} ranks, got "
                         f"{list(send_counts.shape)}")
    for r, out in enumerate(rank_outputs):
        if out.shape[0] != send_counts[:, r].sum():
            raise InputError(f"rank {r} returned {out.shape[0]} rows, it received "
                             f"{int(send_counts[:, r].sum())}")
    offsets = [np.r_[0, np.cumsum(send_counts[:, r])] for r in range(ep)]   # by source
    dt = shared.dtype
    y = np.empty(shared.shape, dt)
    for s in range(ep):
        a, b = int(token_bounds[s]), int(token_bounds[s + 1])
        if b == a:                                   # a source with no tokens
            continue
        d = moe_dispatch(expert_ids[a:b], num_experts, "v1")
        down = np.concatenate([rank_outputs[r][offsets[r][s]:offsets[r][s + 1]]
                               for r in range(ep)])
        routed = moe_unpermute(down, d, weights_s[a:b], weight_point)
        y[a:b] = round_to(to_accum(routed) + to_accum(shared[a:b]), dt)
    return y


__all__ = ["expert_rank", "token_shards", "rank_loads", "load_spread", "global_topk_ids",
           "moe_block_ep", "moe_ep_combine"]
