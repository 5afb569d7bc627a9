"""The SwiGLU feed-forward block (dense MLP, each routed expert, the shared expert)."""

from __future__ import annotations

import numpy as np

from ..numerics import round_to, to_accum
from .basic import linear, silu


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """y = down(silu(gate(x)) * up(x)), weights in the checkpoint's [out, in] layout, no bias.

    # x [T, H], w_gate/w_up [I, H], w_down [H, I] -> [T, H]
    Cast points: gate(x), up(x), silu(.), the product and down(.) are each rounded to x's
    dtype (Hugging Face LlamaMLP in the activation dtype).
    """
    g = linear(x, w_gate)                                   # [T, I]
    u = linear(x, w_up)                                     # [T, I]
    h = round_to(to_accum(silu(g)) * to_accum(u), x.dtype)  # [T, I]
    return linear(h.astype(x.dtype), w_down)                # [T, H]
