"""Scaled dot-product attention with grouped-query (GQA) heads and a causal mask."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..numerics import round_to, to_accum
from .basic import softmax


def causal_mask(num_queries: int, num_keys: int) -> np.ndarray:
    """allowed[t, j] = key j is visible to query t, where the T queries are the last T of the
    S positions: query t sits at position S - T + t and sees keys j <= S - T + t.

    # -> [T, S] bool
    """
    offset = num_keys - num_queries
    return np.arange(num_keys)[None, :] <= (np.arange(num_queries)[:, None] + offset)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = True,
              scale: float | None = None) -> np.ndarray:
    """o = softmax(q k^T * scale + mask) v per head, scale = head_dim ** -0.5.

    # q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, D] -> [T, Hq, D]
    GQA: query head h reads KV head h // (Hq / Hkv). The T queries are the last T of the S
    positions (prefill: T = S; decode against a cache: T = 1). Cast points as Hugging Face
    eager: s = round(q k^T); s = round(s * scale); p = round(softmax_float32(s));
    o = round(p v).
    """
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    if Hq % Hkv:
        raise InputError(f"attention: {Hkv} KV heads do not divide {Hq} query heads")
    if causal and T > S:
        raise InputError(f"attention: {T} queries but only {S} keys; causal rows would be empty")
    scale = D ** -0.5 if scale is None else scale
    dt = q.dtype
    group = Hq // Hkv
    kv_head = np.arange(Hq) // group                  # [Hq]
    qa = to_accum(q).transpose(1, 0, 2)                # [Hq, T, D]
    ka = to_accum(k)[:, kv_head, :].transpose(1, 2, 0)  # [Hq, D, S]
    va = to_accum(v)[:, kv_head, :].transpose(1, 0, 2)  # [Hq, S, D]
    scores = round_to(qa @ ka, dt)                       # [Hq, T, S]
    scores = round_to(scores * scores.dtype.type(scale), dt)
    if causal:
        scores = np.where(causal_mask(T, S)[None], scores, -np.inf)
    probs = round_to(softmax(scores, axis=-1), dt)     # [Hq, T, S]
    out = round_to(probs @ va, dt)                     # [Hq, T, D]
    return out.transpose(1, 0, 2).astype(dt)
