"""`python -m refimpl bench [--quick] [--only compile|ops|e2e|moe] [--repeat N]`: spec vs
Numba kernels vs PyTorch CPU, operators at the real shapes, the Embedded-1B model end to end
and the Pro-MoE MoE layer (the logic lives in `refimpl.bench`)."""

from __future__ import annotations

from ..errors import InputError


def add_parser(subparsers):
    from ..bench import add_arguments

    p = subparsers.add_parser(
        "bench", help="benchmark the numpy spec, the numba kernels and PyTorch CPU",
        description=__doc__)
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    from ..bench import run

    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        raise InputError(f"--repeat must be at least 1, got {args.repeat}")
    run(args)
    return 0
