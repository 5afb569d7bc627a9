"""Measure W8A8 against bf16: accuracy, checkpoint bytes, resident memory, decode speed.

    python tools/measure_quant.py --json /tmp/quant.json            # everything (~10 min)
    python tools/measure_quant.py --only accuracy,memory --real-layers 2

Models (each quantised here with `python -m refimpl quantize`, static `w8a8` calibrated on
the default held-out calibration text, and `w8a8_dynamic`):

* `default`: the embedded default model (refimpl/data/default, trained on this machine's
  stdlib docs). Perplexity and next-token top-1 accuracy on refimpl/data/heldout/evaluation.txt
  (never used for calibration), in fp32, bf16 and both W8A8 schemes.
* `embedded-1b`: the real-width openPangu-Embedded-1B shapes (hidden 1536, MLP 6144, 12/6
  heads, vocab 153376) with seeded random weights and --real-layers layers (default 2).
* `tiny-moge`: the MoGE preset with random weights, for the expert path (one activation
  scale per layer shared by all experts, tokens quantised once before dispatch).

Accuracy (all models; the evaluation text's token ids): the relative error
||y - y_fp32|| / ||y_fp32|| of every layer's output and of the logits, for bf16 and for W8A8
against the fp32 model (so bf16's own error stands next to what W8A8 adds), and the top-1
agreement of next-token predictions with bf16 and with fp32. Random weights give flat
logits whose top-1 is decided by small margins, so their agreement is a lower bound of what a
trained model shows.

Memory: checkpoint bytes on disk, and the resident memory (VmRSS: file-backed + anonymous)
a child process adds by loading the model (numba backend) and running one 16-token forward,
bf16 vs W8A8; plus the bytes of a full W8A8 checkpoint of every preset from its tensor specs
(`refimpl.quant.format.quant_tensor_specs`), next to bf16.

Speed: decode (a 16-token prefill, then one token at a time with the KV cache) of the bf16
and W8A8 models, numba backend, interleaved in the same run; median per-token time of the
layer stack and of the whole step (the LM head stays bf16 in both). And the linears alone at
real shapes: the numba W8A8 linear (quantise, int8 matmul, dequantise) against the numba
bf16 linear, T = 1 and 64, with the weight bytes each reads. The machine is shared: figures
move with other jobs; ratios from the same run are the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from refimpl.bench.suite import isa_flags
from refimpl.config import preset
from refimpl.io.checkpoint import DEFAULT_MODEL_DIR, init_checkpoint, load_model
from refimpl.numerics import bfloat16
from refimpl.taps import Taps
from refimpl.tokenizer import Tokenizer

HELDOUT = os.path.join(os.path.dirname(DEFAULT_MODEL_DIR), "heldout")
SCHEMES = ("w8a8", "w8a8_dynamic")
EVAL_SEQ_LEN = 256


# ---------------------------------------------------------------------- set-up
def quantize(model: str, scheme: str, out: str, extra=()) -> str:
    """`python -m refimpl quantize` into out (kept if already there)."""
    if not os.path.isdir(out):
        subprocess.run([sys.executable, "-m", "refimpl", "quantize", "--model", model,
                        "--scheme", scheme, "--out", out, "--backend", "numba", *extra],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def heldout_sequences(part: str, vocab_size: int) -> list:
    """A held-out text ('evaluation' or 'calibration'), one sequence of the default
    tokenizer's ids (bos first) per line; ids taken modulo vocab_size for a smaller model."""
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    with open(os.path.join(HELDOUT, f"{part}.txt"), encoding="utf-8") as fh:
        lines = [ln.strip() for ln in fh if ln.strip()]
    return [np.array(tok.encode(ln)[:EVAL_SEQ_LEN], np.int64) % vocab_size for ln in lines]


