"""The benchmark behind `python -m refimpl bench` (installed as `refimpl.bench`, outside the
spec package): operators at the real shapes, the Embedded-1B model end to end and the Pro-MoE
MoE layer, NumPy spec vs Numba kernels vs PyTorch CPU, side by side in one run. Workers run as
`python -m refimpl.bench worker ...`; the code is in `refimpl.bench.suite`.
"""

from .suite import add_arguments, run

__all__ = ["add_arguments", "run"]
