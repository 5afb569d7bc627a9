"""`python -m refimpl serve-sim`: replay a small trace of requests through `Model.step`."""

from __future__ import annotations

import argparse

from ..backend import BACKENDS
from ..errors import InputError
from ..generate import generate
from ..io.checkpoint import DEFAULT_MODEL_DIR
from ..numerics import MODES
from ..scheduler import Request, simulate
from .run import open_model, open_tokenizer, parse_token_ids

#: the default trace: (arrival step, prompt)
DEFAULT_TRACE = ((0, "The json module"), (0, "def fibonacci(n):"), (2, "import numpy as np"),
                 (5, "The quick brown fox"))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve-sim", help="replay a trace of requests through the batched paged-cache step",
        description="Requests arrive at given steps; each step packs the decode tokens of "
                    "running sequences and prefill chunks of new ones (within --token-budget) "
                    "into one Model.step over a paged KV cache; finished sequences free their "
                    "blocks. Prints each step and each request's text, and with --check "
                    "whether every request's tokens equal generating it alone (exit 1 if not).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, metavar="DIR|PRESET")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a request's prompt (repeatable; default: four built-in prompts)")
    p.add_argument("--token-ids", action="append", metavar="IDS",
                   help="a request's prompt as token ids (repeatable; for models without "
                        "a tokenizer)")
    p.add_argument("--arrive", metavar="STEPS",
                   help="arrival step of each request, comma-separated (default: 0, 0, 2, 5, "
                        "... or all 0)")
    p.add_argument("--max-new-tokens", type=int, default=12, metavar="N")
    p.add_argument("--token-budget", type=int, default=8, metavar="N",
                   help="tokens per step (decodes first, then prompt chunks)")
    p.add_argument("--block-size", type=int, default=16, metavar="N")
    p.add_argument("--num-blocks", type=int, default=64, metavar="N")
    p.add_argument("--numerics", choices=MODES, default="fp32")
    p.add_argument("--backend", choices=BACKENDS, default="numpy")
    p.add_argument("--check", action="store_true",
                   help="also generate each request alone and compare the tokens")
    p.set_defaults(func=main, stream=False, lazy=False, layers=None, init_seed=0,
                   allow_nonfinite=False, tokenizer=None)


def main(args) -> int:
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, model_dir = open_model(args)
    tok = open_tokenizer(args, model_dir, model.config)
    if args.prompt and args.token_ids:
        raise InputError("give requests as --prompt or as --token-ids, not both")
    if args.token_ids:
        prompts = [parse_token_ids(t) for t in args.token_ids]
        arrivals = [0] * len(prompts)
    else:
        if tok is None:
            raise InputError(f"{args.model} has no tokenizer: give requests as --token-ids")
        texts = args.prompt or [t for _, t in DEFAULT_TRACE]
        arrivals = [a for a, _ in DEFAULT_TRACE] if not args.prompt else [0] * len(texts)
        prompts = [list(tok.encode(t)) for t in texts]
    if args.arrive is not None:
        arrivals = parse_token_ids(args.arrive)
        if len(arrivals) != len(prompts) or min(arrivals) < 0:
            raise InputError(f"--arrive needs {len(prompts)} non-negative steps, got "
                             f"{args.arrive!r}")
    for ids in prompts:
        model.check_token_ids(ids)
    if not 1 <= args.block_size or not 1 <= args.num_blocks:
        raise InputError("--block-size and --num-blocks must be >= 1")
    eos = {tok.eos_id} if tok is not None else set(model.config.eos_token_ids)
    requests = [Request(f"r{i}", ids, a, args.max_new_tokens)
                for i, (ids, a) in enumerate(zip(prompts, arrivals))]
    cache = model.new_paged_cache(args.num_blocks, args.block_size)
    for rec in simulate(model, requests, cache, token_budget=args.token_budget, eos_ids=eos):
        parts = [f"{rid} {kind} {n}" if kind == "prefill" else f"{rid} decode"
                 for rid, kind, n in rec.entries]
        done = f"; finished {', '.join(rec.finished)}" if rec.finished else ""
        print(f"step {rec.index:3d}: {' | '.join(parts) or '(idle)'}  [blocks {rec.blocks_used} "
              f"used, {rec.blocks_free} free{done}]")
    differ = 0
    for r in requests:
        text = (tok.decode([t for t in r.generated if t not in eos]) if tok is not None
                else " ".join(map(str, r.generated)))
        line = f"{r.rid} (arrived at step {r.arrival}, {len(r.prompt)} prompt tokens): {text!r}"
        if args.check:
            alone = [int(t) for t in generate(model, r.prompt, max_new_tokens=r.max_new_tokens,
                                              eos_id=eos)]
            same = alone == r.generated
            differ += not same
            line += "  [same as alone]" if same else f"  [DIFFERS from alone: {alone}]"
        print(line)
    return 1 if differ else 0
