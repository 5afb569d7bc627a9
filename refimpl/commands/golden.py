"""`python -m refimpl golden`: write golden cases (per operator, or per layer of a model)."""

from __future__ import annotations

import argparse
import os
import shlex

from ..io.checkpoint import is_checkpoint_dir, model_config
from ..config import CONVENTION_PROFILES, PRESET_NAMES, preset
from ..errors import InputError
from ..golden import DEFAULT_BLOCK_SIZE, OPERATORS, iter_model_cases, model_command, \
    model_name_of, operator_cases, parse_ops
from ..golden.format import EXPORTS, write_case
from ..numerics import MODES
from .run import add_conventions_argument, apply_conventions


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "golden", help="write golden cases for kernel developers",
        description="Write golden cases (a directory each: manifest.json + "
                    "tensors.safetensors; format in golden/README.md). With --preset: one case "
                    "per operator at the preset's real shapes, seeded inputs. With --model: "
                    "one case per layer of a forward (every intermediate) plus a model case "
                    "(token ids -> logits). Every output also gets NAME.ref64, the float64 "
                    "result from the same rounded inputs. The same command writes "
                    "bit-identical files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=PRESET_NAMES, metavar="NAME",
                     help=f"operator cases at this preset's shapes ({', '.join(PRESET_NAMES)})")
    src.add_argument("--model", metavar="DIR|PRESET",
                     help="layer and model cases from a checkpoint directory or a preset's "
                          "seeded random weights")
    p.add_argument("--ops", metavar="LIST",
                   help=f"with --preset: comma-separated operators ({','.join(OPERATORS)}); "
                        "default: all the preset's architecture has")
    p.add_argument("--numerics", choices=MODES, default="bf16",
                   help="storage dtype of inputs, weights and outputs")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the inputs (--preset) and of a preset's random weights")
    p.add_argument("--tokens", type=int, default=16, metavar="T",
                   help="with --preset: tokens per case (attention: T queries, prefill when "
                        "--context is T; decode 1 query)")
    p.add_argument("--context", type=int, metavar="S",
                   help="with --preset: positions the attention cases' queries see, up to "
                        "the preset's max_position_embeddings (attention: the T queries are "
                        "the last T of S, decode 1 query at S - 1; attention_varlen: the "
                        "longest sequences; paged_attention: the longest context); default T")
    p.add_argument("--rope-angles", choices=("exact", "float32"),
                   help="with --preset: RoPE angle mode (default: the config's)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="N",
                   help="tokens per block of the paged KV cache (--preset: paged_attention, "
                        "reshape_and_cache; --model: --step)")
    p.add_argument("--ep-size", type=int, default=None, metavar="N",
                   help="with --preset: expert-parallel ranks of the moe_ep cases (a divisor "
                        "of the experts; default one expert group per rank)")
    add_conventions_argument(p)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="with --preset: change a config field (JSON value), e.g. "
                        "--set moe_intermediate_size=128 for a real-width router with small "
                        "experts; repeatable; recorded in the manifest")
    ids = p.add_mutually_exclusive_group()
    ids.add_argument("--token-ids", metavar="IDS", help="with --model: token ids, e.g. 1,2,3")
    ids.add_argument("--prompt", metavar="TEXT", help="with --model: text (needs a tokenizer)")
    ids.add_argument("--step", metavar="SPEC",
                     help="with --model: one case of a batched Model.step over a paged cache "
                          "(--block-size) instead of layer cases: 'PREFIX/NEW;PREFIX/NEW;...' "
                          "per sequence, its cached prefix and this step's new token ids, "
                          "e.g. '1,5,7,9/11;/2,3,4' (a decode and a prompt)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="with --prompt: tokenizer.model (or a directory holding one) instead "
                        "of the model's")
    p.add_argument("--layers", metavar="LIST",
                   help="with --model: layers to write, e.g. 0,5 (default: all)")
    p.add_argument("--no-weights", action="store_true",
                   help="with --model: leave the layer weights out of the layer cases")
    p.add_argument("--export", metavar="KINDS", default="",
                   help="also write NAME.npy and/or NAME.bin (headerless little-endian) per "
                        "tensor: npy, bin or npy,bin")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory to write the case directories in (created with its parents; a "
                        "case of the same name is replaced)")
    p.set_defaults(func=main)


def parse_overrides(items) -> dict:
    """--set FIELD=VALUE ... -> {field: value}; the value is JSON (a bare word is a string).
    Checked as config.json fields are, by the config itself."""
    import dataclasses
    import json

    from ..config import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"family"}
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"--set {item!r}: expected FIELD=VALUE, e.g. num_experts=64")
        if name not in fields:
            raise InputError(f"--set {name}: not a config field (fields: "
                             f"{', '.join(sorted(fields))})")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _parse_list(text: str, what: str) -> list:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        values = []
    if not values:
        raise InputError(f"{what} {text!r}: expected comma-separated integers, e.g. 0,5")
    return values


def _export(text: str) -> tuple:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    for kind in kinds:
        if kind not in EXPORTS:
            raise InputError(f"--export {text!r}: choose from {', '.join(EXPORTS)}")
    return tuple(k for k in EXPORTS if k in kinds)


