"""The openPangu decoder (dense Embedded and Pro-MoE MoGE) built from named weights.

Per layer, pre-norm, residual stream in the storage dtype:

    h = x + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))   n1 = rmsnorm(x)
    y = h + mlp(rmsnorm(h))      mlp = SwiGLU (dense) or the MoGE block (routed + shared)

then a final RMSNorm and the LM head (the embedding table when tied).
"""

from __future__ import annotations

import numpy as np

from .backend import get_ops
from .cache import KVCache, PagedKVCache
from .config import ModelConfig, resolve_config
from .errors import InputError
from .numerics import accum_dtype, storage_dtype
from .ops import rope_tables
from .taps import Taps
from .weights import check_weights


class Model:
    """A model from a config and a dict of arrays named as in the Hugging Face checkpoint.

    numerics: 'fp64' | 'fp32' | 'bf16' | 'fp16' (storage dtype of weights and activations).
    backend: 'numpy' (the spec) | 'numba' (the fast kernels).
    lazy: convert each weight to the storage dtype when it is used instead of up front, so a
    memory-mapped checkpoint is read layer by layer and only selected experts are touched.
    upcast_weights=False (with lazy): hand every weight to the operators in the dtype it is
    stored in; each operator upcasts it exactly where it is used (linear a block of rows at a
    time, the embedding only the looked-up rows). This is the float64 reference of a
    low-precision model (`refimpl.golden.reference_model`): no float64 copy of a large weight
    is ever made.
    """

    def __init__(self, config, weights, numerics: str = "fp32", backend: str = "numpy",
                 lazy: bool = False, check: bool = True, upcast_weights: bool = True):
        self.config: ModelConfig = resolve_config(config)
        self.numerics = numerics
        self.dtype = storage_dtype(numerics)
        self.backend = backend
        self.ops = get_ops(backend)
        if check:
            check_weights(self.config, weights)
        self.lazy = lazy
        self.upcast_weights = upcast_weights or not lazy
        if lazy:
            self.weights = weights
        else:
            self.weights = {name: np.asarray(w).astype(self.dtype, copy=False)
                            for name, w in weights.items()}

    # ------------------------------------------------------------------ weights
    def w(self, name: str) -> np.ndarray:
        """The named weight in the storage dtype (as stored, with upcast_weights=False)."""
        arr = self.weights[name]
        if arr.dtype == self.dtype or not self.upcast_weights:
            return arr
        return np.asarray(arr).astype(self.dtype)

    def _opt(self, name: str):
        return self.w(name) if name in self.weights else None

    def _swiglu_weights(self, prefix: str):
        return (self.w(prefix + "gate_proj.weight"), self.w(prefix + "up_proj.weight"),
                self.w(prefix + "down_proj.weight"))

    def lm_head(self) -> np.ndarray:
        name = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        return self.w(name)

    # ------------------------------------------------------------------ forward
    def new_cache(self, capacity: int = 64) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.dtype,
                       capacity)

    def check_token_ids(self, token_ids) -> np.ndarray:
        """token ids as int64 [T]; InputError for ids outside the vocabulary or empty input."""
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise InputError(f"token ids must be a non-empty 1-D integer sequence, got shape "
                             f"{list(ids.shape)} of {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise InputError(f"token id {int(bad[0])} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        return ids.astype(np.int64)

    def forward(self, token_ids, cache: KVCache | None = None, taps: Taps | None = None,
                last_only: bool = False, progress=None, expert_ids=None) -> np.ndarray:
        """Logits [T, vocab] (or [1, vocab] with last_only) for the tokens after the cache.

        With a cache, the tokens sit at positions cache.length .. cache.length + T - 1 and
        their keys/values are appended, so a prefill followed by one-token steps gives the
        same logits as one forward over the whole sequence. `progress(layer)` is called
        after each layer. `expert_ids` {layer: [T, G]} forces the MoGE selection of those
        layers (the float64 reference of a low-precision run takes that run's routing;
        `Taps(routing=True)` collects it).
        """
        c, ops = self.config, self.ops
        ids = self.check_token_ids(token_ids)               # [T]
        start = cache.length if cache is not None else 0
        if start + ids.size > c.max_position_embeddings:
            raise InputError(f"{start + ids.size} positions exceed max_position_embeddings "
                             f"{c.max_position_embeddings}")
        positions = np.arange(start, start + ids.size)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, angles=c.rope_angles,
                               dtype=accum_dtype(self.dtype))  # [T, D] each
        x = ops.embedding(ids, self.w("model.embed_tokens.weight"))  # [T, H]
        x = x.astype(self.dtype, copy=False)       # the rows only, if the table is stored lower
        if taps is not None:
            taps.record("embed", x)
        for i in range(c.num_hidden_layers):
            record = taps.layer_recorder(i) if taps is not None else None
            forced = None if expert_ids is None else expert_ids.get(i)
            x = self.layer(i, x, cos, sin, cache, record, expert_ids=forced)
            if progress:
                progress(i)
        if cache is not None:
            cache.advance(ids.size)
        if last_only:
            x = x[-1:]
        x = ops.rms_norm(x, self.w("model.norm.weight"), c.rms_norm_eps)  # [T, H]
        logits = ops.linear(x, self.lm_head())                            # [T, H] -> [T, V]
        if taps is not None:
            taps.record("final_norm", x)
            taps.record("logits", logits)
        return logits

    def layer(self, i: int, x: np.ndarray, cos, sin, cache=None, record=None,
              expert_ids=None, paged=None) -> np.ndarray:
        """One decoder layer. # [T, H] -> [T, H]
        `expert_ids` [T, G] forces the MoGE selection (`refimpl.ops.moe_block`). `paged`: the
        packed batch of `step` (keys through its paged cache; the projections and the MLP
        per entry where the backend needs it)."""
        c, ops = self.config, self.ops
        each = paged.each if paged is not None else (lambda fn, rows, rec=None, *aligned:
                                                     fn(rows, rec, *aligned))
        p = f"model.layers.{i}."
        T = x.shape[0]
        Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        rec = record or (lambda name, array: None)
        rec("input", x)

        n1 = ops.rms_norm(x, self.w(p + "input_layernorm.weight"), c.rms_norm_eps)  # [T, H]
        a = p + "self_attn."
        q, k, v = (each(lambda rows, _, n=n: ops.linear(rows, self.w(a + f"{n}_proj.weight"),
                                                         self._opt(a + f"{n}_proj.bias")), n1)
                   for n in "qkv")
        q, k, v = q.reshape(T, Hq, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
        rec("input_norm", n1), rec("q", q), rec("k", k), rec("v", v)
        q = ops.apply_rope(q, cos, sin)                     # [T, Hq, D]
        k = ops.apply_rope(k, cos, sin)                     # [T, Hkv, D]
        rec("q_rope", q), rec("k_rope", k)
        if paged is not None:
            attn = paged.attend(ops, i, q, k, v).reshape(T, Hq * D)        # [N, Hq*D]
        else:
            k_all, v_all = cache.append(i, k, v) if cache is not None else (k, v)  # [S, Hkv, D]
            attn = ops.attention(q, k_all, v_all, causal=True).reshape(T, Hq * D)  # [T, Hq*D]
        o = each(lambda rows, _: ops.linear(rows, self.w(a + "o_proj.weight"),
                                            self._opt(a + "o_proj.bias")), attn)
        w_post = self.w(p + "post_attention_layernorm.weight")
        if c.residual_rounding == "fused_add_norm":          # the serving path's fused kernel
            n2, h, _ = ops.add_rms_norm(o, x, w_post, c.rms_norm_eps)
        else:
            h = ops.add(x, o)                                # [T, H]
            n2 = ops.rms_norm(h, w_post, c.rms_norm_eps)
        rec("attn", attn), rec("attn_out", o), rec("resid_mid", h)

        rec("post_norm", n2)
        if c.layer_is_moe(i):
            if expert_ids is None and c.voted_experts and paged is not None \
                    and not paged.packed and len(paged.bounds) > 1:
                # the voted router's vote spans the whole batch: route it at once, then
                # run each entry with that selection
                logits = each(lambda rows, _: ops.linear(rows, self.w(p + "mlp.gate.weight")),
                              n2)
                expert_ids, _ = ops.moge_route(logits, self.w(p + "mlp.router_scale"),
                                               c.num_groups,
                                               softmax_dtype=c.router_softmax_dtype,
                                               num_voted_experts=c.voted_experts)
            m = each(lambda rows, rec, forced=None: ops.moe_block(
                rows, self.w(p + "mlp.gate.weight"), self.w(p + "mlp.router_scale"),
                _LayerExperts(self, p + "mlp.experts."),
                self._swiglu_weights(p + "mlp.shared_expert."), c.num_groups, record=rec,
                expert_ids=forced, router_softmax_dtype=c.router_softmax_dtype,
                weight_point=c.moe_weight_point, num_voted_experts=c.voted_experts),
                n2, record, *([] if expert_ids is None else [expert_ids]))
        else:
            m = each(lambda rows, _: ops.swiglu(rows, *self._swiglu_weights(p + "mlp.")), n2)
        y = ops.add(h, m)                                    # [T, H]
        rec("mlp_out", m), rec("out", y)
        return y

    # ------------------------------------------------------------------ serving a batch
    def new_paged_cache(self, num_blocks: int, block_size: int = 128, order=None) -> PagedKVCache:
        c = self.config
        return PagedKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.dtype,
                            num_blocks, block_size, order)

    def step(self, batch, cache: PagedKVCache, taps: Taps | None = None,
             expert_ids=None) -> list:
        """One scheduler step over a paged cache: logits [n_b, vocab] for each entry.

        batch: [(seq_id, token_ids), ...], distinct sequences; entry b's n_b tokens follow the
        positions the cache holds for its sequence (a whole prompt, a prefill chunk, or one
        decode token; a sequence new to the cache starts at position 0). All tokens are packed
        along one axis [N = sum n_b, ...]; each layer writes the new keys and values through
        the slot mapping (`reshape_and_cache`), decode entries (n_b = 1) attend through their
        block tables (`paged_attention`) and the others over their gathered positions
        (`attention_varlen`). Every entry's logits equal `forward` of the same tokens on that
        sequence alone with a `KVCache` holding the same prefix, bit for bit: the Numba
        kernels compute a row the same whatever the batch, so they run the packed batch at
        once; the spec's projections and MoE block run entry by entry (BLAS's last bits
        depend on a product's row count). `taps` receives the packed batch's intermediates
        (the names of `refimpl.taps`, rows in batch order, experts' token_idx into the packed
        rows) and the step's `positions`, `slot_mapping`, `q_lens`, `kv_lens`,
        `block_tables`; `refimpl.taps.split_step` cuts them per entry. `expert_ids` {layer:
        [N, G]} forces the MoGE selection of the packed tokens (as `forward`'s).
        """
        c, ops = self.config, self.ops
        seqs = [seq for seq, _ in batch]
        if not seqs or len(set(seqs)) != len(seqs):
            raise InputError("a step needs at least one entry and each sequence at most once")
        ids = [self.check_token_ids(t) for _, t in batch]
        q_lens = np.array([a.size for a in ids], np.int64)                     # [B]
        starts = np.array([cache.length(seq) for seq in seqs], np.int64)
        kv_lens = starts + q_lens
        if (kv_lens > c.max_position_embeddings).any():
            b = int(np.argmax(kv_lens > c.max_position_embeddings))
            raise InputError(f"sequence {seqs[b]!r}: {int(kv_lens[b])} positions exceed "
                             f"max_position_embeddings {c.max_position_embeddings}")
        need = sum(cache.blocks_needed(seq, int(n)) for seq, n in zip(seqs, q_lens))
        if need > cache.free_blocks:
            raise InputError(f"paged cache full: the step needs {need} more blocks of "
                             f"{cache.block_size}, {cache.free_blocks} free")
        slots = np.concatenate([cache.reserve(seq, int(n)) for seq, n in zip(seqs, q_lens)])
        positions = np.concatenate([np.arange(a, b) for a, b in zip(starts, kv_lens)])  # [N]
        bounds = list(zip(np.r_[0, np.cumsum(q_lens)[:-1]], np.cumsum(q_lens)))
        paged = _PagedBatch(cache, seqs, q_lens, kv_lens, slots, bounds,
                            packed=getattr(ops, "ROWS_INDEPENDENT", False))
        if taps is not None:
            for name, a in (("positions", positions), ("slot_mapping", slots),
                            ("q_lens", q_lens), ("kv_lens", kv_lens),
                            ("block_tables", paged.tables)):
                taps.record(name, a)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, angles=c.rope_angles,
                               dtype=accum_dtype(self.dtype))  # [N, D] each
        x = ops.embedding(np.concatenate(ids), self.w("model.embed_tokens.weight"))
        x = x.astype(self.dtype, copy=False)                    # [N, H]
        if taps is not None:
            taps.record("embed", x)
        for i in range(c.num_hidden_layers):
            record = taps.layer_recorder(i) if taps is not None else None
            forced = None if expert_ids is None else expert_ids.get(i)
            x = self.layer(i, x, cos, sin, record=record, expert_ids=forced, paged=paged)
        for seq, n in zip(seqs, q_lens):
            cache.advance(seq, int(n))
        x = ops.rms_norm(x, self.w("model.norm.weight"), c.rms_norm_eps)   # [N, H]
        logits = paged.each(lambda rows, _: ops.linear(rows, self.lm_head()), x)  # [N, V]
        if taps is not None:
            taps.record("final_norm", x)
            taps.record("logits", logits)
        return [logits[a:b] for a, b in bounds]

    # ------------------------------------------------------------------ convenience
    def __call__(self, token_ids, cache=None):
        return self.forward(token_ids, cache)

    def __repr__(self):
        c = self.config
        return (f"Model({c.family}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"numerics={self.numerics}, backend={self.backend})")


