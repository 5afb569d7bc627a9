"""Measure streamed forwards of Pangu Pro-MoE at its real width: memory and time vs layers.

    python tools/measure_streaming.py --layers 1,2,4 --tokens 32 --backends numpy,numba \\
        --speed --golden 2 --delete --json /tmp/streaming.json

For each layer count N it writes (unless present) the real-width bf16 checkpoint with N
layers, DIR/moe{N} (`refimpl.io.checkpoint.init_checkpoint('pro-moe-72b', layers=N)`: 1.57 GB
embedding + 1.57 GB LM head + 2.94 GB a layer), then per backend runs a child process that
loads it with `refimpl.io.streaming.load_streamed` (bf16 numerics) and runs two forwards over
tokens 1..T: the first "cold" (the checkpoint's pages are evicted from the page cache before
the child starts, with posix_fadvise(DONTNEED), and each tensor is checked for NaN/Inf when
first used), the second "warm" (whatever the page cache kept; no checks). The parent samples
the child's /proc/PID/status every 5 ms for the peaks of RssAnon and RssFile; VmHWM comes
from the kernel. Numba kernels are loaded (from their cache) on a tiny model before the
checkpoint is opened, so compilation is not in the times.

--speed measures what bounds a layer: disk reads (cold read of a shard with read(2), with
dd iflag=direct, and by touching a memory map), page-cache reads, memory bandwidth, the
bf16 -> float32 conversion, the NaN check, NumPy's float32 product and the Numba bf16
linear. --golden N times `python -m refimpl golden --model DIR --no-weights` (every layer
and the model case) on the N-layer checkpoint. Prints Markdown tables (and writes --json). The machine is shared: the figures
move with other jobs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from refimpl.io.streaming import PeakSampler, format_size

PRESET = "pro-moe-72b"


# ---------------------------------------------------------------------- page cache
def shards(directory) -> list:
    return sorted(glob.glob(os.path.join(directory, "*.safetensors")))


def evict(paths) -> None:
    """Drop the files' pages from the page cache (posix_fadvise DONTNEED; clean pages only)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- the child
def worker(directory: str, backend: str, tokens: int, passes: int) -> None:
    """Runs in the child: prints one JSON object with the times and memory of each pass."""
    from refimpl.io import streaming
    from refimpl.random_init import init_model

    warm = init_model("tiny-moge", numerics="bf16", backend=backend)
    warm.forward(np.arange(1, 5))                     # load the kernels (Numba cache)
    base = streaming.memory_status()
    t0 = time.perf_counter()
    model = streaming.load_streamed(directory, numerics="bf16", backend=backend,
                                    progress=None)
    load_s = time.perf_counter() - t0
    ids = np.arange(1, tokens + 1)
    out = {"backend": backend, "tokens": tokens, "baseline": base, "load_seconds": load_s,
           "layers": model.config.num_hidden_layers, "passes": []}
    for _ in range(passes):
        logits = model.forward(ids)                   # [T, V] bf16
        s = model.stats
        out["passes"].append({"seconds": s["seconds"], "layer_seconds": s["layer_seconds"],
                              "head_seconds": s["head_seconds"],
                              "memory_after": streaming.memory_status()})
    out["argmax"] = np.argmax(logits.astype(np.float32), axis=-1).tolist()
    out["experts_read"] = sum(1 for n in model.weights.counts if ".mlp.experts." in n) // 3
    out["final"] = streaming.memory_status()
    print(json.dumps(out))


