"""The openPangu decoder (dense Embedded and Pro-MoE MoGE) built from named weights.

Per layer, pre-norm, residual stream in the storage dtype:

    h = x + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))   n1 = rmsnorm(x)
    y = h + mlp(rmsnorm(h))      mlp = SwiGLU (dense) or the MoGE block (routed + shared)

then a final RMSNorm and the LM head (the embedding table when tied).
"""

from __future__ import annotations

import numpy as np

from .backend import get_ops
from .cache import KVCache
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
              expert_ids=None) -> np.ndarray:
        """One decoder layer. # [T, H] -> [T, H]
        `expert_ids` [T, G] forces the MoGE selection (`refimpl.ops.moe_block`)."""
        c, ops = self.config, self.ops
        p = f"model.layers.{i}."
        T = x.shape[0]
        Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        rec = record or (lambda name, array: None)
        rec("input", x)

        n1 = ops.rms_norm(x, self.w(p + "input_layernorm.weight"), c.rms_norm_eps)  # [T, H]
        a = p + "self_attn."
        q = ops.linear(n1, self.w(a + "q_proj.weight"), self._opt(a + "q_proj.bias"))
        k = ops.linear(n1, self.w(a + "k_proj.weight"), self._opt(a + "k_proj.bias"))
        v = ops.linear(n1, self.w(a + "v_proj.weight"), self._opt(a + "v_proj.bias"))
        q, k, v = q.reshape(T, Hq, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
        rec("input_norm", n1), rec("q", q), rec("k", k), rec("v", v)
        q = ops.apply_rope(q, cos, sin)                     # [T, Hq, D]
        k = ops.apply_rope(k, cos, sin)                     # [T, Hkv, D]
        rec("q_rope", q), rec("k_rope", k)
        k_all, v_all = cache.append(i, k, v) if cache is not None else (k, v)  # [S, Hkv, D]
        attn = ops.attention(q, k_all, v_all, causal=True).reshape(T, Hq * D)  # [T, Hq*D]
        o = ops.linear(attn, self.w(a + "o_proj.weight"), self._opt(a + "o_proj.bias"))
        h = ops.add(x, o)                                    # [T, H]
        rec("attn", attn), rec("attn_out", o), rec("resid_mid", h)

        n2 = ops.rms_norm(h, self.w(p + "post_attention_layernorm.weight"), c.rms_norm_eps)
        rec("post_norm", n2)
        if c.layer_is_moe(i):
            m = ops.moe_block(n2, self.w(p + "mlp.gate.weight"), self.w(p + "mlp.router_scale"),
                              _LayerExperts(self, p + "mlp.experts."),
                              self._swiglu_weights(p + "mlp.shared_expert."),
                              c.num_groups, record=record, expert_ids=expert_ids)
        else:
            m = ops.swiglu(n2, *self._swiglu_weights(p + "mlp."))
        y = ops.add(h, m)                                    # [T, H]
        rec("mlp_out", m), rec("out", y)
        return y

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
