"""`python -m refimpl init`: write a seeded random checkpoint of a preset."""

from __future__ import annotations

import argparse

from ..io.checkpoint import DEFAULT_MAX_SHARD_BYTES, DEFAULT_MODEL_DIR, init_checkpoint
from ..config import PRESET_NAMES
from ..errors import InputError

DTYPES = ("bf16", "fp16", "fp32")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "init", help="write a seeded random checkpoint of a preset",
        description="Write config.json and safetensors weights (seeded random, the same values "
                    "as refimpl.init_model) of a preset into a new directory, one tensor at a "
                    "time, so presets larger than memory can be written. The directory "
                    "appears complete or not at all.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", required=True, choices=PRESET_NAMES, help="model preset")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="checkpoint directory to create (must not exist, or be empty)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="stored dtype")
    p.add_argument("--layers", type=int, metavar="N",
                   help="keep the real width with only N layers (default: the preset's)")
    p.add_argument("--tokenizer", nargs="?", const=DEFAULT_MODEL_DIR, metavar="PATH",
                   help="copy a tokenizer.model (a file, or a directory holding one) into DIR; "
                        "with no PATH, the default model's tokenizer")
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES, metavar="B",
                   help="split the weights into shards of at most B bytes")
    p.set_defaults(func=main)


def main(args) -> int:
    if args.layers is not None and args.layers < 1:
        raise InputError(f"--layers must be at least 1, got {args.layers}")
    if args.max_shard_bytes < 1:
        raise InputError(f"--max-shard-bytes must be positive, got {args.max_shard_bytes}")
    s = init_checkpoint(args.preset, args.out, seed=args.seed, dtype=args.dtype,
                        layers=args.layers, tokenizer=args.tokenizer,
                        max_shard_bytes=args.max_shard_bytes)
    files = s["files"]
    shards = files[0] if len(files) == 1 else f"{len(files)} shards + index"
    extra = f", {', '.join(s['tokenizer'])}" if s["tokenizer"] else ""
    print(f"wrote {s['path']}: {s['tensors']} tensors in {s['dtype']}, "
          f"{s['file_bytes'] / 1e6:.1f} MB ({shards}{extra})")
    return 0
