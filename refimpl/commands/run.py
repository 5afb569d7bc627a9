"""`python -m refimpl run`: generate text (or token ids) from a checkpoint or preset."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from ..backend import BACKENDS
from ..io.checkpoint import (DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR, TOKENIZER_NAME,
                             is_checkpoint_dir, load_model, model_config, tokenizer_file,
                             tokenizer_pieces)
from ..config import CONVENTION_PROFILES, PRESET_NAMES
from ..errors import InputError
from ..generate import generate
from ..numerics import MODES
from ..quant.format import read_description
from ..speculative import (VERIFY_MODES, ModelDrafter, NgramDrafter, SpeculativeStats,
                           speculative_generate)
from ..thinking import THINK_SUFFIXES, ThinkingSplitter, apply_think_mode

DEFAULT_PROMPT = "The json module"
DEFAULT_CHAT_PROMPT = "Briefly, what is a language model?"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="generate text from a checkpoint or preset",
        description="Prefill a prompt and generate, streaming the text as it comes (or the "
                    "token ids when the model has no tokenizer.model). The last line, on "
                    "stderr, gives prompt tokens, new tokens, prefill time and decode "
                    "tokens/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, metavar="DIR|PRESET",
                   help="checkpoint directory, or a preset name for seeded random weights "
                        f"({', '.join(PRESET_NAMES)})")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT",
                     help=f"prompt text (needs a tokenizer; default {DEFAULT_PROMPT!r}, or "
                          "[bos] when the model has no tokenizer)")
    src.add_argument("--token-ids", metavar="IDS", help="prompt as token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user turn of the chat template and generate "
                        "the assistant's reply")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 is greedy; > 0 samples")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 keeps all tokens")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--numerics", choices=MODES + ("w8a8",), default=None,
                   help="storage dtype of weights and activations; w8a8: a W8A8 checkpoint "
                        "over bf16 activations (the default for one; else fp32)")
    p.add_argument("--backend", choices=BACKENDS, default="numpy")
    add_conventions_argument(p)
    p.add_argument("--layers", type=int, metavar="N",
                   help="use only the first N layers (a preset keeps its width)")
    p.add_argument("--lazy", action="store_true",
                   help="convert each weight to the numerics dtype when used, not up front")
    p.add_argument("--stream", action="store_true",
                   help="for a checkpoint larger than memory: memory-mapped, one layer at a "
                        "time, each layer's pages released after use, only routed experts "
                        "read, each tensor checked for NaN/Inf when first used (use the "
                        "checkpoint's dtype as --numerics; see docs/streaming.md)")
    p.add_argument("--progress", action="store_true",
                   help="with --stream: a line per layer on stderr even when it is not a "
                        "terminal (on a terminal the progress bar is always drawn)")
    p.add_argument("--init-seed", type=int, default=0,
                   help="seed of the random weights when --model is a preset")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.model (or a directory holding one) instead of the model's")
    p.add_argument("--print-ids", action="store_true",
                   help="print the generated token ids even when there is a tokenizer")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights that hold NaN or Inf")
    spec = p.add_argument_group("speculative decoding (docs/speculative.md)")
    spec.add_argument("--draft", metavar="DIR|PRESET|ngram|default-draft",
                      help="draft with a smaller model sharing the target's tokenizer (a "
                           "checkpoint directory, a preset, or default-draft: the draft model "
                           "shipped for the embedded default), or with ngram (prompt lookup, "
                           "no model)")
    spec.add_argument("--speculate", type=int, metavar="K",
                      help="draft tokens per target forward (default 4 with --draft)")
    spec.add_argument("--verify", choices=VERIFY_MODES, default="batched",
                      help="batched: one target forward over the drafts (as served); "
                           "stepwise: one forward per token (the numbers of plain decoding)")
    spec.add_argument("--ngram", type=parse_ngram, default=(1, 4), metavar="MIN,MAX",
                      help="n-gram lengths the prompt-lookup drafter matches")
    spec.add_argument("--compare-plain", action="store_true",
                      help="also run plain decoding in the same run and print both tokens/s")
    think = p.add_argument_group("thinking modes (openPangu chat models)")
    think.add_argument("--think", choices=tuple(THINK_SUFFIXES),
                       help="with --chat: slow (think first; no suffix), fast (' /no_think'), "
                            "auto (' /auto_think') on the user message")
    think.add_argument("--hide-thinking", action="store_true",
                       help="leave out the reasoning between [unused16] and [unused17] (a "
                            "count of what was hidden goes to stderr)")
    p.set_defaults(func=main)


def parse_ngram(text: str) -> tuple:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, e.g. 1,4, got {text!r}") from None
    return lo, hi


def parse_token_ids(text: str) -> list:
    """'1,2,3' -> [1, 2, 3] (InputError otherwise)."""
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        ids = None
    if not ids:
        raise InputError(f"--token-ids {text!r}: expected comma-separated integers, e.g. 1,2,3")
    return ids


def _check_options(args) -> None:
    if args.numerics is None:
        quantised = is_checkpoint_dir(args.model) and read_description(args.model) is not None
        args.numerics = "w8a8" if quantised else "fp32"
    if args.numerics == "w8a8" and not is_checkpoint_dir(args.model):
        raise InputError(f"--numerics w8a8 runs a W8A8 checkpoint directory, and {args.model} "
                         "is a preset (write one with: python -m refimpl quantize --model "
                         f"{args.model} --scheme w8a8 --out QDIR)")
    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise InputError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise InputError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        raise InputError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.layers is not None and args.layers < 1:
        raise InputError(f"--layers must be at least 1, got {args.layers}")
    if args.chat and args.token_ids is not None:
        raise InputError("--chat wraps a text prompt; it cannot be used with --token-ids")
    if args.progress and not args.stream:
        raise InputError("--progress goes with --stream")
    if args.stream and not is_checkpoint_dir(args.model):
        raise InputError(f"--stream reads a checkpoint directory, and {args.model} is not one "
                         "(write one with: python -m refimpl init --preset NAME --out DIR)")
    if args.speculate is not None and args.draft is None:
        raise InputError("--speculate K needs a drafter: --draft DIR|PRESET|ngram|default-draft")
    if args.draft is not None:
        args.speculate = 4 if args.speculate is None else args.speculate
        if args.speculate < 1:
            raise InputError(f"--speculate must be at least 1, got {args.speculate}")
    elif args.compare_plain:
        raise InputError("--compare-plain compares speculative decoding with plain decoding; "
                         "it needs --draft")
    if args.think is not None and not args.chat:
        raise InputError("--think sets the chat model's thinking mode; it needs --chat")


def add_conventions_argument(p) -> None:
    p.add_argument("--conventions", choices=tuple(CONVENTION_PROFILES), default=None,
                   help="numerics conventions profile (default: the config's "
                        "refimpl_conventions, else hf): hf = Hugging Face eager; vllm-ascend = "
                        "router softmax in the activation dtype, routing weight before "
                        "down_proj, fused add+RMSNorm")


def apply_conventions(model, args):
    """--conventions PROFILE on a built model (weights do not depend on it)."""
    if getattr(args, "conventions", None):
        model.config = model.config.with_conventions(args.conventions)
    return model


def open_model(args):
    """(model, directory or None) for --model DIR|PRESET (with --conventions applied)."""
    model, where = _open_model(args)
    return apply_conventions(model, args), where


def _open_model(args):
    if args.stream:
        from ..io.streaming import load_streamed

        model = load_streamed(args.model, numerics=args.numerics, backend=args.backend,
                              layers=args.layers, allow_nonfinite=args.allow_nonfinite,
                              progress=True if args.progress else None)
        return model, args.model
    if is_checkpoint_dir(args.model):
        model = load_model(args.model, numerics=args.numerics, backend=args.backend,
                           lazy=args.lazy, allow_nonfinite=args.allow_nonfinite,
                           layers=args.layers)
        return model, args.model
    from ..random_init import init_model

    config = model_config(args.model, args.layers)  # refuses an unknown name
    model = init_model(config, seed=args.init_seed, numerics=args.numerics,
                       backend=args.backend)
    return model, None


def open_tokenizer(args, model_dir, config):
    """The Tokenizer to use, or None: --tokenizer, else the model directory's
    tokenizer.model; for a preset, the default model's tokenizer when its ids fit."""
    if args.tokenizer is not None:
        folder = os.path.dirname(os.path.abspath(tokenizer_file(args.tokenizer)))
    elif model_dir is not None:
        if not os.path.isfile(os.path.join(model_dir, TOKENIZER_NAME)):
            return None
        folder = model_dir
    else:
        default = os.path.join(DEFAULT_MODEL_DIR, TOKENIZER_NAME)
        if not os.path.isfile(default) or tokenizer_pieces(default) > config.vocab_size:
            return None
        folder = DEFAULT_MODEL_DIR
    from ..tokenizer import Tokenizer

    return Tokenizer.from_dir(folder)


