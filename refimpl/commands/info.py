"""`python -m refimpl info`: config, parameter counts and memory of a checkpoint or preset."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from ..io.checkpoint import DEFAULT_MODEL_DIR, checkpoint_files, is_checkpoint_dir, load_weights, \
    model_config
from ..config import PRESET_NAMES, parameter_count
from ..errors import InputError
from .run import add_conventions_argument
from ..numerics import MODES, storage_dtype
from ..quant.format import quantised_linears, read_description

KV_TOKENS = 1000


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="show the config, parameter counts and memory of a model",
        description="Print the config of a checkpoint directory or preset, its parameter "
                    "counts (total, and active per token for MoGE), and the memory of its "
                    "weights and of its KV cache per 1000 tokens in every numerics mode. A "
                    "checkpoint's tensors are checked against its config (headers only; no "
                    "weights are read).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, metavar="DIR|PRESET",
                   help=f"checkpoint directory or preset ({', '.join(PRESET_NAMES)})")
    p.add_argument("--layers", type=int, metavar="N", help="only the first N layers")
    add_conventions_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=main)


def model_info(spec: str, layers: int | None = None, conventions: str | None = None) -> dict:
    """The facts `info` prints, as a dict."""
    if layers is not None and layers < 1:
        raise InputError(f"--layers must be at least 1, got {layers}")
    stored = quant = None
    if is_checkpoint_dir(spec):
        config, weights = load_weights(spec, layers=layers)
        desc = read_description(spec)
        dtypes: dict = {}
        for w in weights.values():
            dtypes[w.dtype.name] = dtypes.get(w.dtype.name, 0) + int(w.size)
        files = list(checkpoint_files(spec))
        stored = {"files": [os.path.basename(f) for f in files],
                  "file_bytes": sum(os.path.getsize(f) for f in files),
                  "parameters_by_dtype": dtypes,
                  "tokenizer": os.path.isfile(os.path.join(spec, "tokenizer.model"))}
        source = f"checkpoint {os.path.abspath(spec)}"
        if desc is not None:
            linears = quantised_linears(desc, weights)
            quant = {"scheme": desc["model_quant_type"], "quantised_linears": len(linears),
                     "kv_cache_type": desc.get("kv_cache_type"),
                     "weights_bytes": sum(int(w.size) * w.dtype.itemsize
                                          for w in weights.values())}
    else:
        config = model_config(spec, layers)
        source = f"preset {spec} (seeded random weights)"
    if conventions is not None:
        config = config.with_conventions(conventions)
    total = parameter_count(config)
    active = parameter_count(config, active=True) if config.is_moge else total
    per_token_kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    memory = {mode: {"weights_bytes": total * storage_dtype(mode).itemsize,
                     "kv_cache_bytes_per_1000_tokens":
                         per_token_kv * KV_TOKENS * storage_dtype(mode).itemsize}
              for mode in MODES}
    if quant is not None:       # as stored: int8 linears, bf16 activations, an int8 C8 cache
        memory["w8a8"] = {"weights_bytes": quant["weights_bytes"],
                          "kv_cache_bytes_per_1000_tokens": per_token_kv * KV_TOKENS *
                          (1 if quant["kv_cache_type"] else 2)}
    return {"quantization": quant, "source": source, "config": config.to_hf_dict(), "family": config.family,
            "parameters": total, "active_parameters_per_token": active, "memory": memory,
            "stored": stored}


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _count(n: int) -> str:
    return f"{n:,}" + (f" ({n / 1e9:.2f} B)" if n >= 1e8 else f" ({n / 1e6:.2f} M)")


def main(args) -> int:
    info = model_info(args.model, args.layers, args.conventions)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model: {info['source']}")
    print("config:")
    width = max(len(k) for k in info["config"])
    for key, value in info["config"].items():
        print(f"  {key:<{width}}  {json.dumps(value)}")
    print(f"parameters: {_count(info['parameters'])}")
    if info["family"] == "moge":
        print(f"active parameters per token: {_count(info['active_parameters_per_token'])} "
              "(routed experts counted once per selected expert)")
    stored = info["stored"]
    if stored:
        kinds = ", ".join(f"{np.dtype(k).name if k != 'bfloat16' else k}: {_count(v)}"
                          for k, v in stored["parameters_by_dtype"].items())
        print(f"stored: {len(stored['files'])} file(s), {_size(stored['file_bytes'])} "
              f"[{kinds}]; tokenizer.model {'present' if stored['tokenizer'] else 'absent'}")
    quant = info["quantization"]
    if quant:
        print(f"quantised: {quant['scheme']} (msModelSlim), {quant['quantised_linears']} int8 "
              f"linears, KV cache {quant['kv_cache_type'] or 'float'}; runs as --numerics w8a8"
              " (the float modes below count every weight in that mode's dtype)")
    print(f"memory by numerics mode (weights; KV cache per {KV_TOKENS} tokens):")
    for mode, m in info["memory"].items():
        print(f"  {mode:<5} weights {_size(m['weights_bytes']):>11}   "
              f"KV cache {_size(m['kv_cache_bytes_per_1000_tokens']):>11}")
    return 0
