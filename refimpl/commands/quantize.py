"""`python -m refimpl quantize`: write an msModelSlim-format W8A8 checkpoint of a float model."""

from __future__ import annotations

import argparse
import os
import sys

from ..config import PRESET_NAMES
from ..errors import InputError
from ..io.checkpoint import (DEFAULT_MODEL_DIR, TOKENIZER_NAME, is_checkpoint_dir,
                             load_weights, model_config, tokenizer_pieces)
from ..quant.format import DESCRIPTION_NAME, read_description
from ..quant.quantize import (CALIBRATION_TEXT, calibration_sequences, progress_bar,
                              quantize_checkpoint)

SCHEME_NAMES = {"w8a8": "W8A8", "w8a8_dynamic": "W8A8_DYNAMIC"}
KV_CACHE_NAMES = {"c8": "C8"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="write a W8A8 (msModelSlim-format) checkpoint of a float model",
        description="Quantise a float checkpoint (or a preset's seeded random weights) to "
                    "the msModelSlim W8A8 format vllm-ascend serves: int8 weights with "
                    "per-channel scales, static per-tensor activation scales calibrated on "
                    "--calib (w8a8) or per-token scales at run time (w8a8_dynamic), and "
                    f"{DESCRIPTION_NAME}. Deterministic; the directory appears complete or "
                    "not at all. See docs/quantization.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, metavar="DIR|PRESET",
                   help="float checkpoint directory, or a preset name for seeded random "
                        f"weights ({', '.join(PRESET_NAMES)})")
    p.add_argument("--scheme", required=True, choices=tuple(SCHEME_NAMES))
    p.add_argument("--out", required=True, metavar="QDIR",
                   help="directory to create (must not exist, or be empty)")
    p.add_argument("--calib", metavar="FILE",
                   help="calibration set: text (one sequence per line) or comma-separated "
                        "token ids (one sequence per line); default: the default model's "
                        "held-out calibration text (refimpl/data/heldout/calibration.txt)")
    p.add_argument("--kv-cache", choices=tuple(KV_CACHE_NAMES),
                   help="also write C8 key/value cache scales (int8 KV cache)")
    p.add_argument("--layers", type=int, metavar="N", help="quantise only the first N layers")
    p.add_argument("--init-seed", type=int, default=0,
                   help="seed of the random weights when --model is a preset")
    p.add_argument("--backend", choices=("numpy", "numba"), default="numpy",
                   help="backend of the calibration forwards")
    p.set_defaults(func=main)


def _source(args):
    """(config, stored float weights, tokenizer dir or None) of --model."""
    if is_checkpoint_dir(args.model):
        if read_description(args.model) is not None:
            raise InputError(f"{args.model} is already quantised ({DESCRIPTION_NAME}); "
                             "quantize reads a float checkpoint")
        config, weights = load_weights(args.model, layers=args.layers)
        tok = args.model if os.path.isfile(os.path.join(args.model, TOKENIZER_NAME)) else None
        return config, weights, tok
    from ..numerics import storage_dtype
    from ..random_init import random_tensor
    from ..config import weight_shapes

    config = model_config(args.model, args.layers)       # refuses an unknown name
    shapes = weight_shapes(config)
    dt = storage_dtype("bf16")
    weights = {name: random_tensor(config, name, shape, args.init_seed, dt)
               for name, shape in shapes.items()}
    default_tok = os.path.join(DEFAULT_MODEL_DIR, TOKENIZER_NAME)
    fits = os.path.isfile(default_tok) and tokenizer_pieces(default_tok) <= config.vocab_size
    return config, weights, DEFAULT_MODEL_DIR if fits else None


def main(args) -> int:
    if args.layers is not None and args.layers < 1:
        raise InputError(f"--layers must be at least 1, got {args.layers}")
    scheme = SCHEME_NAMES[args.scheme]
    kv = KV_CACHE_NAMES.get(args.kv_cache) if args.kv_cache else None
    config, weights, tok_dir = _source(args)
    sequences = None
    if scheme == "W8A8" or kv is not None:
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(tok_dir) if tok_dir is not None else None
        calib = args.calib or CALIBRATION_TEXT
        if args.calib is None and tokenizer is None:
            raise InputError(f"--model {args.model} has no tokenizer for the default "
                             "calibration text; pass --calib FILE of token ids "
                             "(comma-separated, one sequence per line)")
        sequences = calibration_sequences(calib, tokenizer, config.vocab_size)
    s = quantize_checkpoint(config, weights, args.out, scheme, sequences, kv_cache=kv,
                            tokenizer=tok_dir, progress=progress_bar, backend=args.backend)
    files = s["files"]
    shards = files[0] if len(files) == 1 else f"{len(files)} shards + index"
    calib = (f", calibrated on {len(sequences)} sequences "
             f"({sum(map(len, sequences))} tokens)" if sequences else "")
    print(f"wrote {s['path']}: {scheme}{' + ' + kv if kv else ''}, {s['tensors']} tensors, "
          f"{s['file_bytes'] / 1e6:.1f} MB ({shards}, {DESCRIPTION_NAME}){calib}",
          file=sys.stdout)
    return 0