def prompt_ids(args, tokenizer, config) -> tuple[list, bool]:
    """(prompt token ids, whether to echo the prompt before the generated text)."""
    if args.token_ids is not None:
        return parse_token_ids(args.token_ids), False
    if tokenizer is None:
        if args.prompt is not None or args.chat:
            where = "preset" if not is_checkpoint_dir(args.model) else "checkpoint"
            raise InputError(f"--prompt/--chat need a tokenizer, and the {where} {args.model} "
                             f"has no {TOKENIZER_NAME}; pass --token-ids 1,2,3 or --tokenizer "
                             "PATH")
        return [config.bos_token_id], False
    if args.chat:
        text = DEFAULT_CHAT_PROMPT if args.prompt is None else args.prompt
        messages = [{"role": "user", "content": text}]
        if args.think is not None:
            messages = apply_think_mode(messages, args.think)
        return list(tokenizer.encode_chat(messages)), False
    text = DEFAULT_PROMPT if args.prompt is None else args.prompt
    return list(tokenizer.encode(text)), True


def _text(stream, tokenizer, token: int) -> str:
    """The text one generated id adds; ids past the tokenizer's pieces (a model vocabulary
    padded beyond the tokenizer) are shown as <id N>."""
    if token >= tokenizer.vocab_size:
        return stream.flush() + f"<id {token}>"
    return stream.feed(token)