def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}: exists and is not a directory")


def _model_mode(args, export) -> list:
    if args.ops is not None or args.rope_angles is not None:
        raise InputError("--ops and --rope-angles go with --preset, not --model")
    if args.token_ids is None and args.prompt is None and args.step is None:
        raise InputError("--model needs --token-ids 1,2,3, --prompt TEXT or --step SPEC")
    layers = _parse_list(args.layers, "--layers") if args.layers is not None else None
    if is_checkpoint_dir(args.model):
        from ..io.streaming import load_streamed

        # one layer at a time, pages released after each, only routed experts read, NaN
        # checked at first use: a checkpoint larger than memory works (docs/streaming.md)
        model = load_streamed(args.model, numerics=args.numerics)
        source = {"kind": "checkpoint", "path": args.model}
        seed = None
    else:
        from ..random_init import init_model

        config = model_config(args.model)  # refuses a name that is neither
        model = init_model(config, seed=args.seed, numerics=args.numerics)
        source = {"kind": "preset", "preset": args.model, "seed": args.seed,
                  "weights": f"refimpl.init_model('{args.model}', seed={args.seed})"}
        seed = args.seed
    apply_conventions(model, args)
    if args.conventions:
        source["conventions"] = args.conventions
    if args.step is not None:
        from ..golden.cases import parse_step, step_case

        entries = parse_step(args.step)
        for prefix, new in entries:
            model.check_token_ids(prefix + new)
        command = (f"python -m refimpl golden --model {shlex.quote(args.model)} --step "
                   f"{shlex.quote(args.step)} --block-size {args.block_size}"
                   + (f" --layers {','.join(map(str, layers))}" if layers is not None else "")
                   + f" --numerics {args.numerics}"
                   + (f" --seed {seed}" if seed is not None else "")
                   + (f" --conventions {args.conventions}" if args.conventions else "")
                   + " --out DIR")
        return [step_case(model, entries, args.block_size, layers,
                          model_name=model_name_of(args.model), source=source,
                          command=command, seed=0 if seed is None else seed)]
    if args.token_ids is not None:
        from .run import parse_token_ids

        ids = parse_token_ids(args.token_ids)
    else:
        ids = _encode_prompt(args, model)
        source["prompt"] = args.prompt
        if args.tokenizer is not None:
            source["tokenizer"] = args.tokenizer
    command = model_command(args.model, ids, args.prompt, layers, args.numerics, seed,
                            not args.no_weights, export, args.tokenizer)
    if args.conventions:
        command = command.replace(" --out DIR", f" --conventions {args.conventions} --out DIR")
    return iter_model_cases(model, ids, layers, model_name=model_name_of(args.model),
                            source=source, command=command, seed=seed,
                            include_weights=not args.no_weights)


def _encode_prompt(args, model) -> list:
    """Token ids of --prompt with the model's tokenizer (bos added as the tokenizer says)."""
    from .run import open_tokenizer

    model_dir = args.model if is_checkpoint_dir(args.model) else None
    tokenizer = open_tokenizer(args, model_dir, model.config)
    if tokenizer is None:
        raise InputError(f"--prompt needs a tokenizer and {args.model} has none (no "
                         "tokenizer.model); pass --token-ids 1,2,3 or --tokenizer PATH")
    return list(tokenizer.encode(args.prompt))


def main(args) -> int:
    export = _export(args.export)
    _check_out(args.out)
    if args.preset is not None:
        for name in ("token_ids", "prompt", "layers", "tokenizer"):
            if getattr(args, name) is not None:
                raise InputError(f"--{name.replace('_', '-')} goes with --model, not --preset")
        if args.no_weights:
            raise InputError("--no-weights goes with --model, not --preset")
        overrides = parse_overrides(args.set)
        if args.conventions:
            overrides = {**CONVENTION_PROFILES[args.conventions], **overrides}
        config = preset(args.preset, **overrides)
        ops = parse_ops(args.ops, config, args.preset)
        cases = operator_cases(args.preset, ops, args.numerics, seed=args.seed,
                               tokens=args.tokens, rope_angles=args.rope_angles, export=export,
                               overrides=overrides, block_size=args.block_size,
                               ep_size=args.ep_size,
                               context=args.context)
    else:
        if args.set:
            raise InputError("--set goes with --preset, not --model")
        if args.context is not None:
            raise InputError("--context goes with --preset, not --model (the model case's "
                             "context is its tokens)")
        if args.ep_size is not None:
            raise InputError("--ep-size goes with --preset (the moe_ep cases), not --model")
        cases = _model_mode(args, export)
    for case in cases:  # --model: made one at a time, each written before the next
        path = write_case(args.out, case, export)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        print(f"wrote {path} ({len(case.tensors)} tensors, {size / 1024:.1f} KiB)")
        release_mapped(case)
        del case
    return 0


def release_mapped(case) -> None:
    """Drop the page-cache mappings of a written case's memory-mapped tensors (the weights of
    a streamed checkpoint), so the file-backed resident set does not grow case by case."""
    from ..io.streaming import release

    for t in case.tensors:
        release(t.array)  # 0 bytes for an array that is not memory-mapped
