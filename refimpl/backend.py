"""Backends: the NumPy spec (`refimpl.ops`) or the Numba fast paths (`refimpl.kernels`).

Both expose the same operator names and signatures; the model calls whichever it was given.
"""

from __future__ import annotations

from .errors import ConfigError

BACKENDS = ("numpy", "numba")


def get_ops(backend: str):
    """The operator namespace of a backend name."""
    if backend == "numpy":
        from . import ops
        return ops
    if backend == "numba":
        from . import kernels
        return kernels
    raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
