"""The SwiGLU feed-forward block (dense MLP, each routed expert, the shared expert)."""

from __future__ import annotations

import numpy as np

from ..numerics import round_to, to_accum
from .basic import linear, silu


def silu_and_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """h = round(round(silu(gate)) * up), in gate's dtype. # [T, I], [T, I] -> [T, I]"""
    return round_to(to_accum(silu(gate)) * to_accum(up), gate.dtype).astype(gate.dtype)


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """y = down(silu(gate(x)) * up(x)), weights in the checkpoint's [out, in] layout, no bias.

    # x [T, H], w_gate/w_up [I, H], w_down [H, I] -> [T, H]
    Cast points: gate(x), up(x), silu(.), the product and down(.) are each rounded to x's
    dtype (Hugging Face LlamaMLP in the activation dtype).
    """
    g = linear(x, w_gate)                                   # [T, I]
    u = linear(x, w_up)                                     # [T, I]
    return linear(silu_and_mul(g, u), w_down)               # [T, I] -> [T, H]
