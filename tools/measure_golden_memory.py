"""Peak memory of `python -m refimpl golden --model DIR` on big checkpoints, sampled from outside.

    python tools/measure_golden_memory.py /tmp/big/moe2 /tmp/big/moe4 --tokens 32 \\
        [--no-weights] [--json out.json]

For each checkpoint directory it evicts the checkpoint's pages from the page cache, runs the
golden command (every layer and the model case, bf16, token ids 1..T, weights included in the
layer cases unless --no-weights) as a child process, and samples the child's
/proc/PID/status every 5 ms for the peaks of RssAnon and RssFile (VmHWM from the kernel).
The cases are written to a temporary directory and deleted. Prints a Markdown table for
BENCHMARKS.md with the host's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure_streaming import evict, gib, run_sampled, shards  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def isa() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next(line for line in fh if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "SSE")


def measure(directory: str, tokens: int, weights: bool) -> dict:
    from refimpl.io.checkpoint import load_config

    layers = load_config(directory).num_hidden_layers
    out_dir = tempfile.mkdtemp(prefix="golden-memory-")
    try:
        evict(shards(directory))
        cmd = [sys.executable, "-m", "refimpl", "golden", "--model", directory, "--token-ids",
               ",".join(str(i) for i in range(1, tokens + 1)), "--numerics", "bf16",
               "--out", out_dir] + ([] if weights else ["--no-weights"])
        stdout, peaks, seconds = run_sampled(cmd)
        nbytes = sum(os.path.getsize(os.path.join(root, f))
                     for root, _, files in os.walk(out_dir) for f in files)
        return {"directory": directory, "layers": layers, "weights": weights,
                "command": " ".join(cmd[1:]).replace(out_dir, "OUT"), "seconds": seconds,
                "peak": peaks, "output_bytes": nbytes, "cases": stdout.count("wrote ")}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--no-weights", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = [measure(d, args.tokens, not args.no_weights) for d in args.dirs]
    print(f"host: {cpu_name()} ({isa()}), {os.cpu_count()} cores")
    print("| layers | weights in layer cases | cases | output | time | peak RssAnon | "
          "peak RssFile | VmHWM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        pk = r["peak"]
        print(f"| {r['layers']} | {'yes' if r['weights'] else 'no'} | {r['cases']} | "
              f"{gib(r['output_bytes'])} GiB | {r['seconds']:.0f} s | "
              f"{gib(pk.get('rss_anon', 0))} GiB | {gib(pk.get('rss_file', 0))} GiB | "
              f"{gib(pk.get('vm_hwm', 0))} GiB |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