def open_drafter(args, target, target_dir):
    """The drafter of --draft, or None."""
    if args.draft is None:
        return None
    if args.draft == "ngram":
        lo, hi = args.ngram
        return NgramDrafter(lo, hi)
    where = DEFAULT_DRAFT_DIR if args.draft == "default-draft" else args.draft
    if not is_checkpoint_dir(where) and where not in PRESET_NAMES:
        raise InputError(f"--draft {args.draft!r} is neither ngram, default-draft, a checkpoint "
                         f"directory nor a preset ({', '.join(PRESET_NAMES)})")
    if is_checkpoint_dir(where):
        quantised = read_description(where) is not None
        numerics = "w8a8" if quantised else ("bf16" if args.numerics == "w8a8" else args.numerics)
        draft = load_model(where, numerics=numerics, backend=args.backend,
                           allow_nonfinite=args.allow_nonfinite)
        _check_same_tokenizer(where, target_dir, args)
    else:
        from ..random_init import init_model

        config = model_config(where)                      # refuses an unknown name
        draft = init_model(config, seed=args.init_seed, numerics="bf16" if args.numerics ==
                           "w8a8" else args.numerics, backend=args.backend)
    return ModelDrafter(draft, args.temperature, args.top_k, args.top_p,
                        vocab_size=target.config.vocab_size)


def _check_same_tokenizer(draft_dir, target_dir, args) -> None:
    """A draft model must share the target's tokenizer (the same token ids)."""
    def tok(d):
        f = os.path.join(d, TOKENIZER_NAME) if d else None
        return f if f and os.path.isfile(f) else None
    a = tok(draft_dir)
    b = (tokenizer_file(args.tokenizer) if args.tokenizer else tok(target_dir)
         or (os.path.join(DEFAULT_MODEL_DIR, TOKENIZER_NAME) if target_dir is None else None))
    if a and b:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            if fa.read() != fb.read():
                raise InputError(f"--draft {args.draft}: its tokenizer.model differs from the "
                                 "target's; a draft model must share the target's tokenizer")


class _Printer:
    """Generated text to stdout, the reasoning span dimmed (a terminal) or under headers,
    or hidden (--hide-thinking)."""

    def __init__(self, out, hide: bool):
        self.out, self.hide = out, hide
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.splitter = ThinkingSplitter()
        self.state = "answer"
        self.hidden = 0

    def write(self, text: str) -> None:
        self._segments(self.splitter.feed(text))

    def close(self) -> None:
        self._segments(self.splitter.flush())
        if self.state == "thinking" and not self.hide:
            self.out.write("\x1b[22m" if self.tty else "\n")

    def _segments(self, segments) -> None:
        for kind, text in segments:
            if kind != self.state:
                if not self.hide:
                    if kind == "thinking":
                        self.out.write("\x1b[2m" if self.tty else "[thinking]\n")
                    else:
                        self.out.write("\x1b[22m" if self.tty else "\n[answer]\n")
                self.state = kind
            if kind == "thinking" and self.hide:
                self.hidden += len(text)
            else:
                self.out.write(text)
        self.out.flush()


