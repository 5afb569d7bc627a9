"""Taps: named intermediates captured during a forward pass (for goldens and notebooks).

Names (i = layer index):
    embed
    layers.{i}.input            residual stream entering the layer       [T, H]
    layers.{i}.input_norm       input_layernorm output                   [T, H]
    layers.{i}.q / .k / .v      projections before RoPE                  [T, heads, D]
    layers.{i}.q_rope / .k_rope after RoPE                               [T, heads, D]
    layers.{i}.attn             attention output before o_proj           [T, Hq*D]
    layers.{i}.attn_out         after o_proj                             [T, H]
    layers.{i}.resid_mid        x + attn_out                             [T, H]
    layers.{i}.post_norm        post_attention_layernorm output          [T, H]
    layers.{i}.router_logits / .expert_ids / .expert_weights             (MoGE layers)
    layers.{i}.experts.{e}.token_idx / .in / .out                        (selected experts)
    layers.{i}.shared_expert_out                                         (MoGE layers)
    layers.{i}.mlp_out          MLP or MoE block output                  [T, H]
    layers.{i}.out              residual stream leaving the layer        [T, H]
    final_norm                                                           [T, H]
    logits                                                               [T, V]
"""

from __future__ import annotations

import numpy as np


class Taps:
    """Collects copies of named arrays; `layers` limits which layers are recorded.

    routing=True also keeps the expert selection of every MoGE layer, wanted or not, in
    `routing` {layer: expert_ids [T, G]} (what `Model.forward(expert_ids=...)` takes to
    force the same routing on another run, such as the float64 reference).
    """

    def __init__(self, layers=None, routing: bool = False):
        self.layers = None if layers is None else set(int(i) for i in layers)
        self.arrays: dict[str, np.ndarray] = {}
        self.routing: dict[int, np.ndarray] | None = {} if routing else None

    def wants_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def record(self, name: str, array) -> None:
        self.arrays[name] = np.array(array, copy=True)

    def layer_recorder(self, layer: int):
        """A record(name, array) function prefixing `layers.{layer}.`, or None if unwanted
        (and no routing is kept)."""
        wanted = self.wants_layer(layer)
        if not wanted and self.routing is None:
            return None

        def record(name, array):
            if name == "expert_ids" and self.routing is not None:
                self.routing[layer] = np.array(array, copy=True)
            if wanted:
                self.record(f"layers.{layer}.{name}", array)
        return record

    def __getitem__(self, name):
        return self.arrays[name]

    def __contains__(self, name):
        return name in self.arrays

    def __iter__(self):
        return iter(self.arrays)


#: taps of a `Model.step` that describe the batch, not its tokens (`split_step` gives each
#: entry all of them)
BATCH_TAPS = ("q_lens", "kv_lens", "block_tables")


def split_step(taps: Taps, q_lens) -> list:
    """The taps of one `Model.step` cut per entry: [{name: array}, ...] in batch order.

    Token-major arrays (first axis N = sum q_lens) give entry b its rows; an expert's
    `token_idx` (into the packed rows) keeps entry b's tokens, shifted to count from 0, with
    the matching rows of the expert's `in` and `out` (an expert none of b's tokens chose is
    left out, as `forward` leaves it out); BATCH_TAPS go to every entry. So entry b's dict
    holds what `Model.forward` records for the same tokens.
    """
    lens = np.asarray(q_lens, np.int64)
    bounds = np.r_[0, np.cumsum(lens)]
    N = int(bounds[-1])
    out = [{} for _ in lens]
    for name, a in taps.arrays.items():
        if name in BATCH_TAPS:
            for d in out:
                d[name] = a
        elif ".experts." in name and name.endswith((".in", ".out")):
            continue                                     # with their token_idx, below
        elif ".experts." in name and name.endswith(".token_idx"):
            stem = name[:-len("token_idx")]
            for b, d in enumerate(out):
                mine = (a >= bounds[b]) & (a < bounds[b + 1])
                if mine.any():
                    d[name] = a[mine] - bounds[b]
                    for part in ("in", "out"):
                        if stem + part in taps.arrays:
                            d[stem + part] = taps.arrays[stem + part][mine]
        elif a.ndim >= 1 and a.shape[0] == N:
            for b, d in enumerate(out):
                d[name] = a[bounds[b]:bounds[b + 1]]
        else:
            raise ValueError(f"tap {name!r} of shape {list(a.shape)} is neither per token "
                             f"({N} rows) nor a batch tap")
    return out