def run_sampled(cmd, interval=0.005) -> tuple:
    """(completed process, peaks, seconds): run cmd, sampling its memory."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakSampler(pid=proc.pid, interval=interval).start()
    stdout, stderr = proc.communicate()
    peaks = sampler.stop()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return stdout, peaks, time.perf_counter() - t0


def measure(directory, backend, tokens, repeat=1, passes=2) -> dict:
    """`repeat` child runs; the run with the fastest cold forward is kept (the machine is
    shared: the slower runs measured other jobs too), with the range of the times."""
    runs = []
    for _ in range(repeat):
        evict(shards(directory))
        load = os.getloadavg()[0]
        stdout, peaks, _ = run_sampled([sys.executable, os.path.abspath(__file__), "--worker",
                                        directory, backend, str(tokens), str(passes)])
        run = json.loads(stdout.strip().splitlines()[-1])
        run["peak"], run["load_average"] = peaks, load
        runs.append(run)
    best = dict(min(runs, key=lambda r: r["passes"][0]["seconds"]))
    best["runs"] = [{"load_average": r["load_average"], "peak": r["peak"],
                     "seconds": [p["seconds"] for p in r["passes"]]} for r in runs]
    best["peak"] = {k: max(r["peak"][k] for r in runs) for k in best["peak"]}  # worst case
    best["checkpoint_bytes"] = sum(os.path.getsize(p) for p in shards(directory))
    return best


def estimate_48(run) -> dict:
    """Seconds of a 48-layer forward from one run's cold pass: its first layer (which also
    checks the whole embedding) + 47 x the median of its other layers + its LM head."""
    ls = run["passes"][0]["layer_seconds"]
    steady = float(np.median(ls[1:] if len(ls) > 1 else ls))
    return {"first_layer": ls[0], "steady_layer": steady,
            "head": run["passes"][0]["head_seconds"],
            "total": ls[0] + 47 * steady + run["passes"][0]["head_seconds"]}


# ---------------------------------------------------------------------- speed
def _time(fn, repeat=3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def speed(directory) -> dict:
    """GB/s and GFLOP/s of the things a streamed layer does, on this machine."""
    import mmap

    from refimpl import kernels, ops
    from refimpl.io.checkpoint import check_all_finite
    from refimpl.numerics import bfloat16

    out = {}
    shard = max(shards(directory), key=os.path.getsize)
    size = os.path.getsize(shard)

    def read_all():
        with open(shard, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass

    evict([shard])
    t = _time(read_all, 1)
    out["disk_read_cold_GBps"] = size / t / 1e9
    out["page_cache_read_GBps"] = size / _time(read_all, 2) / 1e9
    try:
        dd = subprocess.run(["dd", f"if={shard}", "of=/dev/null", "bs=16M", "iflag=direct"],
                            capture_output=True, text=True, check=True).stderr
        out["dd_direct"] = dd.strip().splitlines()[-1]
    except (OSError, subprocess.CalledProcessError) as exc:
        out["dd_direct"] = f"failed: {exc}"

    def touch():  # one byte per page through a memory map, as a streamed layer faults them in
        with open(shard, "rb") as fh:
            m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        a = np.frombuffer(m, dtype=np.uint8)
        int(a[::mmap.PAGESIZE].sum())
        del a
        m.close()

    evict([shard])
    out["mmap_touch_cold_GBps"] = size / _time(touch, 1) / 1e9
    out["mmap_touch_cached_GBps"] = size / _time(touch, 2) / 1e9

    rng = np.random.default_rng(0)
    src = rng.standard_normal(2**28 // 4 * 4, dtype=np.float32)        # 1 GiB
    dst = np.empty_like(src)
    out["memory_copy_GBps"] = 2 * src.nbytes / _time(lambda: np.copyto(dst, src)) / 1e9
    del src, dst
    w = (rng.standard_normal((5376, 5120), dtype=np.float32) * 0.02).astype(bfloat16)
    out["bf16_to_f32_GBps"] = w.nbytes / _time(lambda: w.astype(np.float32)) / 1e9
    out["nan_check_GBps"] = w.nbytes / _time(lambda: check_all_finite({"w": w})) / 1e9
    w32 = w.astype(np.float32)
    for T in (1, 32):
        x = rng.standard_normal((T, 5120), dtype=np.float32).astype(bfloat16)
        flops = 2 * T * w.size
        out[f"numpy_f32_matmul_T{T}_GFLOPs"] = flops / _time(
            lambda: x.astype(np.float32) @ w32.T) / 1e9
        out[f"numpy_linear_bf16_T{T}_GBps_of_weight"] = w.nbytes / _time(
            lambda: ops.linear(x, w)) / 1e9
        kernels.linear(x, w)                                          # compile / load
        tk = _time(lambda: kernels.linear(x, w))
        out[f"numba_linear_bf16_T{T}_GBps_of_weight"] = w.nbytes / tk / 1e9
        out[f"numba_linear_bf16_T{T}_GFLOPs"] = flops / tk / 1e9
    return out


def golden(directory, tokens) -> dict:
    """Time and memory of `golden --model DIR --no-weights` (every layer and the model case):
    tools/measure_golden_memory.py's measurement."""
    from measure_golden_memory import measure

    return measure(directory, tokens, weights=False)


# ---------------------------------------------------------------------- report
def gib(nbytes) -> str:
    return f"{nbytes / 2**30:.2f}"