def models_of(work: str, real_layers: int) -> dict:
    """name -> {'float': DIR, 'w8a8': QDIR, 'w8a8_dynamic': QDIR}."""
    out = {}
    dirs = {"default": DEFAULT_MODEL_DIR}
    calib = {}
    for name, layers in (("embedded-1b", real_layers), ("tiny-moge", None)):
        d = os.path.join(work, f"{name}-bf16" + (f"-L{layers}" if layers else ""))
        vocab = preset(name).vocab_size
        if not os.path.isdir(d):
            init_checkpoint(name, d, seed=0, layers=layers,
                            tokenizer=DEFAULT_MODEL_DIR if vocab >= 4096 else None)
        dirs[name] = d
        if vocab < 4096:             # no tokenizer fits: the calibration text's ids, modulo
            calib[name] = os.path.join(work, f"{name}-calibration-ids.txt")
            with open(calib[name], "w") as fh:
                for seq in heldout_sequences("calibration", vocab):
                    fh.write(",".join(map(str, seq)) + "\n")
    for name, d in dirs.items():
        out[name] = {"float": d}
        for scheme in SCHEMES:
            extra = ("--calib", calib[name]) if name in calib and scheme == "w8a8" else ()
            out[name][scheme] = quantize(d, scheme, os.path.join(
                work, f"{os.path.basename(d)}-{scheme}"), extra)
    return out


# ---------------------------------------------------------------------- accuracy
def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def rel_err(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


def accuracy(dirs: dict, seqs: list) -> dict:
    """Per variant: perplexity, top-1 accuracy against the text, top-1 agreement with bf16
    and fp32, and the relative error of every layer's output and the logits against fp32."""
    variants = {"fp32": load_model(dirs["float"], numerics="fp32", backend="numba"),
                "bf16": load_model(dirs["float"], numerics="bf16", backend="numba")}
    for scheme in SCHEMES:
        variants[scheme] = load_model(dirs[scheme], numerics="w8a8", backend="numba")
    L = variants["fp32"].config.num_hidden_layers
    runs = {v: [] for v in variants}
    for ids in seqs:
        for v, model in variants.items():
            taps = Taps(range(L))
            logits = model.forward(ids, taps=taps)
            runs[v].append({"logits": logits.astype(np.float64),
                            "outs": [taps[f"layers.{i}.out"].astype(np.float64)
                                     for i in range(L)]})
    out = {}
    for v in variants:
        nll, hits, agree_bf16, agree_fp32, n = 0.0, 0, 0, 0, 0
        layer_err = np.zeros(L)
        logit_err = 0.0
        for s, ids in enumerate(seqs):
            lg = runs[v][s]["logits"]
            lp = log_softmax(lg[:-1])
            nll -= lp[np.arange(ids.size - 1), ids[1:]].sum()
            top = lg.argmax(-1)
            hits += int((top[:-1] == ids[1:]).sum())
            agree_bf16 += int((top == runs["bf16"][s]["logits"].argmax(-1)).sum())
            agree_fp32 += int((top == runs["fp32"][s]["logits"].argmax(-1)).sum())
            n += ids.size
            layer_err += [rel_err(a, b) for a, b in zip(runs[v][s]["outs"],
                                                        runs["fp32"][s]["outs"])]
            logit_err += rel_err(lg, runs["fp32"][s]["logits"])
        predicted = n - len(seqs)
        out[v] = {"perplexity": float(np.exp(nll / predicted)),
                  "top1_accuracy": hits / predicted,
                  "top1_agree_bf16": agree_bf16 / n, "top1_agree_fp32": agree_fp32 / n,
                  "layer_rel_err_vs_fp32": (layer_err / len(seqs)).tolist(),
                  "logits_rel_err_vs_fp32": logit_err / len(seqs), "tokens": n}
    return out


# ---------------------------------------------------------------------- memory
_CHILD = r"""
import json, sys, numpy as np
from refimpl.io.checkpoint import load_model
from refimpl import init_model
def status():
    d = {}
    for line in open('/proc/self/status'):
        k, v = line.split(':', 1)
        if k in ('VmRSS', 'RssAnon', 'RssFile', 'VmHWM'):
            d[k] = int(v.split()[0]) * 1024
    return d
init_model('tiny-dense', numerics='bf16', backend='numba').forward(np.arange(1, 5))  # kernels
base = status()
m = load_model(sys.argv[1], numerics=sys.argv[2], backend='numba')
loaded = status()
m.forward(np.arange(1, 17))
after = status()
print(json.dumps({'base': base, 'loaded': loaded, 'after': after}))
"""


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
               if f.endswith((".safetensors", ".json")))


