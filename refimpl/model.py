"""The openPangu decoder (dense Embedded and Pro-MoE MoGE) built from named weights.

Per layer, pre-norm, residual stream in the storage dtype:

    h = x + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))   n1 = rmsnorm(x)
    y = h + mlp(rmsnorm(h))      mlp = SwiGLU (dense) or the MoGE block (routed + shared)

then a final RMSNorm and the LM head (the embedding table when tied).
"""

from __future__ import annotations

import numpy as np

from .backend import get_ops
from .cache import KVCache, PagedKVCache, QuantKVCache
from .config import ModelConfig, resolve_config
from .errors import InputError
from .numerics import accum_dtype, storage_dtype
from .ops import rope_tables
from .taps import Taps
from .quant.format import PARTS, check_quant_weights, quantised_linears
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
                 lazy: bool = False, check: bool = True, upcast_weights: bool = True,
                 quant: dict | None = None):
        self.config: ModelConfig = resolve_config(config)
        self.numerics = numerics
        self.dtype = storage_dtype(numerics)
        self.backend = backend
        self.ops = get_ops(backend)
        #: quant_model_description.json of a W8A8 checkpoint (None: a float model)
        self.quant_description = quant
        if quant is not None:
            self.quant = (check_quant_weights(self.config, weights, quant) if check
                          else quantised_linears(quant, weights))     # prefix -> scheme
        else:
            if check:
                check_weights(self.config, weights)
            self.quant = {}
        #: tensors used as stored: the int8 weights, their scales, offsets and biases
        self.as_stored = {name for name in weights if name.rsplit(".", 1)[0] in self.quant
                          and not name.endswith(".bias")} | \
            {name for name in weights if name.endswith(".kv_cache_scale")}
        self.lazy = lazy
        self.upcast_weights = upcast_weights or not lazy
        if lazy:
            self.weights = weights
        else:
            self.weights = {name: w if name in self.as_stored
                            else np.asarray(w).astype(self.dtype, copy=False)
                            for name, w in weights.items()}

    # ------------------------------------------------------------------ weights
    def w(self, name: str) -> np.ndarray:
        """The named weight in the storage dtype (as stored, with upcast_weights=False)."""
        arr = self.weights[name]
        if arr.dtype == self.dtype or not self.upcast_weights or name in self.as_stored:
            return arr
        return np.asarray(arr).astype(self.dtype)

    def _opt(self, name: str):
        return self.w(name) if name in self.weights else None

    def _swiglu_weights(self, prefix: str):
        return (self.w(prefix + "gate_proj.weight"), self.w(prefix + "up_proj.weight"),
                self.w(prefix + "down_proj.weight"))

    # ------------------------------------------------------------------ linears
    @property
    def scheme(self) -> str | None:
        """'W8A8' | 'W8A8_DYNAMIC' for a quantised checkpoint, else None."""
        return self.quant_description["model_quant_type"] if self.quant_description else None

    def quant_params(self, prefix: str) -> dict:
        """The tensors of the quantised linear `prefix` as `ops.w8a8_linear` takes them."""
        q = {"scheme": self.quant[prefix], "bias": self._opt(prefix + ".bias")}
        for part in PARTS[q["scheme"]] + ("weight",):
            q[part] = self.w(f"{prefix}.{part}")
        return q

    def proj(self, x: np.ndarray, prefix: str, record=None) -> np.ndarray:
        """The linear `prefix` (e.g. 'model.layers.0.self_attn.q_proj'): x @ W^T + b, or
        the W8A8 linear of a quantised checkpoint, whose int8 / int32 intermediates go to
        `record` as '<name>.x_q', '<name>.acc' (and '<name>.token_scale'), name the prefix
        without 'model.layers.L.'. # [T, k] -> [T, n]"""
        if prefix not in self.quant:
            return self.ops.linear(x, self.w(prefix + ".weight"), self._opt(prefix + ".bias"))
        short = prefix.split(".", 3)[3] if prefix.startswith("model.layers.") else prefix
        rec = (lambda name, array: record(f"{short}.{name}", array)) if record else None
        return self.ops.w8a8_linear(x, self.quant_params(prefix), rec)

    def mlp(self, x: np.ndarray, prefix: str, record=None) -> np.ndarray:
        """SwiGLU of the MLP at `prefix` ('model.layers.L.mlp.' or its shared expert):
        fused `ops.swiglu` for float weights; when any of the three is W8A8, the gate and
        up linears, `ops.silu_and_mul`, the down linear, each quantised or FLOAT as the
        checkpoint has it (vllm-ascend's MergedColumnParallel gate_up, SiluAndMul,
        RowParallel down). # [T, H] -> [T, H]"""
        if not any(prefix + k in self.quant for k in ("gate_proj", "up_proj", "down_proj")):
            return self.ops.swiglu(x, *self._swiglu_weights(prefix))
        g = self.proj(x, prefix + "gate_proj", record)
        u = self.proj(x, prefix + "up_proj", record)
        return self.proj(self.ops.silu_and_mul(g, u), prefix + "down_proj", record)

    def lm_head(self) -> np.ndarray:
        name = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        return self.w(name)

    # ------------------------------------------------------------------ forward
    def new_cache(self, capacity: int = 64) -> KVCache:
        """The cache `forward` appends to: a `QuantKVCache` (int8) for a C8 checkpoint."""
        c = self.config
        if self.kv_cache_type == "C8":
            layers = range(c.num_hidden_layers)
            scale = lambda i, kv: self.w(f"model.layers.{i}.self_attn.{kv}_proj.kv_cache_scale")  # noqa: E731
            return QuantKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                                self.dtype, [scale(i, "k") for i in layers],
                                [scale(i, "v") for i in layers], capacity)
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.dtype,
                       capacity)

    @property
    def kv_cache_type(self) -> str | None:
        """'C8' when the checkpoint carries int8 KV-cache scales, else None."""
        return (self.quant_description or {}).get("kv_cache_type")

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
        q, k, v = (each(lambda rows, r, n=n: self.proj(rows, a + f"{n}_proj", r), n1, record)
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
        o = each(lambda rows, r: self.proj(rows, a + "o_proj", r), attn, record)
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
            if p + "mlp.experts.0.down_proj" in self.quant:
                m = each(lambda rows, rec, forced=None: ops.quant_moe_block(
                    rows, self.w(p + "mlp.gate.weight"), self.w(p + "mlp.router_scale"),
                    _QuantLayerExperts(self, p + "mlp.experts."),
                    lambda xs, r: self.mlp(xs, p + "mlp.shared_expert.", r), c.num_groups,
                    self.scheme, record=rec, expert_ids=forced,
                    router_softmax_dtype=c.router_softmax_dtype,
                    num_voted_experts=c.voted_experts),
                    n2, record, *([] if expert_ids is None else [expert_ids]))
            else:
                m = each(lambda rows, rec, forced=None: ops.moe_block(
                    rows, self.w(p + "mlp.gate.weight"), self.w(p + "mlp.router_scale"),
                    _LayerExperts(self, p + "mlp.experts."),
                    self._swiglu_weights(p + "mlp.shared_expert."), c.num_groups, record=rec,
                    expert_ids=forced, router_softmax_dtype=c.router_softmax_dtype,
                    weight_point=c.moe_weight_point, num_voted_experts=c.voted_experts),
                    n2, record, *([] if expert_ids is None else [expert_ids]))
        else:
            m = each(lambda rows, r: self.mlp(rows, p + "mlp.", r), n2, record)
        y = ops.add(h, m)                                    # [T, H]
        rec("mlp_out", m), rec("out", y)
        return y

    # ------------------------------------------------------------------ serving a batch
    def new_paged_cache(self, num_blocks: int, block_size: int = 128, order=None) -> PagedKVCache:
        c = self.config
        if self.kv_cache_type is not None:
            raise InputError(f"the {self.kv_cache_type} (int8) KV cache has no paged form in "
                             "refimpl yet; use forward with new_cache()")
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
        if self.kv_cache_type is not None:
            raise InputError(f"Model.step: the {self.kv_cache_type} (int8) KV cache is "
                             "implemented for forward's contiguous cache only, not the paged one")
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


class _QuantLayerExperts:
    """experts[e] -> (w13 int8 [2I, H], w13_scale float32 [2I], w2 int8 [H, I], w2_scale
    float32 [H]) of one W8A8 layer, built only when asked for; `input_scales` the layer's
    (s13, s2): the max over the experts' input_scale (the static scheme's)."""

    def __init__(self, model: Model, prefix: str):
        self.model, self.prefix = model, prefix

    def _t(self, e: int, name: str) -> np.ndarray:
        return self.model.w(f"{self.prefix}{int(e)}.{name}")

    def __getitem__(self, e: int):
        g, u, d = (f"{n}_proj." for n in ("gate", "up", "down"))
        w13 = np.concatenate([self._t(e, g + "weight"), self._t(e, u + "weight")])
        s13 = np.concatenate([np.asarray(self._t(e, g + "weight_scale"), np.float32),
                              np.asarray(self._t(e, u + "weight_scale"), np.float32)])
        return (w13, s13.reshape(-1), self._t(e, d + "weight"),
                np.asarray(self._t(e, d + "weight_scale"), np.float32).reshape(-1))

    @property
    def input_scales(self):
        E = self.model.config.num_experts
        gate = max(np.float32(self._t(e, "gate_proj.input_scale")[0]) for e in range(E))
        down = max(np.float32(self._t(e, "down_proj.input_scale")[0]) for e in range(E))
        return gate, down

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
