"""`python -m refimpl compare GOLDEN CANDIDATE`: judge a kernel's outputs against goldens."""

from __future__ import annotations

import argparse
import json
import math

from ..golden.compare import EXIT_CODES, ROUTING_MODES, Options, compare_paths, format_report
from ..errors import InputError
from ..golden.format import CRITERIA


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="compare a candidate's outputs with golden cases",
        description="Compare CANDIDATE with GOLDEN. GOLDEN is a case directory or a directory "
                    "of cases; CANDIDATE has the same layout (case directories with "
                    "tensors.safetensors) or, per case, NAME.npy / NAME.bin files named after "
                    "the outputs (.bin: headerless little-endian, the golden's dtype and "
                    "shape; bfloat16 as raw uint16). Reports per output max abs/rel error, "
                    "mismatches, cosine similarity, max ULP distance and the worst element, "
                    "and a verdict by each output's criterion from the manifest or "
                    "--criterion. Exit status: 0 pass, 1 fail, 2 unusable input.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("golden", metavar="GOLDEN")
    p.add_argument("candidate", metavar="CANDIDATE")
    p.add_argument("--criterion", choices=CRITERIA,
                   help="judge every float output by this rule instead of the manifest's "
                        "(integer outputs are always compared exactly)")
    p.add_argument("--rtol", type=float, help="relative tolerance (allclose; "
                                              "double-thousandth's relative threshold)")
    p.add_argument("--atol", type=float, help="absolute tolerance (allclose, k-error floor; "
                                              "double-thousandth's absolute threshold)")
    p.add_argument("--k", type=float, help="k of the k-error criterion (manifest default 2)")
    p.add_argument("--cast", action="store_true",
                   help="round a float candidate of another dtype to the golden's dtype "
                        "instead of refusing it")
    p.add_argument("--routing", choices=ROUTING_MODES, default="tie-tolerant",
                   help="expert ids: 'exact' requires every choice equal to the golden's; "
                        "'tie-tolerant' lets a choice differ where the golden's margin is a "
                        "near-tie (below what the storage dtype resolves), and leaves the "
                        "rows and experts it changes out of the other outputs' verdicts")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.set_defaults(func=main)


def _json_safe(obj):
    """NaN and infinities as strings, so the report is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def main(args) -> int:
    for name in ("rtol", "atol", "k"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"--{name} must be a finite number >= 0, got {value}")
    opts = Options(criterion=args.criterion, rtol=args.rtol, atol=args.atol, k=args.k,
                   cast=args.cast, routing=args.routing)
    report = compare_paths(args.golden, args.candidate, opts)
    if args.json:
        print(json.dumps(_json_safe(report), indent=1))
    else:
        print(format_report(report))
    return EXIT_CODES[report["verdict"]]