def resident(d: str, numerics: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, d, numerics], check=True,
                       capture_output=True, text=True)
    s = json.loads(r.stdout.strip().splitlines()[-1])
    return {"added_rss": s["after"]["VmRSS"] - s["base"]["VmRSS"],
            "added_file": s["after"]["RssFile"] - s["base"]["RssFile"],
            "added_anon": s["after"]["RssAnon"] - s["base"]["RssAnon"],
            "base_rss": s["base"]["VmRSS"]}


def spec_bytes() -> dict:
    """Bytes of a full checkpoint of every preset: bf16 vs W8A8 / W8A8_DYNAMIC (specs)."""
    from refimpl.config import weight_shapes
    from refimpl.quant.format import quant_tensor_specs
    out = {}
    for name in ("embedded-1b", "embedded-7b", "pro-moe-72b"):
        c = preset(name)
        bf16 = sum(int(np.prod(s)) * 2 for s in weight_shapes(c).values())
        row = {"bf16": bf16}
        for scheme in ("W8A8", "W8A8_DYNAMIC"):
            specs = quant_tensor_specs(c, scheme, np.dtype(bfloat16))
            row[scheme] = sum(int(np.prod(s)) * np.dtype(dt).itemsize
                              for s, dt in specs.values())
        out[name] = row
    return out


def memory(models: dict) -> dict:
    out = {"presets_full": spec_bytes()}
    for name, dirs in models.items():
        row = {}
        for v in ("float",) + SCHEMES:
            numerics = "bf16" if v == "float" else "w8a8"
            row[v] = {"checkpoint_bytes": dir_bytes(dirs[v]), **resident(dirs[v], numerics)}
        out[name] = row
    return out


# ---------------------------------------------------------------------- speed
def decode_times(model, steps: int, prompt: int = 16) -> tuple:
    """Per-token decode: (layer-stack seconds, whole-step seconds) for each step."""
    cache = model.new_cache(prompt + steps + 1)
    model.forward(np.arange(1, prompt + 1), cache=cache, last_only=True)
    L = model.config.num_hidden_layers
    stack, whole = [], []
    tok = 5
    for _ in range(steps):
        marks = {}
        t0 = time.perf_counter()
        logits = model.forward([tok], cache=cache, last_only=True,
                               progress=lambda i: marks.__setitem__(i, time.perf_counter()))
        t1 = time.perf_counter()
        stack.append(marks[L - 1] - t0)
        whole.append(t1 - t0)
        tok = int(logits.argmax())
    return stack, whole


def speed(models: dict, steps: int, rounds: int) -> dict:
    out = {}
    for name in ("default", "embedded-1b"):
        dirs = models[name]
        variants = {"bf16": load_model(dirs["float"], numerics="bf16", backend="numba")}
        for scheme in SCHEMES:
            variants[scheme] = load_model(dirs[scheme], numerics="w8a8", backend="numba")
        for m in variants.values():
            decode_times(m, 2)                                   # compile, fault pages in
        acc = {v: ([], []) for v in variants}
        for _ in range(rounds):                                  # interleaved
            for v, m in variants.items():
                s, w = decode_times(m, steps)
                acc[v][0].extend(s)
                acc[v][1].extend(w)
        out[name] = {v: {"stack_ms": 1e3 * float(np.median(s)),
                         "step_ms": 1e3 * float(np.median(w))} for v, (s, w) in acc.items()}
    out["linears"] = linear_speed(rounds)
    return out


