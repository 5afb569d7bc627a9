"""Fused SwiGLU: gate and up projections with silu(g) * u in one pass, then down."""

from __future__ import annotations

import numpy as np

from refimpl import ops as spec

from ._dtypes import check_dtype
from .linear import _kernel_ok, gate_up, linear


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """y = down(round(round(silu(round(x Wg^T))) * round(x Wu^T))), the spec's cast points.

    # x [T, H], w_gate/w_up [I, H], w_down [H, I] -> [T, H]
    The gate and up tiles of the same outputs are computed together (`linear.gate_up`), so
    the [T, I] gate and up activations are never stored; only h is. Bit-identical to the
    spec up to the order of each dot product's sum and to exp (libm's expf vs NumPy's).
    """
    x = np.asarray(x)
    w_gate, w_up, w_down = np.asarray(w_gate), np.asarray(w_up), np.asarray(w_down)
    check_dtype(x, "swiglu")
    if (x.ndim != 2 or w_gate.shape != w_up.shape or not _kernel_ok(x, w_gate, w_up)
            or w_down.shape != (x.shape[1], w_gate.shape[0])):
        return spec.swiglu(x, w_gate, w_up, w_down)
    h = gate_up(x, w_gate, w_up)       # [T, I]
    return linear(h, w_down)           # [T, H]
