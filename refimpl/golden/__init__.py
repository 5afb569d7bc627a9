"""Goldens for kernel developers: making cases, their file format, and judging candidates.

    refimpl.golden.cases     operator cases at a preset's shapes, layer and model cases of a
                             forward, float64 references with the routing forced
    refimpl.golden.format    the case directory: manifest.json + tensors.safetensors (+ npy/bin)
    refimpl.golden.compare   metrics, criteria and the verdict of `python -m refimpl compare`

The case builders are re-exported here: `from refimpl.golden import operator_cases`.
"""

from .cases import (ATTENTION_SCORE_OFFSET, DEFAULT_BLOCK_SIZE, MOGE_OPERATORS, OPERATORS,
                    PAGED_OPERATORS, ROUTER_LOGIT_ULPS,
                    ROUTER_PROB_ULPS, available_operators, iter_model_cases, model_cases,
                    model_command, model_name_of, operator_cases, parse_ops, reference_model,
                    single_threaded_blas)

__all__ = ["ATTENTION_SCORE_OFFSET", "DEFAULT_BLOCK_SIZE", "MOGE_OPERATORS", "OPERATORS",
           "PAGED_OPERATORS", "ROUTER_LOGIT_ULPS",
           "ROUTER_PROB_ULPS", "available_operators", "iter_model_cases", "model_cases",
           "model_command", "model_name_of", "operator_cases", "parse_ops", "reference_model",
           "single_threaded_blas"]