def linear_speed(rounds: int) -> list:
    """The numba W8A8 linear vs the numba bf16 linear at real shapes."""
    from refimpl import kernels as K
    from refimpl import ops
    from refimpl.quant.quantize import weight_quant
    rng = np.random.default_rng(0)
    bf16 = np.dtype(bfloat16)
    shapes = [("embedded-1b q_proj", 1536, 1536), ("embedded-1b gate_proj", 6144, 1536),
              ("embedded-1b down_proj", 1536, 6144), ("embedded-7b gate_proj", 12800, 4096),
              ("embedded-7b down_proj", 4096, 12800), ("pro-moe-72b shared gate_up", 10752, 5120)]
    rows, checks = [], []
    for label, n, k in shapes:
        w = (rng.standard_normal((n, k)) * k ** -0.5).astype(bf16)
        w_q, w_scale = weight_quant(w.astype(np.float32), bf16)
        q = {"scheme": "W8A8_DYNAMIC", "weight": w_q, "weight_scale": w_scale,
             "weight_offset": np.zeros_like(w_scale), "bias": None}
        for T in (1, 64):
            x = rng.standard_normal((T, k)).astype(bf16)
            K.linear(x, w), K.w8a8_linear(x, q)                  # compile
            tb, tq = [], []
            for _ in range(max(rounds, 3) * 5):
                t0 = time.perf_counter(); K.linear(x, w); t1 = time.perf_counter()
                K.w8a8_linear(x, q); t2 = time.perf_counter()
                tb.append(t1 - t0); tq.append(t2 - t1)
            checks.append((x, q))
            mb, mq = float(np.median(tb)), float(np.median(tq))
            rows.append({"linear": label, "n": n, "k": k, "T": T, "bf16_ms": 1e3 * mb,
                         "w8a8_ms": 1e3 * mq, "bf16_GBps": n * k * 2 / mb / 1e9,
                         "w8a8_GBps": n * k / mq / 1e9, "bf16_Gops": 2 * T * n * k / mb / 1e9,
                         "w8a8_Gops": 2 * T * n * k / mq / 1e9})
    # the kernel equals the spec (checked after the timings: the spec's float64 BLAS leaves
    # OpenBLAS threads spinning, which would slow the Numba threads timed next)
    for x, q in checks:
        assert np.array_equal(K.w8a8_linear(x, q).view(np.uint16),
                              ops.w8a8_linear(x, q).view(np.uint16))
    return rows


# ---------------------------------------------------------------------- report
def machine() -> dict:
    import numba
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh
                         if ln.startswith("model name")), name)
    except OSError:
        pass
    return {"cpu": name, "isa": isa_flags(), "cores": os.cpu_count(),
            "numpy": np.__version__, "numba": numba.__version__, "load": os.getloadavg()[0]}


