"""Rotary position embedding (RoPE).

The default convention is "rotate-half" (GPT-NeoX, Hugging Face Llama layout):
``inv_freq[i] = theta^(-2i/d)`` for i < d/2, ``angle = position * inv_freq``,
``cos = cat(cos(angle), cos(angle))`` over the head dimension, and
``x' = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[d/2:], x[:d/2])``.
The interleaved (GPT-J) convention rotates the pairs (x[2i], x[2i+1]) instead; it is a
different function, offered only as `apply_rope_interleaved`.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..numerics import round_to, to_accum


def rope_tables(positions, head_dim: int, theta: float, angles: str = "exact",
                dtype=np.float64):
    """cos and sin tables for the given positions, each [T, head_dim] in `dtype`.

    angles="exact": inv_freq and angle = position * inv_freq in float64, then cos/sin in
    float64 and one rounding to `dtype`. This is the mathematically exact table.
    angles="float32": the Hugging Face recipe: inv_freq = 1 / theta^(arange(0, d, 2)/d) in
    float32, angle = float32(position) * inv_freq rounded to float32, cos/sin of that float32
    angle. The float32 angle of position p is off by up to ulp(p * inv_freq)/2, about 1e-3 rad
    at p = 30000.
    """
    pos = np.asarray(positions)
    half = np.arange(0, head_dim, 2, dtype=np.int64)
    if angles == "exact":
        inv_freq = float(theta) ** (-half.astype(np.float64) / head_dim)
        ang = pos.astype(np.float64)[:, None] * inv_freq[None, :]  # [T, d/2]
    elif angles == "float32":
        exponent = half.astype(np.float32) / np.float32(head_dim)
        # torch's float32 pow is correctly rounded here; NumPy's float32 power is not (1 ulp
        # off at some frequencies), so take the float64 power rounded once to float32.
        power = np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
        inv_freq = (np.float32(1.0) / power).astype(np.float32)
        ang = (pos.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float32)
    else:
        raise ConfigError(f"unknown RoPE angle mode {angles!r}; choose 'exact' or 'float32'")
    emb = np.concatenate([ang, ang], axis=-1).astype(np.float64)  # [T, d]
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """cat(-x[..., d/2:], x[..., :d/2])"""
    d2 = x.shape[-1] // 2
    return np.concatenate([-x[..., d2:], x[..., :d2]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE: round(round(x * cos) + round(rotate_half(x) * sin)).

    # x [T, heads, D], cos/sin [T, D] -> [T, heads, D]
    cos and sin are first rounded to x's dtype (as Hugging Face casts them to the activation
    dtype).
    """
    c = round_to(np.asarray(cos), x.dtype)[:, None, :]
    s = round_to(np.asarray(sin), x.dtype)[:, None, :]
    xa = to_accum(x)
    y = round_to(xa * c, x.dtype) + round_to(rotate_half(xa) * s, x.dtype)
    return y.astype(x.dtype)


def apply_rope_interleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Interleaved (GPT-J) RoPE, from the same rotate-half tables: pair i = (x[2i], x[2i+1])
    rotates by angle i. Not the openPangu convention; here to show and test the difference.

    # x [T, heads, D], cos/sin [T, D] -> [T, heads, D]
    """
    d2 = x.shape[-1] // 2
    c = round_to(np.asarray(cos)[:, :d2], x.dtype)[:, None, :]
    s = round_to(np.asarray(sin)[:, :d2], x.dtype)[:, None, :]
    xa = to_accum(x)
    even, odd = xa[..., 0::2], xa[..., 1::2]
    y = np.empty_like(xa)
    y[..., 0::2] = round_to(even * c, x.dtype) - round_to(odd * s, x.dtype)
    y[..., 1::2] = round_to(odd * c, x.dtype) + round_to(even * s, x.dtype)
    return y.astype(x.dtype)
