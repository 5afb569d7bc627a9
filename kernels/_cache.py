"""Where Numba caches the compiled kernels: a directory keyed on the kernels' sources.

Numba's cache index is keyed on the source file of each decorated function (its path and
modification time), so an edit to a helper module that the function inlines (`_vec`,
`_dtypes`) would go unnoticed and the old machine code would be served. Here the cache
directory is named after the sha256 of every kernels/*.py file: any edit gives a new
directory, and nothing compiled from older sources can be loaded.
"""

from __future__ import annotations

import glob
import hashlib
import os

import numba

HERE = os.path.dirname(os.path.abspath(__file__))


def source_hash(directory: str = HERE) -> str:
    """sha256 (first 16 hex digits) over the names and bytes of directory/*.py, sorted."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as fh:
            h.update(fh.read() + b"\0")
    return h.hexdigest()[:16]


def cache_dir(directory: str = HERE) -> str:
    """The cache directory for the sources in `directory`: under $NUMBA_CACHE_DIR when set,
    else kernels/__pycache__ when writable, else ~/.cache/refimpl."""
    name = f"numba-{source_hash(directory)}"
    if os.environ.get("REFIMPL_TILE"):           # a forced prefill tile (kernels.linear)
        name += "-tile" + os.environ["REFIMPL_TILE"]
    if os.environ.get("REFIMPL_KERNEL_OPT"):     # a forced LLVM level (kernels._jit)
        name += "-O" + os.environ["REFIMPL_KERNEL_OPT"]
    base = os.environ.get("NUMBA_CACHE_DIR")
    if not base:
        base = os.path.join(directory, "__pycache__")
        try:
            os.makedirs(base, exist_ok=True)
        except OSError:
            pass
        if not os.access(base, os.W_OK):
            base = os.path.join(os.path.expanduser("~"), ".cache", "refimpl")
    return os.path.join(base, name)


def use_source_keyed_cache() -> str:
    """Point Numba's cache at cache_dir() (call before any kernel is decorated)."""
    path = cache_dir()
    numba.config.CACHE_DIR = path
    return path