def report(r: dict) -> None:
    m = r["machine"]
    print(f"host: {m['cpu']}, {m['cores']} cores, {' '.join(m['isa'])}; numpy {m['numpy']}, "
          f"numba {m['numba']}; load {m['load']:.2f}\n")
    if "accuracy" in r:
        for name, acc in r["accuracy"].items():
            print(f"### accuracy: {name} ({acc['bf16']['tokens']} tokens)\n")
            print("| variant | perplexity | top-1 accuracy | top-1 = bf16 | top-1 = fp32 | "
                  "logits rel. err vs fp32 | layer outputs rel. err vs fp32 |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for v, a in acc.items():
                layers = ", ".join(f"{e:.2e}" for e in a["layer_rel_err_vs_fp32"])
                print(f"| {v} | {a['perplexity']:.3f} | {a['top1_accuracy']:.2%} | "
                      f"{a['top1_agree_bf16']:.2%} | {a['top1_agree_fp32']:.2%} | "
                      f"{a['logits_rel_err_vs_fp32']:.2e} | {layers} |")
            b = acc["bf16"]
            for s in SCHEMES:
                ppl = 100 * (acc[s]["perplexity"] / b["perplexity"] - 1)
                top1 = 100 * (acc[s]["top1_accuracy"] - b["top1_accuracy"])
                print(f"\n{s}: perplexity {ppl:+.2f}% vs bf16, top-1 accuracy {top1:+.2f} "
                      "points", end="")
            print("\n")
    if "memory" in r:
        print("### memory\n\n| model | variant | checkpoint MB | added RSS MB (file + anon) "
              "| vs bf16 |")
        print("| --- | --- | --- | --- | --- |")
        for name, row in r["memory"].items():
            if name == "presets_full":
                continue
            for v, x in row.items():
                ratio = x["checkpoint_bytes"] / row["float"]["checkpoint_bytes"]
                print(f"| {name} | {'bf16' if v == 'float' else v} | "
                      f"{x['checkpoint_bytes'] / 1e6:.1f} | {x['added_rss'] / 1e6:.1f} "
                      f"({x['added_file'] / 1e6:.1f} + {x['added_anon'] / 1e6:.1f}) | "
                      f"{ratio:.2f} (RSS {x['added_rss'] / row['float']['added_rss']:.2f}) |")
        print("\n| full checkpoint | bf16 GB | W8A8 GB | ratio | W8A8_DYNAMIC GB | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, row in r["memory"]["presets_full"].items():
            print(f"| {name} | {row['bf16'] / 1e9:.2f} | {row['W8A8'] / 1e9:.2f} | "
                  f"{row['W8A8'] / row['bf16']:.3f} | {row['W8A8_DYNAMIC'] / 1e9:.2f} | "
                  f"{row['W8A8_DYNAMIC'] / row['bf16']:.3f} |")
        print()
    if "speed" in r:
        print("### decode (numba, median ms per token)\n")
        print("| model | variant | layer stack | whole step | stack vs bf16 |")
        print("| --- | --- | --- | --- | --- |")
        for name in ("default", "embedded-1b"):
            row = r["speed"][name]
            for v, x in row.items():
                print(f"| {name} | {v} | {x['stack_ms']:.2f} | {x['step_ms']:.2f} | "
                      f"{row['bf16']['stack_ms'] / x['stack_ms']:.2f}x |")
        print("\n| linear | n x k | T | bf16 ms | W8A8 ms | bf16/W8A8 | bf16 | W8A8 |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for x in r["speed"]["linears"]:     # T = 1: weight GB/s; T > 1: G(FL)OP/s
            unit, key = ("GB/s", "GBps") if x["T"] == 1 else ("GOP/s", "Gops")
            print(f"| {x['linear']} | {x['n']} x {x['k']} | {x['T']} | {x['bf16_ms']:.3f} | "
                  f"{x['w8a8_ms']:.3f} | {x['bf16_ms'] / x['w8a8_ms']:.2f}x | "
                  f"{x['bf16_' + key]:.1f} {unit} | {x['w8a8_' + key]:.1f} {unit} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="accuracy,memory,speed")
    p.add_argument("--real-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", help="directory for the checkpoints (default: a temporary one)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    work = args.work or tempfile.mkdtemp(prefix="measure-quant-")
    try:
        models = models_of(work, args.real_layers)
        r = {"machine": machine(), "command": " ".join(["python tools/measure_quant.py"]
                                                       + (argv or sys.argv[1:]))}
        if "accuracy" in only:
            r["accuracy"] = {}
            for name, dirs in models.items():
                vocab = load_model(dirs["float"], lazy=True).config.vocab_size
                r["accuracy"][name] = accuracy(dirs, heldout_sequences("evaluation", vocab))
        if "memory" in only:
            r["memory"] = memory(models)
        if "speed" in only:
            r["speed"] = speed(models, args.steps, args.rounds)
        report(r)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(r, fh, indent=1)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
