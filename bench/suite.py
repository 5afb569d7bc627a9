"""Benchmarks: the NumPy spec vs the Numba kernels vs PyTorch CPU eager, in one run.

`python -m refimpl bench [--quick] [--only ops|e2e|moe|compile|longctx] [--repeat N]` prints:

* compile: first-call compile time of every kernel per dtype (empty Numba cache, in a fresh
  process): on small inputs, then what a first 1B-width prefill and decode step adds (the
  kernels' parallel forms); and the time to load them from the cache;
* ops: each operator at the real shapes (Embedded-1B: hidden 1536, 12/6 heads of 128, MLP
  6144, T = 1, 128, 512; Pro-MoE layer: hidden 5120, 40/8 heads, 64 experts of 1344, shared
  5376), the best milliseconds of spec, kernels and torch, and the ratios;
* e2e: the Embedded-1B model with seeded random weights: prefill of 128 and 512 tokens,
  decode ms/token after a 128-token prefill, RSS after loading and peak RSS while running,
  each configuration in its own process (numpy/numba via `refimpl.init_model`, torch via
  transformers' LlamaForCausalLM with the same config and the same weights);
* moe: the Pro-MoE MoGE block for 512 tokens against computing all 64 experts, and against
  the cost of its active experts alone; at 1 and 32 tokens against the time to read its
  weights (the selected experts, the shared expert, the router) once at the measured memory
  bandwidth; each serving stage, the grouped GEMMs with their share of the FMA peak;
* longctx: a causal prefill of 32768 tokens (--quick: 4096) at the Embedded-1B attention shape
  (12 query / 6 KV heads of 128), bf16: the spec's blocked attention (time and the process's
  peak RSS, against the 51 GB its unblocked scores would take), the Numba blocked and flash
  kernels, and torch's scaled_dot_product_attention, each in its own process.

The ops and moe sections measure the machine first: the float32 FMA peak of all Numba
threads (`fma_peak_gflops`) and the memory read bandwidth (`read_bandwidth_gbs`); GEMM rows
print their share of the peak. The header names the ISA; `--isa avx2` makes every worker
compile and dispatch for AVX2 only (Numba, PyTorch/oneDNN/MKL, OpenBLAS: `ISA_ENV`), which
measures an AVX2 host's code path on an AVX-512 host.

Prefill times are for a forward over T tokens into an empty KV cache that returns the last
token's logits (refimpl: last_only=True; transformers: logits_to_keep=1), the work a
generation step does. Every time is the best of --repeat runs after one warm-up run (other jobs
on a shared machine only add time; decode is the median per-token time over its steps).
Workers are started as `python -m refimpl.bench worker ...` and print one JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from refimpl.numerics import bfloat16, storage_dtype

E2E_PRESET = "embedded-1b"
MOE_SHAPE = dict(hidden=5120, experts=64, groups=8, inter=1344, shared=5376)


# ============================================================================ helpers
#: seconds of rest before each measurement: the thread pools of the library timed before
#: (OpenBLAS: about 2^28 cycles, 70 ms here; PyTorch's and Numba's OpenMP) spin-wait after
#: their last call and would take the cores from the next one's threads (the shortest
#: prefill GEMM row, 1B q_proj T=128 after the RMSNorm row's PyTorch call, measured at 33-41%
#: of the FMA peak in some runs and 76% in others; 73-84% timed alone)
REST_S = 0.25


def best_time(fn, repeat: int, warmup: int = 1) -> float:
    """The least seconds of `repeat` calls of fn() after `warmup` untimed calls. The best, not
    the median: on a shared machine other jobs only ever add time (measured here: one
    configuration's GEMM between 138 and 181 GFLOP/s from run to run), so the best of N is
    the steadier estimate of what the code itself costs."""
    time.sleep(REST_S)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.min(times))


def torch_or_none():
    try:
        import torch
        return torch
    except ImportError:
        return None


def rss_bytes() -> int:
    """Current resident set size."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_info() -> dict:
    import numba

    info = {"python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "numba_threads": numba.get_num_threads(),
            "threading_layer": _threading_layer(), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                                      / 2**30, 1)
    except (ValueError, OSError):
        pass
    torch = torch_or_none()
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        try:
            import transformers
            info["transformers"] = transformers.__version__
        except ImportError:
            pass
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
        info[var] = os.environ.get(var, "(unset)")
    info["loadavg_1min"] = round(os.getloadavg()[0], 2)
    info["isa"] = isa_flags()
    return info


#: the vector extensions the bench reports (/proc/cpuinfo flag names)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_bf16", "amx_int8")


def isa_flags() -> list:
    """The ISA_FLAGS this CPU has (empty where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")),
                         [])
    except OSError:
        return []
    return [f for f in ISA_FLAGS if f in flags]


#: float32 lanes updated per step by the peak probe: 12 ymm (AVX2: 16 registers) or 16 zmm
#: (AVX-512: 32) of independent FMAs, enough to cover the FMA latency on two ports
PEAK_LANES = (96, 256)


def _fma_peak_kernel(lanes: int):
    """A Numba loop of independent a = a * m + c updates on `lanes` float32 lanes per
    thread, contracted to FMA (the one place the project uses a fast-math flag: it is a
    measurement of the machine, not a kernel whose numbers anyone reads)."""
    import numba

    @numba.njit(parallel=True, fastmath={"contract"}, cache=False)
    def peak(steps, nthreads, out):
        for t in numba.prange(nthreads):
            a = np.full(lanes, np.float32(t + 1) * np.float32(1e-3))
            m, c = np.float32(0.999999), np.float32(1e-7)
            for _ in range(steps):
                for j in range(lanes):
                    a[j] = a[j] * m + c
            out[t] = a.sum()
    return peak


def fma_peak_gflops(seconds: float = 0.5) -> float:
    """The measured float32 FMA throughput of all Numba threads, GFLOP/s (2 per FMA): the
    best of PEAK_LANES (too many lanes for the ISA's registers spill and read low)."""
    import numba

    n = numba.get_num_threads()
    out = np.zeros(n, np.float32)
    rates = []
    for lanes in PEAK_LANES:
        peak = _fma_peak_kernel(lanes)
        peak(10, n, out)                                       # compile
        steps = 1000
        while True:
            t0 = time.perf_counter()
            peak(steps, n, out)
            dt = time.perf_counter() - t0
            if dt > seconds / 8:
                break
            steps *= 4
        best = dt
        for _ in range(2):
            t0 = time.perf_counter()
            peak(steps, n, out)
            best = min(best, time.perf_counter() - t0)
        rates.append(2.0 * lanes * steps * n / best / 1e9)
    return max(rates)


#: `--isa avx2`: every worker compiles and dispatches for AVX2 only, on any AVX-512 host:
#: Numba's LLVM target (ymm registers, 16 of them), PyTorch's ATen kernels, oneDNN's and
#: MKL's JIT/dispatch, and OpenBLAS's kernels (NumPy's spec). The FMA peak probe then measures
#: the AVX2 peak. What stays the host's: caches, memory, clock.
ISA_ENV = {
    "avx2": {
        "NUMBA_CPU_NAME": "haswell",
        "NUMBA_CPU_FEATURES": ("+avx2,+fma,+avx,+sse4.2,+f16c,+bmi2,-avx512f,-avx512bw,"
                               "-avx512vl,-avx512dq,-avx512cd,-avx512vnni,-avx512bf16"),
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "OPENBLAS_CORETYPE": "Haswell",
    },
}

#: bytes the read-bandwidth probe streams (far beyond any cache)
BANDWIDTH_BYTES = 1 << 29


def _read_kernel():
    import numba

    @numba.njit(parallel=True, cache=False)
    def total(a, nthreads, out):
        n = a.size
        for t in numba.prange(nthreads):      # np.sum of a slice vectorises (an a[i] loop
            out[t] = a[t * n // nthreads:(t + 1) * n // nthreads].sum()   # does not: 3x less)
    return total


def read_bandwidth_gbs(nbytes: int = BANDWIDTH_BYTES, repeat: int = 5) -> float:
    """The measured memory read bandwidth of all Numba threads, GB/s: the best of `repeat`
    sums of `nbytes` of 64-bit integers (integer sums are exact in any order, so they
    vectorise without fast-math), each thread one contiguous part, as a decode GEMV reads its
    weight rows."""
    import numba

    n = numba.get_num_threads()
    a = np.ones(nbytes // 8, np.uint64)
    out = np.zeros(n, np.uint64)
    total = _read_kernel()
    total(a, n, out)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        total(a, n, out)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def _threading_layer() -> str:
    import numba

    from refimpl import kernels

    kernels.add(np.zeros(4, np.float32), np.zeros(4, np.float32))  # starts the thread pool
    try:
        return numba.threading_layer()
    except ValueError:
        return "?"


def _rand(rng, shape, dtype, scale=1.0):
    """Normal values in `dtype`, generated in float32 in chunks (fast, little memory)."""
    out = np.empty(shape, dtype)
    flat = out.reshape(-1)
    step = 1 << 22
    for i in range(0, flat.size, step):
        chunk = rng.standard_normal(min(step, flat.size - i), dtype=np.float32)
        chunk *= np.float32(scale)
        flat[i:i + step] = chunk.astype(dtype)
    return out


# ============================================================================ compile time
def warmup_kernels(numerics: str) -> None:
    """Call every kernel once on tiny inputs of `numerics` (compiles or loads each)."""
    from refimpl import init_model
    from refimpl import kernels as K
    from refimpl import ops

    dt = storage_dtype(numerics)
    rng = np.random.default_rng(0)
    x = _rand(rng, (5, 16), dt)
    w = _rand(rng, (8, 16), dt)
    K.linear(x, w, w[:, 0].copy())
    L = importlib.import_module("refimpl.kernels.linear")  # the prefill GEMM: M >= ROWS_BELOW,
    xp, wp = _rand(rng, (L.ROWS_BELOW + 3, 48), dt), _rand(rng, (L.NR + 5, 48), dt)  # N >= NR
    K.linear(xp, wp, wp[:, 0].copy())
    L.gate_up(xp, wp, wp)
    K.rms_norm(x, w[0].copy(), 1e-5)
    K.add(x, x)
    q, k = _rand(rng, (5, 4, 8), dt), _rand(rng, (5, 2, 8), dt)
    cos, sin = ops.rope_tables(np.arange(5), 8, 1e4, dtype=np.float64 if numerics == "fp64"
                               else np.float32)
    K.apply_rope(q, cos, sin)
    K.attention(q, k, k)
    K.attention(q[:1], k, k)
    K.swiglu(x, w, w, w.T.copy())
    K.moge_route(_rand(rng, (5, 8), dt), np.ones(8, dt), 2)
    model = init_model("tiny-moge", numerics=numerics, backend="numba")
    model.forward(np.arange(1, 6), model.new_cache(8))


def first_real_forward(numerics: str) -> None:
    """A first prefill (64 tokens) and decode step at the Embedded-1B width (2 layers, a
    4096-token vocabulary: building the real one would dominate the figure): what
    a real model compiles beyond `warmup_kernels`, the parallel forms of the kernels
    (`kernels._jit.driver`), whose inputs are large enough for the thread pool."""
    from refimpl import init_model

    model = init_model(E2E_PRESET, numerics=numerics, backend="numba", num_hidden_layers=2,
                       vocab_size=4096, eos_token_id=2)   # the 1B shapes, a small table
    cache = model.new_cache(80)
    model.forward(np.arange(1, 65), cache, last_only=True)
    model.forward(np.array([65]), cache, last_only=True)


def worker_compile(args) -> dict:
    t_import = time.perf_counter()
    import refimpl.kernels  # noqa: F401  (imports numba and registers the kernels)
    result = {"import_s": time.perf_counter() - t_import, "per_dtype_s": {}, "real_width_s": {}}
    for numerics in args.numerics.split(","):
        t = time.perf_counter()
        if not args.real_only:
            warmup_kernels(numerics)
        result["per_dtype_s"][numerics] = time.perf_counter() - t
        t = time.perf_counter()
        first_real_forward(numerics)
        result["real_width_s"][numerics] = time.perf_counter() - t
    return result


# ============================================================================ operators
def _torch_ops(torch):
    import torch.nn.functional as F

    def rms_norm(x, w, eps):
        x32 = x.float()
        n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return w * n.to(x.dtype)

    def rope(x, cos, sin):  # x [T, heads, D], cos/sin [T, D] in x's dtype
        d2 = x.shape[-1] // 2
        rot = torch.cat((-x[..., d2:], x[..., :d2]), dim=-1)
        return x * cos[:, None, :] + rot * sin[:, None, :]

    def attention(q, k, v, causal):  # [T, H, D] layouts, as HF's sdpa path
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], is_causal=causal,
                                           enable_gqa=True)
        return o[0].transpose(0, 1)

    def swiglu(x, wg, wu, wd):
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    def route(logits, scale, groups):
        p = torch.softmax(logits, dim=-1, dtype=torch.float32)
        T, E = p.shape
        ids = p.view(T, groups, E // groups).argmax(-1) + \
            torch.arange(groups) * (E // groups)
        return ids, p.gather(1, ids) * scale.reshape(E).float()[ids]

    def moe(x, gate_w, scale, experts, shared, groups):
        ids, w = route(F.linear(x, gate_w), scale, groups)
        y = torch.zeros_like(x)
        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            out = swiglu(x[tok], *experts[e])
            y.index_add_(0, tok, out * w[tok, slot, None].to(x.dtype))
        return y + swiglu(x, *shared)

    return dict(rms_norm=rms_norm, linear=F.linear, rope=rope, attention=attention,
                swiglu=swiglu, route=route, moe=moe, add=torch.add)


def _to_torch(torch, a):
    a = np.ascontiguousarray(a)
    if a.dtype == bfloat16:
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def paged_cases(add_case, rng, dt, quick: bool) -> None:
    """Paged decode for a batch of 8 sequences of mixed lengths (up to 4096; 1024 quick) at
    the 1B attention shape, blocks of 128 handed out shuffled, beside the contiguous decode
    kernel on the same keys: the cost of reading through the block table."""
    from refimpl import kernels as K
    from refimpl import ops

    Hq, Hkv, D, bs = 12, 6, 128, 128
    top = 1024 if quick else 4096
    lens = np.array([1, 129, top // 8, top // 4, top // 2 + 7, 3 * top // 4, top - 1, top],
                    np.int32)
    nb = int((-(-lens // bs)).sum())
    tables, slots = ops.allocate_blocks(lens, bs, rng.permutation(nb))
    kc, vc = _rand(rng, (nb * bs, Hkv, D), dt), _rand(rng, (nb * bs, Hkv, D), dt)
    keys, values = [kc[sl] for sl in slots], [vc[sl] for sl in slots]
    kc, vc = kc.reshape(-1, bs, Hkv, D), vc.reshape(-1, bs, Hkv, D)
    q = _rand(rng, (len(lens), Hq, D), dt)
    shape = f"1B B=8 mixed lengths <= {top}, blocks of {bs}"

    def contiguous(attend):
        return [attend(q[b:b + 1], keys[b], values[b]) for b in range(len(lens))]

    add_case("paged_attention", shape, lambda: ops.paged_attention(q, kc, vc, tables, lens),
             lambda: K.paged_attention(q, kc, vc, tables, lens), None)
    add_case("decode contiguous", shape, lambda: contiguous(ops.attention),
             lambda: contiguous(K.attention), None)


#: the smallest prefill-sized GEMM of issue 16's targets (T >= 32): linear and swiglu rows
GEMM_SMALL_T = 32


def gemm_cases(add_case, rng, dt, tops, tt, T) -> None:
    """The q projection and the SwiGLU MLP at T tokens, Embedded-1B and Pro-MoE widths: the
    prefill GEMMs at the smallest size issue 16's 70%-of-peak target covers."""
    from refimpl import kernels as K
    from refimpl import ops

    for tag, H, Hq, I in (("1B", 1536, 12, 6144), ("ProMoE", 5120, 40, 5376)):
        wq = _rand(rng, (Hq * 128, H), dt, H ** -0.5)
        wg, wu = _rand(rng, (I, H), dt, H ** -0.5), _rand(rng, (I, H), dt, H ** -0.5)
        wd = _rand(rng, (H, I), dt, I ** -0.5)
        x = _rand(rng, (T, H), dt)
        tw = {k: tt(v) for k, v in dict(x=x, wq=wq, wg=wg, wu=wu, wd=wd).items()} if tops else None
        w = (x, wq, wg, wu, wd)       # bound now: the loop rebinds the names
        add_case("linear q_proj", f"{tag} T={T} [{T},{H}]x[{Hq * 128},{H}]",
                 lambda w=w: ops.linear(w[0], w[1]), lambda w=w: K.linear(w[0], w[1]),
                 tops and (lambda tw=tw: tops["linear"](tw["x"], tw["wq"])),
                 flops=2 * T * H * Hq * 128)
        add_case("swiglu", f"{tag} T={T} [{T},{H}] I={I}",
                 lambda w=w: ops.swiglu(*w[:1], *w[2:]), lambda w=w: K.swiglu(*w[:1], *w[2:]),
                 tops and (lambda tw=tw: tops["swiglu"](tw["x"], tw["wg"], tw["wu"], tw["wd"])),
                 flops=2 * T * H * I * 3)


def op_cases(quick: bool, numerics: str):
    """(name, shape text, numpy fn, numba fn, torch fn-or-None) at the real shapes."""
    from refimpl import kernels as K
    from refimpl import ops

    torch = torch_or_none()
    tops = _torch_ops(torch) if torch is not None else None
    tt = (lambda a: _to_torch(torch, a)) if torch is not None else None
    dt = storage_dtype(numerics)
    acc = np.float64 if numerics == "fp64" else np.float32
    rng = np.random.default_rng(0)
    cases = []

    def add_case(name, shape, np_fn, nb_fn, th_fn, flops=None):
        cases.append((name, shape, np_fn, nb_fn, th_fn, flops))

    def layer_cases(tag, H, Hq, Hkv, I, tokens, lm_head_vocab=None):
        D = 128
        w_norm = (1 + _rand(rng, H, np.float32, 0.1)).astype(dt)
        wq, bq = _rand(rng, (Hq * D, H), dt, H ** -0.5), _rand(rng, Hq * D, dt, 0.1)
        wg, wu = _rand(rng, (I, H), dt, H ** -0.5), _rand(rng, (I, H), dt, H ** -0.5)
        wd = _rand(rng, (H, I), dt, I ** -0.5)
        tw = {k: tt(v) for k, v in dict(w_norm=w_norm, wq=wq, bq=bq, wg=wg, wu=wu,
                                          wd=wd).items()} if tops else None
        for T in tokens:
            x = _rand(rng, (T, H), dt)
            y = _rand(rng, (T, H), dt)
            tx, ty = (tt(x), tt(y)) if tops else (None, None)
            add_case("rms_norm", f"{tag} T={T} [{T},{H}]",
                     lambda x=x: ops.rms_norm(x, w_norm, 1e-5),
                     lambda x=x: K.rms_norm(x, w_norm, 1e-5),
                     tops and (lambda tx=tx: tops["rms_norm"](tx, tw["w_norm"], 1e-5)))
            add_case("linear q_proj", f"{tag} T={T} [{T},{H}]x[{Hq * D},{H}]+b",
                     lambda x=x: ops.linear(x, wq, bq), lambda x=x: K.linear(x, wq, bq),
                     tops and (lambda tx=tx: tops["linear"](tx, tw["wq"], tw["bq"])),
                     flops=2 * T * H * Hq * D)
            q = _rand(rng, (T, Hq, D), dt)
            cos, sin = ops.rope_tables(np.arange(T), D, 4e6, dtype=acc)
            tq = tt(q) if tops else None
            tc, ts = (tt(cos.astype(dt)), tt(sin.astype(dt))) if tops else (None, None)
            add_case("apply_rope q", f"{tag} T={T} [{T},{Hq},{D}]",
                     lambda q=q, c=cos, s=sin: ops.apply_rope(q, c, s),
                     lambda q=q, c=cos, s=sin: K.apply_rope(q, c, s),
                     tops and (lambda tq=tq, tc=tc, ts=ts: tops["rope"](tq, tc, ts)))
            S = 512 if T == 1 else T
            k, v = _rand(rng, (S, Hkv, D), dt), _rand(rng, (S, Hkv, D), dt)
            tk, tv = (tt(k), tt(v)) if tops else (None, None)
            what = f"decode vs {S} cached" if T == 1 else "prefill causal"
            add_case("attention", f"{tag} T={T} {what} {Hq}/{Hkv} heads",
                     lambda q=q, k=k, v=v: ops.attention(q, k, v),
                     lambda q=q, k=k, v=v: K.attention(q, k, v),
                     tops and (lambda tq=tq, tk=tk, tv=tv, c=T > 1:
                               tops["attention"](tq, tk, tv, c)))
            if T > 1:  # the opt-in online-softmax kernel beside the default (exact roundings)
                add_case("attention flash", f"{tag} T={T} {what} {Hq}/{Hkv} heads",
                         lambda q=q, k=k, v=v: ops.attention(q, k, v),
                         lambda q=q, k=k, v=v: K.attention(q, k, v, flash=True),
                         tops and (lambda tq=tq, tk=tk, tv=tv: tops["attention"](tq, tk, tv, True)))
            add_case("swiglu", f"{tag} T={T} [{T},{H}] I={I}",
                     lambda x=x: ops.swiglu(x, wg, wu, wd), lambda x=x: K.swiglu(x, wg, wu, wd),
                     tops and (lambda tx=tx: tops["swiglu"](tx, tw["wg"], tw["wu"], tw["wd"])),
                     flops=2 * T * H * I * 3)
            add_case("add (residual)", f"{tag} T={T} [{T},{H}]", lambda x=x, y=y: ops.add(x, y),
                     lambda x=x, y=y: K.add(x, y), tops and (lambda tx=tx, ty=ty: tops["add"](tx, ty)))
        if lm_head_vocab:
            w_lm = _rand(rng, (lm_head_vocab, H), dt, H ** -0.5)
            tlm = tt(w_lm) if tops else None
            x = _rand(rng, (1, H), dt)
            tx = tt(x) if tops else None
            add_case("linear lm_head", f"{tag} T=1 [1,{H}]x[{lm_head_vocab},{H}]",
                     lambda: ops.linear(x, w_lm), lambda: K.linear(x, w_lm),
                     tops and (lambda: tops["linear"](tx, tlm)))

    tokens = (1, 128) if quick else (1, 128, 512)
    layer_cases("1B", 1536, 12, 6, 6144, tokens, lm_head_vocab=None if quick else 153376)
    gemm_cases(add_case, rng, dt, tops, tt, GEMM_SMALL_T)
    paged_cases(add_case, rng, dt, quick)
    # Pro-MoE layer: attention and shared expert shapes, router
    layer_cases("ProMoE", 5120, 40, 8, 5376, (1, 128) if quick else (1, 512))
    E, G, H = MOE_SHAPE["experts"], MOE_SHAPE["groups"], MOE_SHAPE["hidden"]
    gate_w = _rand(rng, (E, H), dt, H ** -0.5)
    scale = rng.uniform(0.5, 1.5, (1, E)).astype(dt)
    for T in ((1, 128) if quick else (1, 512)):
        x = _rand(rng, (T, H), dt)
        logits = K.linear(x, gate_w)
        tl, ts = (tt(logits), tt(scale)) if tops else (None, None)
        add_case("moge_route", f"ProMoE T={T} [{T},{E}] {G} groups",
                 lambda lg=logits: ops.moge_route(lg, scale, G),
                 lambda lg=logits: K.moge_route(lg, scale, G),
                 tops and (lambda tl=tl: tops["route"](tl, ts, G)))
    return cases


def worker_ops(args) -> dict:
    torch = torch_or_none()
    rows = []
    ctx = torch.inference_mode() if torch is not None else _Null()
    with ctx:
        peak = fma_peak_gflops()
        print(json.dumps({"peak": peak, "read_gbs": read_bandwidth_gbs()}), flush=True)
        for name, shape, np_fn, nb_fn, th_fn, flops in op_cases(args.quick, args.numerics):
            row = {"op": name, "shape": shape}
            row["numba_ms"] = 1e3 * best_time(nb_fn, args.repeat)
            row["numpy_ms"] = 1e3 * best_time(np_fn, args.repeat)
            row["torch_ms"] = 1e3 * best_time(th_fn, args.repeat) if th_fn else None
            if flops and "T=1 " not in shape:              # prefill-sized products only
                row["numba_gflops"] = flops / row["numba_ms"] / 1e6
                row["numba_of_peak"] = row["numba_gflops"] / peak
            rows.append(row)
            print(json.dumps({"progress": row}), flush=True)
    return {"rows": rows, "fma_peak_gflops": peak}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ============================================================================ end to end
def _e2e_config(quick: bool):
    from refimpl.config import preset

    return preset(E2E_PRESET, num_hidden_layers=4) if quick else preset(E2E_PRESET)


def _hf_model(torch, config, weights, numerics):
    """transformers' LlamaForCausalLM with the same config and weights (assigned, no copy)."""
    import transformers

    c = config
    tdtype = torch.float32 if numerics == "fp32" else torch.bfloat16
    hf = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, attention_bias=c.bias,
        mlp_bias=False, tie_word_embeddings=c.tie_word_embeddings, hidden_act="silu",
        torch_dtype=tdtype, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf)
    state = {name: _to_torch(torch, arr) for name, arr in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit LlamaForCausalLM: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    model.tie_weights()
    rotary = type(model.model.rotary_emb)(config=hf)  # its buffers were built on meta
    model.model.rotary_emb = rotary
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise RuntimeError(f"{name} left on the meta device")
    return model.eval()


def worker_e2e(args) -> dict:
    from refimpl import random_weights
    from refimpl.model import Model

    config = _e2e_config(args.quick)
    numerics = args.numerics
    rng = np.random.default_rng(1)
    ids = rng.integers(3, config.vocab_size, 512 + 64)
    prefill_lengths = (128,) if args.quick else (128, 512)
    decode_tokens = 4 if args.quick else 16
    t0 = time.perf_counter()
    weights = random_weights(config, seed=0, dtype=storage_dtype(numerics))
    result = {"backend": args.backend, "numerics": numerics,
              "layers": config.num_hidden_layers}
    if args.backend == "torch":
        import torch

        torch.set_grad_enabled(False)
        model = _hf_model(torch, config, weights, numerics)
        result["attn_implementation"] = model.config._attn_implementation
        from transformers import DynamicCache

        def prefill(n):
            cache = DynamicCache()
            out = model(torch.from_numpy(ids[None, :n]), past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            return out.logits[0, -1].float().numpy(), cache

        def step(cache, i):
            return model(torch.from_numpy(ids[None, i:i + 1]), past_key_values=cache,
                         use_cache=True, logits_to_keep=1).logits
    else:
        model = Model(config, weights, numerics=numerics, backend=args.backend, check=False)

        def prefill(n):
            cache = model.new_cache(n + decode_tokens + 8)
            logits = model.forward(ids[:n], cache, last_only=True)
            return logits[0].astype(np.float32), cache

        def step(cache, i):
            return model.forward(ids[i:i + 1], cache, last_only=True)

        prefill(8)  # compile or load the kernels, not timed
        step(prefill(8)[1], 8)
    result["load_s"] = time.perf_counter() - t0
    result["rss_loaded_gib"] = rss_bytes() / 2**30
    peak_reset = reset_peak_rss()
    for n in prefill_lengths:
        times = []
        for r in range(args.repeat):
            t = time.perf_counter()
            logits, _ = prefill(n)
            times.append(time.perf_counter() - t)
            if n == 128 and r == 0 and args.save_logits:
                np.save(args.save_logits, logits)
        result[f"prefill{n}_s"] = float(np.min(times))
        result[f"prefill{n}_all_s"] = times
    step_times = []
    for r in range(args.repeat):
        _, cache = prefill(128)
        for i in range(128, 128 + decode_tokens):
            t = time.perf_counter()
            step(cache, i)
            step_times.append(time.perf_counter() - t)
    result["decode_ms"] = 1e3 * float(np.median(step_times))
    result["decode_tok_s"] = 1e3 / result["decode_ms"]
    result["peak_rss_gib"] = peak_rss_bytes() / 2**30
    result["peak_is_since_load"] = peak_reset
    return result


# ============================================================================ MoE layer
def worker_moe(args) -> dict:
    from refimpl import kernels as K
    from refimpl import ops

    H, E, G, I, IS = (MOE_SHAPE[k] for k in ("hidden", "experts", "groups", "inter", "shared"))
    T = 128 if args.quick else 512
    dt = storage_dtype(args.numerics)
    rng = np.random.default_rng(0)
    x = _rand(rng, (T, H), dt)
    gate_w = _rand(rng, (E, H), dt, H ** -0.5)
    scale = rng.uniform(0.5, 1.5, (1, E)).astype(dt)
    experts = [(_rand(rng, (I, H), dt, H ** -0.5), _rand(rng, (I, H), dt, H ** -0.5),
                _rand(rng, (H, I), dt, I ** -0.5)) for _ in range(E)]
    shared = (_rand(rng, (IS, H), dt, H ** -0.5), _rand(rng, (IS, H), dt, H ** -0.5),
              _rand(rng, (H, IS), dt, IS ** -0.5))
    rep = args.repeat
    res = {"tokens": T, "numerics": args.numerics}
    res["numba_moe_ms"] = 1e3 * best_time(
        lambda: K.moe_block(x, gate_w, scale, experts, shared, G), rep)
    ids, _ = K.moge_route(K.linear(x, gate_w), scale, G)
    counts = np.bincount(ids.reshape(-1), minlength=E)
    res["experts_selected"] = int(np.count_nonzero(counts))
    res["tokens_per_expert_min_max"] = [int(counts[counts > 0].min()), int(counts.max())]

    def active_only():  # the selected experts over their tokens, the shared expert, the router
        K.moge_route(K.linear(x, gate_w), scale, G)
        for e in np.flatnonzero(counts):
            K.swiglu(x[np.nonzero(ids == e)[0]], *experts[e])
        K.swiglu(x, *shared)

    def all_experts():  # every expert over every token, plus the shared expert
        for e in range(E):
            K.swiglu(x, *experts[e])
        K.swiglu(x, *shared)

    res["numba_active_ms"] = 1e3 * best_time(active_only, rep)
    res["numba_all_experts_ms"] = 1e3 * best_time(all_experts, max(1, rep // 2) if rep > 1
                                                    else 1, warmup=0)
    res["numpy_moe_ms"] = 1e3 * best_time(
        lambda: ops.moe_block(x, gate_w, scale, experts, shared, G), max(1, rep // 2), warmup=0)
    res["stages"] = _moe_stage_times(x, gate_w, scale, experts, shared, G,
                                     (1, 32) if args.quick else (1, 32, 512), rep)
    res["fma_peak_gflops"] = fma_peak_gflops()
    res["read_gbs"] = read_bandwidth_gbs()
    res["decode"] = {}
    itemsize = np.dtype(dt).itemsize
    for Td in MOE_DECODE_T:   # small batches: the block against reading its bytes once
        xd = x[:Td]
        ids_d, _ = K.moge_route(K.linear(xd, gate_w), scale, G)
        nsel = len(np.unique(ids_d))
        nbytes = itemsize * (nsel * 3 * H * I + 3 * H * IS + E * H)
        ms = 1e3 * best_time(lambda: K.moe_block(xd, gate_w, scale, experts, shared, G),
                               max(rep, 5))
        res["decode"][Td] = {"numba_ms": ms, "experts_selected": nsel, "weight_bytes": nbytes,
                             "read_once_ms": 1e3 * nbytes / (res["read_gbs"] * 1e9)}
    res["stage_flops"] = {T_: {"grouped gate-up + SwiGLU": 2 * T_ * G * 2 * H * I,
                               "grouped down": 2 * T_ * G * H * I,
                               "shared expert": 2 * T_ * 3 * H * IS}
                          for T_ in res["stages"]}
    torch = torch_or_none()
    if torch is not None:
        tops = _torch_ops(torch)
        tt = lambda a: _to_torch(torch, a)  # noqa: E731
        tx, tg, ts = tt(x), tt(gate_w), tt(scale)
        tex = [tuple(tt(w) for w in ex) for ex in experts]
        tsh = tuple(tt(w) for w in shared)
        with torch.inference_mode():
            res["torch_moe_ms"] = 1e3 * best_time(lambda: tops["moe"](tx, tg, ts, tex, tsh, G),
                                                    rep)
    return res


#: token counts of the MoE decode comparison (issue 16: within 1.3x of reading the bytes once)
MOE_DECODE_T = (1, 32)

LONGCTX_SHAPE = dict(heads=12, kv_heads=6, head_dim=128)


def worker_longctx(args) -> dict:
    """One backend's causal prefill at the long context, in this fresh process."""
    T = 4096 if args.quick else 32768
    H, Hkv, D = (LONGCTX_SHAPE[k] for k in ("heads", "kv_heads", "head_dim"))
    dt = storage_dtype(args.numerics)
    rng = np.random.default_rng(0)
    q, k, v = (_rand(rng, (T, h, D), dt) for h in (H, Hkv, Hkv))
    res = {"tokens": T, "backend": args.backend, "numerics": args.numerics,
           "inputs_mib": (q.nbytes + k.nbytes + v.nbytes) / 2**20,
           "unblocked_scores_gib": H * T * T * 4 / 2**30}
    if args.backend == "numpy":
        from refimpl import ops

        fns = {"spec": lambda: ops.attention(q, k, v)}
    elif args.backend == "numba":
        from refimpl import kernels as K

        K.attention(q[:64], k[:64], v[:64])
        K.attention(q[:64], k[:64], v[:64], flash=True)   # compiled or loaded before timing
        fns = {"numba": lambda: K.attention(q, k, v),
               "numba_flash": lambda: K.attention(q, k, v, flash=True)}
    else:
        torch = torch_or_none()
        if torch is None:
            return {**res, "error": "torch is not installed"}
        tq, tk, tv = (_to_torch(torch, a).transpose(0, 1)[None] for a in (q, k, v))
        tk, tv = (a.repeat_interleave(H // Hkv, dim=1) for a in (tk, tv))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        fns = {"torch_sdpa": lambda: sdpa(tq, tk, tv, is_causal=True)}
    base = rss_bytes()
    for name, fn in fns.items():
        reset_peak_rss()
        t0 = time.perf_counter()
        with (torch_or_none().inference_mode() if args.backend == "torch" else _nothing()):
            fn()
        res[f"{name}_s"] = time.perf_counter() - t0
        res[f"{name}_peak_rss_mib"] = peak_rss_bytes() / 2**20
        res[f"{name}_rss_before_mib"] = base / 2**20
    return res


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bench_longctx(args, out: dict) -> None:
    T = 4096 if args.quick else 32768
    _section(f"longctx: causal prefill of {T} tokens, 12/6 heads of 128, bf16, one run each "
             "(fresh process per backend)")
    rows = {}
    for backend in ("numpy", "numba", "torch"):
        res = run_worker("longctx", ["--backend", backend, "--numerics", "bf16"]
                         + (["--quick"] if args.quick else []))
        rows[backend] = res
        if "error" in res:
            print(f"  {backend}: {res['error']}")
    out["longctx"] = rows
    spec = rows["numpy"]
    if "spec_s" in spec:
        print(f"  inputs q, k, v: {spec['inputs_mib']:.0f} MiB; unblocked [heads, T, S] float32 "
              f"scores would be {spec['unblocked_scores_gib']:.1f} GiB")
        print(f"  spec ops.attention (blocked): {spec['spec_s']:8.1f} s   peak RSS "
              f"{spec['spec_peak_rss_mib']:.0f} MiB (process before the call: "
              f"{spec['spec_rss_before_mib']:.0f} MiB)")
    for backend, key, label in (("numba", "numba", "numba attention (blocked)"),
                                ("numba", "numba_flash", "numba attention flash=True"),
                                ("torch", "torch_sdpa", "torch sdpa (is_causal)")):
        r = rows[backend]
        if f"{key}_s" in r:
            ratio = f"   spec / this = {spec['spec_s'] / r[f'{key}_s']:.1f}x" \
                if "spec_s" in spec else ""
            print(f"  {label:<28}{r[f'{key}_s']:8.1f} s   peak RSS "
                  f"{r[f'{key}_peak_rss_mib']:.0f} MiB{ratio}")


# ============================================================================ driver
def run_worker(kind: str, extra: list[str], env=None, timeout=3600) -> dict:
    """Run `python -m refimpl.bench worker KIND ...` and return its JSON result."""
    cmd = [sys.executable, "-m", "refimpl.bench", "worker", kind, *extra]
    # from a neutral directory: `python -m` puts the working directory first on sys.path, and
    # in the repository root the top-level kernels/ folder would shadow the PyPI package
    # `kernels` that transformers imports (refimpl.kernels is installed by its own mapping)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tempfile.gettempdir())
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        elif line.startswith("{") and '"progress"' in line:
            row = json.loads(line)["progress"]
            print(_fmt_op_row(row), flush=True)
        elif line.startswith('{"peak"'):
            rates = json.loads(line)
            print(f"  measured float32 FMA peak, all Numba threads: {rates['peak']:.1f} GFLOP/s "
                  f"(GEMM rows: numba's share of it; issue 16 target >= 70% at T >= 32); "
                  f"memory read: {rates['read_gbs']:.1f} GB/s", flush=True)
    stderr = proc.stderr.read()
    proc.wait(timeout=timeout)
    if proc.returncode != 0 or result is None:
        tail = stderr.strip().splitlines()[-3:]
        return {"error": f"worker {kind} failed (exit {proc.returncode}): {' | '.join(tail)}"}
    return result


def _ratio(a, b):
    return f"{a / b:6.2f}x" if a and b else "     -"


def _fmt_op_row(r) -> str:
    torch_ms = r.get("torch_ms")
    return (f"  {r['op']:<16} {r['shape']:<44} {r['numpy_ms']:>10.3f} {r['numba_ms']:>10.3f} "
            f"{(f'{torch_ms:10.3f}' if torch_ms else '         -')} "
            f"{_ratio(r['numpy_ms'], r['numba_ms']):>9} {_ratio(torch_ms, r['numba_ms']):>9}"
            + (f" {r['numba_gflops']:7.1f} GFLOP/s {100 * r['numba_of_peak']:4.0f}% of peak"
               if r.get("numba_gflops") else ""))


def _section(title):
    load = os.getloadavg()
    print(f"\n== {title}   (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})", flush=True)


def bench_compile(args, out: dict) -> None:
    _section("compile: first call of every kernel (fresh process, empty Numba cache)")
    numerics = "bf16" if args.quick else "fp64,fp32,bf16,fp16"
    with tempfile.TemporaryDirectory(prefix="refimpl-numba-cache-") as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        cold = run_worker("compile", ["--numerics", numerics], env=env)
        warm = run_worker("compile", ["--numerics", numerics], env=env)
    alone = {}
    for mode in numerics.split(","):   # a real first use: each mode in its own empty cache
        with tempfile.TemporaryDirectory(prefix="refimpl-numba-cache-") as cache_dir:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
            alone[mode] = run_worker("compile", ["--numerics", mode, "--real-only"], env=env)
    out["compile"] = {"cold": cold, "cached": warm, "real_only": alone}
    errors = [r["error"] for r in (cold, warm, *alone.values()) if "error" in r]
    if errors:
        print("  " + " ".join(errors))
        return
    print(f"  import refimpl.kernels: {cold['import_s']:.2f} s")
    print("  a: every kernel's first call on small inputs (the serial forms, the prefill GEMM:"
          " what issue 16's 'about 30 s' measured); b: what a first 1B-width prefill + decode"
          " step compiles on top (the parallel forms: its time with an empty cache minus its"
          " time with a full one); first use: that step alone in an empty cache (what a first"
          " `python -m refimpl run` of a 1B checkpoint compiles), minus its time from a full one")
    for mode in cold["per_dtype_s"]:
        a = cold["per_dtype_s"][mode]
        b = max(0.0, cold["real_width_s"][mode] - warm["real_width_s"][mode])
        first = max(0.0, alone[mode]["real_width_s"][mode] - warm["real_width_s"][mode])
        print(f"  {mode}: compile a {a:5.1f} s + b {b:4.1f} s = {a + b:5.1f} s   first use "
              f"{first:5.1f} s   load from cache {warm['per_dtype_s'][mode]:5.2f} s   "
              "(issue 16 target: first use < 15 s)")


def bench_ops(args, out: dict) -> None:
    _section(f"ops: best ms of {args.repeat} runs, storage {args.numerics} "
             "(spec/numba and torch/numba: > 1 means numba is faster)")
    print(f"  {'op':<16} {'shape':<44} {'numpy ms':>10} {'numba ms':>10} {'torch ms':>10} "
          f"{'spec/nb':>9} {'torch/nb':>9}", flush=True)
    res = run_worker("ops", _common(args))
    out["ops"] = res
    if "error" in res:
        print("  " + res["error"])


def bench_e2e(args, out: dict) -> None:
    layers = 4 if args.quick else 26
    _section(f"e2e: {E2E_PRESET} ({layers} layers), random weights; prefill = forward into an "
             "empty cache returning the last token's logits; decode after a 128-token prefill")
    configs = [("numba", "bf16"), ("numba", "fp32"), ("numpy", "fp32")]
    if torch_or_none() is not None:
        configs += [("torch", "fp32"), ("torch", "bf16")]
    if args.configs:
        configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    print(f"  {'backend':<6} {'dtype':<5} {'prefill128':>10} {'prefill512':>10} {'decode':>10} "
          f"{'tok/s':>8} {'RSS load':>9} {'RSS peak':>9}")
    print(f"  {'':<6} {'':<5} {'s':>10} {'s':>10} {'ms/token':>10} {'':>8} {'GiB':>9} {'GiB':>9}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="refimpl-bench-") as tmp:
        for backend, numerics in configs:
            logits_path = os.path.join(tmp, f"{backend}-{numerics}.npy")
            res = run_worker("e2e", _common(args, numerics) + ["--backend", backend,
                                                                "--save-logits", logits_path])
            res.setdefault("backend", backend)
            res.setdefault("numerics", numerics)
            if os.path.exists(logits_path):
                res["logits"] = logits_path
                res["_logits"] = np.load(logits_path)
            rows.append(res)
            print(_fmt_e2e_row(res), flush=True)
        _e2e_agreement(rows)
    for r in rows:
        r.pop("_logits", None)
    out["e2e"] = rows
    by = {(r["backend"], r["numerics"]): r for r in rows if "error" not in r}
    nb = by.get(("numba", "bf16"))
    for ref, target in ((("torch", "fp32"), 1.2), (("numpy", "fp32"), 1.0)):
        other = by.get(ref)
        if not (nb and other):
            continue
        name = "/".join(ref)
        if ref[0] == "torch":
            print(f"  decode: numba bf16 {nb['decode_ms']:.1f} ms/token vs {name} "
                  f"{other['decode_ms']:.1f} ms/token = {other['decode_ms'] / nb['decode_ms']:.2f}x"
                  " (issue 16 target >= 2x)")
        for n in (128, 512):
            for numerics in ("bf16", "fp32"):
                ours = by.get(("numba", numerics))
                if ours and f"prefill{n}_s" in ours and f"prefill{n}_s" in other:
                    print(f"  prefill {n}: numba {numerics} {ours[f'prefill{n}_s']:.2f} s vs "
                          f"{name} {other[f'prefill{n}_s']:.2f} s = "
                          f"{other[f'prefill{n}_s'] / ours[f'prefill{n}_s']:.2f}x"
                          + (f" (issue 16 target >= {target}x)" if numerics == "bf16" else ""))


def _fmt_e2e_row(r) -> str:
    if "error" in r:
        return f"  {r['backend']:<6} {r['numerics']:<5} {r['error']}"
    p512 = f"{r['prefill512_s']:>10.2f}" if "prefill512_s" in r else "         -"
    return (f"  {r['backend']:<6} {r['numerics']:<5} {r['prefill128_s']:>10.2f} {p512} "
            f"{r['decode_ms']:>10.1f} {r['decode_tok_s']:>8.2f} {r['rss_loaded_gib']:>9.2f} "
            f"{r['peak_rss_gib']:>9.2f}")


def _e2e_agreement(rows) -> None:
    ref = {(r["backend"], r["numerics"]): r.get("_logits") for r in rows}
    pairs = [(("numba", "fp32"), ("torch", "fp32")), (("numba", "fp32"), ("numpy", "fp32")),
             (("numba", "bf16"), ("torch", "bf16")), (("numba", "bf16"), ("numba", "fp32"))]
    for a, b in pairs:
        la, lb = ref.get(a), ref.get(b)
        if la is not None and lb is not None:
            d = float(np.max(np.abs(la - lb)) / np.max(np.abs(lb)))
            print(f"  last-token logits after prefill 128, {'/'.join(a)} vs {'/'.join(b)}: "
                  f"normwise difference {d:.2e}, same argmax: {int(la.argmax()) == int(lb.argmax())}")


def _moe_stage_times(x, gate_w, scale, experts, shared, G, token_counts, rep) -> dict:
    """{T: {stage: (numba ms, spec ms)}} of the block's serving stages on the first T tokens
    (the numba stage kernels against the spec's operators, same inputs, same run)."""
    from refimpl import kernels as K
    from refimpl import ops
    from refimpl.ops.moe import ExpertPart

    E = gate_w.shape[0]
    out = {}
    for T in token_counts:
        xt = x[:T]
        logits = K.linear(xt, gate_w)
        ids, w = K.moge_route(logits, scale, G)
        d = K.moe_dispatch(ids, E, "v1", xt)
        cs = d["expert_cumsum"]
        act = K.grouped_gate_up(d["expanded_x"], experts, cs)
        w_down = ExpertPart(experts, 2, E)
        down = K.grouped_matmul(act, w_down, cs)
        ones = np.ones((T, G), np.float32)
        spec_rep = max(1, rep // 2)
        stages = {
            "route (gate linear + moge_route)": (
                lambda: K.moge_route(K.linear(xt, gate_w), scale, G),
                lambda: ops.moge_route(ops.linear(xt, gate_w), scale, G)),
            "dispatch (v1)": (lambda: K.moe_dispatch(ids, E, "v1", xt),
                              lambda: ops.moe_dispatch(ids, E, "v1", xt)),
            "grouped gate-up + SwiGLU": (
                lambda: K.grouped_gate_up(d["expanded_x"], experts, cs),
                lambda: ops.silu_and_mul(
                    ops.grouped_matmul(d["expanded_x"], ExpertPart(experts, 0, E), cs),
                    ops.grouped_matmul(d["expanded_x"], ExpertPart(experts, 1, E), cs))),
            "grouped down": (lambda: K.grouped_matmul(act, w_down, cs),
                             lambda: ops.grouped_matmul(act, w_down, cs)),
            "combine (finalize, K rows)": (
                lambda: K.moe_combine(down, ones, d["expanded_row_idx"]),
                lambda: ops.moe_combine(down, ones, d["expanded_row_idx"])),
            "shared expert": (lambda: K.swiglu(xt, *shared), lambda: ops.swiglu(xt, *shared)),
        }
        out[T] = {name: (1e3 * best_time(fast, rep), 1e3 * best_time(slow, spec_rep))
                  for name, (fast, slow) in stages.items()}
    return out


def bench_moe(args, out: dict) -> None:
    T = 128 if args.quick else 512
    _section(f"moe: Pro-MoE MoGE block, {T} tokens, hidden 5120, 64 experts x 1344 in 8 groups, "
             f"shared 5376, storage {args.numerics}")
    res = run_worker("moe", _common(args))
    out["moe"] = res
    if "error" in res:
        print("  " + res["error"])
        return
    print(f"  experts selected: {res['experts_selected']} of 64, tokens per selected expert "
          f"{res['tokens_per_expert_min_max'][0]}..{res['tokens_per_expert_min_max'][1]}")
    print(f"  numba moe_block:                 {res['numba_moe_ms']:10.1f} ms")
    print(f"  numba active experts alone:      {res['numba_active_ms']:10.1f} ms   "
          f"(moe_block / active = {res['numba_moe_ms'] / res['numba_active_ms']:.2f})")
    print(f"  numba all 64 experts + shared:   {res['numba_all_experts_ms']:10.1f} ms   "
          f"(all / moe_block = {res['numba_all_experts_ms'] / res['numba_moe_ms']:.2f}x)")
    print(f"  numpy spec moe_block:            {res['numpy_moe_ms']:10.1f} ms   "
          f"(spec / numba = {res['numpy_moe_ms'] / res['numba_moe_ms']:.2f}x; "
          "issue 16 target >= 1.5x)")
    if "torch_moe_ms" in res:
        print(f"  torch eager (HF-style loop):     {res['torch_moe_ms']:10.1f} ms   "
              f"(torch / numba = {res['torch_moe_ms'] / res['numba_moe_ms']:.2f}x; "
              "issue 16 target >= 2x)")
    peak, bw = res["fma_peak_gflops"], res["read_gbs"]
    print(f"  measured float32 FMA peak {peak:.1f} GFLOP/s, memory read {bw:.1f} GB/s")
    for Td, d in res["decode"].items():
        print(f"  T = {Td:>3}: numba moe_block {d['numba_ms']:8.2f} ms; {d['experts_selected']} "
              f"experts selected, {d['weight_bytes'] / 1e6:.0f} MB of weights (+ shared, "
              f"router) read once at {bw:.1f} GB/s: {d['read_once_ms']:.2f} ms; block / that = "
              f"{d['numba_ms'] / d['read_once_ms']:.2f} (issue 16 target <= 1.3)")
    print("  stages (numba kernel vs numpy spec, ms, same inputs):")
    for T, stages in res["stages"].items():
        print(f"    T = {T}:")
        for name, (fast, slow) in stages.items():
            fl = res["stage_flops"].get(T, {}).get(name)
            rate = (f"   {fl / fast / 1e6:6.1f} GFLOP/s {100 * fl / fast / 1e6 / peak:3.0f}% "
                    "of peak" if fl and int(T) >= 32 else "")
            print(f"      {name:34s} numba {fast:9.2f}   spec {slow:9.2f}   "
                  f"(spec / numba {slow / max(fast, 1e-9):6.1f}x){rate}")


def _spec_runs(target, drafter, prompts, K, new_tokens, repeat) -> dict:
    """Greedy decoding of every prompt, plain (drafter None) or speculative; median over
    `repeat` of the total time, and the speculative statistics of the last repeat."""
    from refimpl.generate import generate
    from refimpl.speculative import SpeculativeStats, speculative_generate

    times, outputs = [], []
    for _ in range(repeat):
        stats = SpeculativeStats()
        outputs = []
        t0 = time.perf_counter()
        for ids in prompts:
            gen = (generate(target, ids, new_tokens, stop_at_eos=False) if drafter is None else
                   speculative_generate(target, drafter, ids, K, new_tokens, stop_at_eos=False,
                                        stats=stats))
            outputs.append(list(gen))
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    return {"seconds": t, "tokens_per_s": len(prompts) * new_tokens / t, "outputs": outputs,
            "acceptance": stats.acceptance_rate, "tokens_per_forward": stats.tokens_per_forward}


def bench_speculative(args, out: dict) -> None:
    """Speculative vs plain greedy decoding in the same run: the default model with the
    n-gram and the shipped draft model, and the embedded-1b width (2 layers, random weights,
    a repetitive prompt) with the n-gram drafter. Numba backend, --numerics."""
    _section(f"speculative decoding: greedy, numba, {args.numerics} (plain decoding in the "
             "same run)")
    import refimpl
    from refimpl.io.checkpoint import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR, load_model
    from refimpl.speculative import ModelDrafter, NgramDrafter
    from refimpl.tokenizer import Tokenizer

    repeat = args.repeat or (1 if args.quick else 3)
    new_tokens = 24 if args.quick else 48
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    heldout = os.path.join(os.path.dirname(DEFAULT_MODEL_DIR), "heldout", "evaluation.txt")
    with open(heldout, encoding="utf-8") as fh:
        lines = [ln.strip() for ln in fh if ln.strip()][:2 if args.quick else 4]
    default = load_model(DEFAULT_MODEL_DIR, numerics=args.numerics, backend="numba")
    draft = load_model(DEFAULT_DRAFT_DIR, numerics=args.numerics, backend="numba")
    wide = refimpl.init_model("embedded-1b", seed=0, numerics=args.numerics, backend="numba",
                              num_hidden_layers=2)
    setups = [("default (3.8M)", default, [tok.encode(ln)[:16] for ln in lines],
               {"ngram": NgramDrafter, "default-draft (0.87M)": lambda: ModelDrafter(draft)}),
              ("embedded-1b width, 2 layers, random", wide,
               [[1, 500, 600, 700, 800, 500, 600, 700]], {"ngram": NgramDrafter})]
    rows = []
    print("| target | drafter | K | acceptance | tokens / target forward | tokens/s | "
          "vs plain | greedy = plain |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, target, prompts, drafters in setups:
        _spec_runs(target, ModelDrafter(draft) if target is default else None, prompts[:1], 2,
                   4, 1)                                  # compile, fault pages in
        plain = _spec_runs(target, None, prompts, 0, new_tokens, repeat)
        print(f"| {name} | (plain) | - | - | 1.00 | {plain['tokens_per_s']:.1f} | 1.00x | - |")
        rows.append({"target": name, "drafter": None, **{k: v for k, v in plain.items()
                                                        if k != "outputs"}})
        for dname, make in drafters.items():
            for K in ((2, 4) if args.quick else (1, 2, 4, 8)):
                r = _spec_runs(target, make(), prompts, K, new_tokens, repeat)
                same = r["outputs"] == plain["outputs"]
                print(f"| {name} | {dname} | {K} | {r['acceptance']:.1%} | "
                      f"{r['tokens_per_forward']:.2f} | {r['tokens_per_s']:.1f} | "
                      f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x | "
                      f"{'yes' if same else 'NO'} |")
                rows.append({"target": name, "drafter": dname, "K": K, "greedy_equal": same,
                             **{k: v for k, v in r.items() if k != "outputs"}})
    out["speculative"] = rows


def _common(args, numerics=None) -> list[str]:
    extra = ["--repeat", str(args.repeat), "--numerics", numerics or args.numerics]
    return extra + (["--quick"] if args.quick else [])


def run(args) -> dict:
    """The whole benchmark (as `python -m refimpl bench`); returns the results."""
    if args.isa:                       # before anything compiles: workers inherit it
        os.environ.update(ISA_ENV[args.isa])
    out = {"machine": machine_info(), "args": vars(args).copy()}
    out["args"].pop("func", None)
    m = out["machine"]
    print("refimpl bench" + (" --quick" if args.quick else ""))
    print(f"  machine: {m.get('Model name', platform.processor())}, {m.get('cpus')} CPUs, "
          f"{m.get('mem_total_gib', '?')} GiB")
    print(f"  numpy {m['numpy']}, numba {m['numba']} ({m['numba_threads']} threads, "
          f"{m['threading_layer']} layer), torch {m.get('torch', 'not installed')} "
          f"({m.get('torch_threads', '-')} threads), transformers "
          f"{m.get('transformers', '-')}")
    print(f"  ISA: {' '.join(m['isa']) or '(unknown)'}")
    if args.isa:
        print(f"  code for {args.isa.upper()} only, every worker: "
              + ", ".join(f"{k}={v}" for k, v in ISA_ENV[args.isa].items()))
    print("  env: " + ", ".join(f"{k}={m[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS",
                                                         "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")))
    if m["loadavg_1min"] > 0.5:
        print(f"  warning: load average {m['loadavg_1min']} > 0.5 - other jobs share the CPUs, "
              "timings are inflated")
    sections = {"compile": bench_compile, "ops": bench_ops, "e2e": bench_e2e, "moe": bench_moe,
                "longctx": bench_longctx, "speculative": bench_speculative}
    for name in ([args.only] if args.only else list(sections)):
        sections[name](args, out)
    if args.json:
        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=1, default=float)
        os.replace(tmp, args.json)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes, 4 of 26 layers end to end, 128-token MoE")
    p.add_argument("--only", choices=["compile", "ops", "e2e", "moe", "longctx", "speculative"],
                   help="one section")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed runs per measurement, the best reported (default 3, quick 1)")
    p.add_argument("--numerics", choices=["fp32", "bf16", "fp16", "fp64"], default="bf16",
                   help="storage dtype of the ops and moe sections (default bf16)")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--configs", help="e2e only these BACKEND:NUMERICS, comma-separated "
                   "(default numba:bf16,numba:fp32,numpy:fp32,torch:fp32,torch:bf16)")
    p.add_argument("--isa", choices=sorted(ISA_ENV),
                   help="compile and dispatch for this ISA only (Numba, PyTorch/oneDNN/MKL, "
                        "OpenBLAS), to measure an AVX2 host's code path on an AVX-512 one")


def _worker_main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m refimpl.bench worker")
    p.add_argument("kind", choices=["compile", "ops", "e2e", "moe", "longctx"])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--numerics", default="bf16")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backend", default="numba")
    p.add_argument("--save-logits")
    p.add_argument("--real-only", action="store_true",
                   help="compile: only the first 1B-width forward, no small-input warm-up")
    args = p.parse_args(argv)
    fn = {"compile": worker_compile, "ops": worker_ops, "e2e": worker_e2e,
          "moe": worker_moe, "longctx": worker_longctx}[args.kind]
    result = fn(args)
    print("RESULT " + json.dumps(result, default=float), flush=True)
    return 0


def worker_main(argv=None) -> int:
    """`python -m refimpl.bench worker KIND ...` (bench/__main__.py)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return _worker_main(argv[1:])
    raise SystemExit("use: python -m refimpl bench --help")