def fit(xs, ys) -> tuple:
    """(intercept, slope) of the least-squares line through (xs, ys)."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(intercept), float(slope)


def report(results, speeds, gold, tokens) -> str:
    lines = ["| layers | checkpoint GiB | backend | peak RssAnon GiB | anon / checkpoint "
             "| peak RssFile GiB | VmHWM GiB | forward 1: cold, NaN checks, s | s / layer "
             "| forward 2: warm, s | s / layer | experts read | runs (load avg) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        p1, p2 = r["passes"][0], r["passes"][-1]
        cold = sorted(x["seconds"][0] for x in r["runs"])
        loads = ", ".join(f"{x['load_average']:.1f}" for x in r["runs"])
        spread = f" (to {cold[-1]:.1f})" if len(cold) > 1 else ""
        lines.append(
            f"| {r['layers']} | {gib(r['checkpoint_bytes'])} | {r['backend']} "
            f"| {gib(r['peak']['rss_anon'])} "
            f"| {r['peak']['rss_anon'] / r['checkpoint_bytes']:.3f} "
            f"| {gib(r['peak']['rss_file'])} | {gib(r['peak']['vm_hwm'])} "
            f"| {p1['seconds']:.1f}{spread} | {np.mean(p1['layer_seconds']):.2f} "
            f"| {p2['seconds']:.1f} | {np.mean(p2['layer_seconds']):.2f} "
            f"| {r['experts_read']} of {64 * r['layers']} | {len(r['runs'])} ({loads}) |")
    lines.append("")
    for backend in sorted({r["backend"] for r in results}):
        rs = sorted((r for r in results if r["backend"] == backend), key=lambda r: r["layers"])
        anon = [r["peak"]["rss_anon"] for r in rs]
        slope = fit([r["layers"] for r in rs], anon)[1] if len(rs) > 1 else 0.0
        ck0, ck1 = (fit([r["layers"] for r in rs], [r["checkpoint_bytes"] for r in rs])
                    if len(rs) > 1 else (0.0, 0.0))
        est = estimate_48(rs[-1])
        lines.append(
            f"- {backend}: peak RssAnon {', '.join(gib(a) for a in anon)} GiB at "
            f"{', '.join(str(r['layers']) for r in rs)} layers (slope {slope / 2**20:+.1f} "
            f"MiB/layer): about {format_size(max(anon) + 48 * max(slope, 0))} at 48 layers"
            + (f", {max(anon) / (ck0 + 48 * ck1):.2%} of the {format_size(ck0 + 48 * ck1)} "
               "checkpoint" if ck1 else "")
            + f". 48-layer cold forward of {tokens} tokens from the {rs[-1]['layers']}-layer "
            f"run: {est['first_layer']:.1f} s + 47 x {est['steady_layer']:.2f} s + LM head "
            f"{est['head']:.1f} s = {est['total'] / 60:.1f} min")
    if speeds:
        lines += ["", "| measurement | value |", "| --- | --- |"]
        lines += [f"| {k} | {v if isinstance(v, str) else f'{v:.2f}'} |"
                  for k, v in speeds.items()]
    if gold:
        lines += ["", f"golden: `{gold['command']}`: {gold['cases']} cases, "
                      f"{gold['output_bytes'] / 2**20:.1f} MiB, {gold['seconds']:.0f} s, peak "
                      f"RssAnon {gib(gold['peak']['rss_anon'])} GiB, RssFile "
                      f"{gib(gold['peak']['rss_file'])} GiB, VmHWM "
                      f"{gib(gold['peak']['vm_hwm'])} GiB"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="1,2,4", help="layer counts, e.g. 1,2,4")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--backends", default="numpy,numba")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per measurement; the fastest cold forward is kept")
    p.add_argument("--dir", default=tempfile.gettempdir(),
                   help="where the checkpoints moe{N} are (written when missing)")
    p.add_argument("--speed", action="store_true", help="also the throughput measurements")
    p.add_argument("--golden", type=int, metavar="N",
                   help="also golden --model on the checkpoint with N layers (one of --layers)")
    p.add_argument("--delete", action="store_true",
                   help="delete the checkpoints written by this run at the end")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--worker", nargs=4, metavar=("DIR", "BACKEND", "TOKENS", "PASSES"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]), int(args.worker[3]))
        return 0

    from refimpl.io.checkpoint import init_checkpoint

    counts = [int(v) for v in args.layers.split(",")]
    results, written, speeds, gold = [], [], None, None
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB; "
          f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    try:
        for n in counts:
            directory = os.path.join(args.dir, f"moe{n}")
            if not os.path.isdir(directory):
                need = 1.6e9 * 2 + 3.0e9 * n
                free = shutil.disk_usage(args.dir).free
                if free < need * 1.2:
                    raise SystemExit(f"{args.dir}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} "
                                     f"GB needed for {n} layers")
                print(f"writing {directory} ...", file=sys.stderr)
                init_checkpoint(PRESET, directory, seed=0, dtype="bf16", layers=n)
                written.append(directory)
            for backend in args.backends.split(","):
                print(f"{n} layers, {backend} ...", file=sys.stderr)
                results.append(measure(directory, backend, args.tokens, args.repeat))
        largest = os.path.join(args.dir, f"moe{max(counts)}")
        if args.speed:
            speeds = speed(largest)
        if args.golden:
            gold = golden(os.path.join(args.dir, f"moe{args.golden}"), args.tokens)
    finally:
        if args.delete:
            for directory in written:
                shutil.rmtree(directory, ignore_errors=True)
    text = report(results, speeds, gold, args.tokens)
    print(text)
    if args.json:
        with open(args.json + ".tmp", "w", encoding="utf-8") as fh:
            json.dump({"results": results, "speed": speeds, "golden": gold,
                       "load_average": os.getloadavg()}, fh, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