def main(args) -> int:
    _check_options(args)
    model, model_dir = open_model(args)
    config = model.config
    tokenizer = open_tokenizer(args, model_dir, config)
    ids, echo = prompt_ids(args, tokenizer, config)
    model.check_token_ids(ids)
    eos = {tokenizer.eos_id} if tokenizer is not None else set(config.eos_token_ids)
    as_text = tokenizer is not None and not args.print_ids
    out = sys.stdout
    stream = tokenizer.stream_decoder() if as_text else None
    if echo and as_text:  # the prompt through the same decoder, so the continuation joins it
        skip = 1 if ids and ids[0] == tokenizer.bos_id else 0
        out.write("".join(stream.feed(token) for token in ids[skip:]))
        out.flush()

    # the k-th new token comes from the logits at position len(ids) + k - 2
    room = config.max_position_embeddings - len(ids) + 1
    wanted = min(args.max_new_tokens, room)
    drafter = open_drafter(args, model, model_dir)
    stats = SpeculativeStats()
    new = []
    printer = _Printer(out, args.hide_thinking) if as_text else None
    start = time.perf_counter()
    first = last = None
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, eos_id=eos)
    if drafter is None:
        tokens = generate(model, ids, max_new_tokens=wanted, **sampling)
    else:
        tokens = speculative_generate(model, drafter, ids, args.speculate, wanted,
                                      stats=stats, verify=args.verify, **sampling)
    for token in tokens:
        last = time.perf_counter()
        first = first or last
        new.append(int(token))
        if as_text:
            if token not in eos:
                printer.write(_text(stream, tokenizer, int(token)))
        else:
            out.write(("" if len(new) == 1 else " ") + str(int(token)))
        out.flush()
        if len(new) == wanted or token in eos:
            break  # do not resume the generator: it would run one more forward
    end = time.perf_counter()
    if as_text:
        printer.write(stream.flush())
        printer.close()
    out.write("\n")
    out.flush()
    if printer is not None and printer.hidden:
        print(f"[thinking hidden: {printer.hidden} characters]", file=sys.stderr)

    prefill = (first or end) - start
    decode = f"{(len(new) - 1) / (last - first):.2f} tokens/s" if len(new) > 1 else "n/a"
    if drafter is not None:
        print(f"[speculative: {drafter.name} drafter, K {args.speculate}, {args.verify} "
              f"verification | acceptance {stats.acceptance_rate:.1%} ({stats.accepted}/"
              f"{stats.drafted} drafts), {stats.accepted_per_forward:.2f} accepted per target "
              f"forward | {stats.tokens_per_forward:.2f} tokens per target "
              f"forward ({stats.target_forwards} forwards) | {(len(new)) / (end - start):.2f} "
              "tokens/s overall]", file=sys.stderr)
        if args.compare_plain:
            t0 = time.perf_counter()
            plain = []
            for token in generate(model, ids, max_new_tokens=wanted, **sampling):
                plain.append(int(token))
                if len(plain) == wanted or token in eos:
                    break
            t1 = time.perf_counter()
            same = ("same tokens" if plain == new else "different tokens (sampled: same "
                    "distribution)" if args.temperature > 0 else "different tokens")
            print(f"[plain decoding: {len(plain) / (t1 - t0):.2f} tokens/s overall | "
                  f"speculative {len(new) / (end - start) / (len(plain) / (t1 - t0)):.2f}x | "
                  f"{same}]", file=sys.stderr)
    stop = " (stopped at eos)" if new and new[-1] in eos else ""
    if not stop and wanted < args.max_new_tokens:
        stop = (f" (stopped: all {config.max_position_embeddings} positions "
                f"(max_position_embeddings) used; {args.max_new_tokens} were asked for)")
    print(f"[prompt tokens {len(ids)} | new tokens {len(new)}{stop} | prefill {prefill:.3f} s | "
          f"decode {decode} | {args.numerics}, {args.backend}]", file=sys.stderr)
    if args.stream:
        from ..io.streaming import memory_line

        print(f"[streamed: {memory_line()}]", file=sys.stderr)
    return 0
