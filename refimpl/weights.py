"""Checks that a dict of named arrays is a complete, well-shaped weight set for a config."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig, weight_shapes
from .errors import CheckpointError


def _listing(names, limit=8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_weights(config: ModelConfig, weights, allow_unexpected: bool = False) -> None:
    """Raise CheckpointError for missing tensors (listed), unexpected tensors, wrong shapes
    (name, expected, found), or a non-floating dtype. `weights` maps name -> array (or any
    object with .shape and .dtype)."""
    expected = weight_shapes(config)
    missing = [n for n in expected if n not in weights]
    if missing:
        raise CheckpointError(f"missing tensors for this config: {_listing(missing)}")
    unexpected = [n for n in weights if n not in expected]
    if unexpected and not allow_unexpected:
        raise CheckpointError(f"unexpected tensors not in this config: {_listing(unexpected)}")
    for name, shape in expected.items():
        found = tuple(weights[name].shape)
        if found != tuple(shape):
            raise CheckpointError(f"tensor {name}: expected shape {list(shape)}, found {list(found)}")
        dtype = np.dtype(weights[name].dtype)
        if dtype.kind != "f" and dtype.name != "bfloat16":
            raise CheckpointError(f"tensor {name}: dtype {weights[name].dtype} is not floating point")


def check_finite(weights) -> None:
    """Raise CheckpointError naming the first tensor that holds NaN or Inf."""
    for name in sorted(weights):
        w = np.asarray(weights[name])
        if not np.isfinite(w.astype(np.float32, copy=False)).all():
            raise CheckpointError(f"tensor {name} holds NaN or Inf values "
                                  "(pass allow_nonfinite=True / --allow-nonfinite to load anyway)")