class _LayerExperts:
    """experts[e] -> (w_gate, w_up, w_down) of one layer, read only when asked for."""

    def __init__(self, model: Model, prefix: str):
        self.model, self.prefix = model, prefix

    def __getitem__(self, e: int):
        return self.model._swiglu_weights(f"{self.prefix}{int(e)}.")

    def __len__(self):
        return self.model.config.num_experts


class _PagedBatch:
    """The packed batch of one `Model.step`: its sequences' lengths, slots and block tables,
    and the two things a layer does differently for it (attention through the paged cache;
    row-count-sensitive operators entry by entry)."""

    def __init__(self, cache: PagedKVCache, seqs, q_lens, kv_lens, slots, bounds,
                 packed: bool):
        self.cache, self.q_lens, self.kv_lens, self.packed = cache, q_lens, kv_lens, packed
        self.slots, self.bounds = slots, bounds
        self.tables = cache.block_tables(seqs)                      # [B, max_blocks] int32
        self.decode = q_lens == 1                                   # [B]
        token_entry = np.repeat(np.arange(len(seqs)), q_lens)       # [N]
        self.decode_rows = self.decode[token_entry]                 # [N]

    def each(self, fn, rows, record=None, *aligned):
        """fn(rows, record, *aligned) on the packed rows at once when the backend computes a
        row the same whatever the batch (the Numba kernels), else entry by entry (`aligned`
        arrays cut with the rows) with the results and the taps fn records concatenated in
        batch order (experts' token_idx shifted to packed rows). # [N, ...] -> [N, ...]"""
        if self.packed or len(self.bounds) == 1:
            return fn(rows, record, *aligned)
        parts, recorded = [], {}
        for a, b in self.bounds:
            def rec(name, array, a=a):
                array = np.asarray(array)
                recorded.setdefault(name, []).append(array + a if name.endswith(".token_idx")
                                                     else array)
            parts.append(fn(rows[a:b], rec if record is not None else None,
                            *(x[a:b] for x in aligned)))
        for name, arrays in recorded.items():
            record(name, np.concatenate(arrays))
        return np.concatenate(parts)

    def attend(self, ops, layer: int, q, k, v) -> np.ndarray:
        """Write k, v [N, Hkv, D] at the step's slots, then attend: decode entries through
        their block tables, the others over their positions gathered from the cache.
        # q [N, Hq, D] -> [N, Hq, D]"""
        cache = self.cache
        cache.write(layer, k, v, self.slots)
        kc, vc = cache.key_cache[layer], cache.value_cache[layer]
        out = np.empty(q.shape, q.dtype)
        if self.decode.any():
            out[self.decode_rows] = ops.paged_attention(
                q[self.decode_rows], kc, vc, self.tables[self.decode], self.kv_lens[self.decode])
        chunk = ~self.decode
        if chunk.any():
            keys = [ops.gather_paged(kc, self.tables[b], int(self.kv_lens[b]))
                    for b in np.flatnonzero(chunk)]
            values = [ops.gather_paged(vc, self.tables[b], int(self.kv_lens[b]))
                      for b in np.flatnonzero(chunk)]
            out[~self.decode_rows] = ops.attention_varlen(
                q[~self.decode_rows], np.concatenate(keys), np.concatenate(values),
                self.q_lens[chunk], self.kv_lens[chunk])
        return out
