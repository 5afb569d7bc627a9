"""Seeded random weights of a realistic scale for any config, the real shapes included."""

from __future__ import annotations

import os
import zlib

import numpy as np

from .config import ModelConfig, parameter_count, resolve_config, weight_shapes
from .errors import RefimplError
from .numerics import storage_dtype


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """An independent generator per (seed, tensor name): a tensor's values do not depend on
    which other tensors are generated (so fewer layers give the same first layers)."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def random_tensor(config: ModelConfig, name: str, shape, seed: int, dtype) -> np.ndarray:
    """One tensor: N(0, std) with std = max(0.02, 0.5/sqrt(fan_in)) for matrices (down_proj
    scaled by 1/sqrt(2 * layers) as residual branches are), norm weights 1 + N(0, 0.1),
    q/k/v biases N(0, 0.1), o_proj bias N(0, 0.02), router_scale U(0.5, 1.5)."""
    rng = tensor_rng(seed, name)
    if name.endswith("router_scale"):
        values = rng.uniform(0.5, 1.5, size=shape)
    elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    elif name.endswith(".bias"):
        std = 0.02 if "o_proj" in name else 0.1
        values = std * rng.standard_normal(shape, dtype=np.float32)
    else:
        std = max(0.02, 0.5 / np.sqrt(shape[-1]))
        if name.endswith("down_proj.weight") or name.endswith("o_proj.weight"):
            std /= np.sqrt(2.0 * config.num_hidden_layers)
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(std)
    return np.asarray(values, dtype=np.float32).astype(dtype)


def random_weights(config, seed: int = 0, dtype=np.float32) -> dict:
    """Every tensor of the config, seeded, in `dtype`."""
    config = resolve_config(config)
    _check_fits(config, np.dtype(dtype).itemsize)
    return {name: random_tensor(config, name, shape, seed, dtype)
            for name, shape in weight_shapes(config).items()}


def _check_fits(config: ModelConfig, itemsize: int) -> None:
    needed = parameter_count(config) * itemsize
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return
    if needed > 0.9 * available:
        raise RefimplError(
            f"random weights need {needed / 2**30:.1f} GiB but {available / 2**30:.1f} GiB is "
            "free; use fewer layers (num_hidden_layers / --layers) or write a checkpoint with "
            "`python -m refimpl init` and run it streamed from disk")


def init_model(preset_or_config, seed: int = 0, numerics: str = "fp32",
               backend: str = "numpy", **overrides):
    """A Model with seeded random weights; `overrides` change config fields (e.g.
    num_hidden_layers=2 keeps the real width with fewer layers)."""
    from .model import Model

    config = resolve_config(preset_or_config)
    if overrides:
        config = config.replace(**overrides)
    weights = random_weights(config, seed, storage_dtype(numerics))
    return Model(config, weights, numerics=numerics, backend=backend)
