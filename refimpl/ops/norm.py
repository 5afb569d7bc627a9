"""RMSNorm."""

from __future__ import annotations

import numpy as np

from ..numerics import to_accum


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """y = weight * round(x / sqrt(mean(x^2, last axis) + eps)).

    # [..., H], [H] -> [..., H]
    As the Hugging Face modeling file: the statistics and the normalisation are computed in
    the accumulation dtype (float32 for half inputs), the normalised value is rounded to x's
    dtype *before* the multiplication by the weight, and the product is rounded again.
    """
    xa = to_accum(x)
    variance = np.mean(xa * xa, axis=-1, keepdims=True)
    normed = (xa * (1.0 / np.sqrt(variance + eps))).astype(x.dtype)
    return (to_accum(weight) * to_accum(normed)).astype(x.dtype)
