"""How the kernels are compiled: `jit` is `numba.njit(cache=True, ...)` with LLVM's
optimisation level held at KERNEL_OPT while one of our functions (and what it calls) compiles;
`driver` makes a kernel's loop over independent work items in two compiled forms, serial and
parallel, the parallel one compiled only when an input first needs it.

Why not Numba's default (-O3): the hot loops here are written as explicit vector IR (`_vec`), so
they need little of LLVM's optimiser, while every parallel driver links and re-optimises the
code of all its callees, which makes compiling slow. Measured on the project's machine (AMD
EPYC, AVX-512, bf16, a fresh cache, `python -m refimpl bench --only compile`'s warm-up plus a
prefill-sized GEMM): -O3 25.9 s, -O2 20.4 s, -O1 18.6 s, -O0 10.7 s; the kernels' speed at -O1
is that of -O3 within the run-to-run noise (prefill GEMMs, decode GEMVs, norms, RoPE,
attention, the int8 matmul: BENCHMARKS.md, issue 16). -O0 leaves scalar code scalar and
leaves dead loads of Python objects in the code, which Numba then refuses to cache.

Why two forms of a driver: Numba compiles a `parallel=True` function with its whole parfor
machinery (about 0.3 s for an empty loop, 0.5-1.6 s for ours) even when a call would run it on
one thread. Small inputs (below `_dtypes.PARALLEL_MIN_WORK`) take the serial form, so a model
whose activations are small (decode, short prompts, the tiny test models) never compiles the
parallel one. Both forms are the same Python function (`prange` is `range` in a serial
function); the parallel one is compiled from a copy named NAME_parallel, because Numba's cache
keys a function by its name and bytecode, not by its compile options.

The level is Numba's global `config.OPT`, which its pass builder reads each time it optimises
a module; it is set only for the duration of our compiles and restored after, so other Numba
code in the process keeps its own. REFIMPL_KERNEL_OPT=N overrides (for measuring; the cache
directory is keyed on it, `_cache.cache_dir`).
"""

from __future__ import annotations

import contextlib
import os
import types

import numba
from numba.core import config

#: LLVM optimisation level of the kernels (0-3)
KERNEL_OPT = int(os.environ.get("REFIMPL_KERNEL_OPT", 1))


@contextlib.contextmanager
def opt_level(level: int):
    """Numba's LLVM optimisation level set to `level` inside the block, restored after."""
    saved = config.OPT
    config.OPT = config._OptLevel(level)
    try:
        yield
    finally:
        config.OPT = saved


def jit(**options):
    """numba.njit(cache=True, **options), compiled at LLVM level KERNEL_OPT."""
    def decorate(fn):
        dispatcher = numba.njit(cache=True, **options)(fn)
        compile_at_default = dispatcher.compile

        def compile(sig):
            with opt_level(KERNEL_OPT):
                return compile_at_default(sig)

        dispatcher.compile = compile
        return dispatcher

    return decorate


class Driver:
    """A loop over independent work items (`prange`), compiled serial and parallel:
    driver[par] is the form to call (par: `_dtypes.parallel(work)`). The loop passes its
    index to callees as np.int64(i): a parallel loop's index is unsigned, a serial one's
    int64, and each callee would otherwise be compiled twice."""

    def __init__(self, fn):
        self.serial = jit()(fn)
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_parallel",
                                  fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_parallel"
        twin.__module__, twin.__doc__ = fn.__module__, fn.__doc__
        self.parallel = jit(parallel=True)(twin)
        self.__doc__ = fn.__doc__

    def __getitem__(self, par: bool):
        return self.parallel if par else self.serial


def driver(fn) -> Driver:
    """`Driver` of fn (a decorator)."""
    return Driver(fn)
