"""Choosing the next token from a row of logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> int:
    """The next token id from logits [V].

    temperature == 0: greedy, argmax with ties to the lowest id. Otherwise, in float64:
    z = logits / temperature; keep the top_k largest (0 = all; ties broken by lower id);
    p = softmax(z over kept); keep the smallest prefix of tokens in descending p (stable,
    lower id first on ties) whose cumulative probability reaches top_p (at least one);
    renormalise and draw with u = rng.random() by inverse CDF over that order. The same
    seed gives the same tokens.
    """
    if not np.isfinite(temperature) or temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise InputError(f"sampling: need a finite temperature >= 0, 0 < top_p <= 1, top_k >= 0 "
                         f"(got {temperature}, {top_p}, {top_k})")
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature == 0.0:
        return int(np.argmax(z))
    if rng is None:
        raise InputError("sampling with temperature > 0 needs a seeded rng")
    order = np.argsort(-z, kind="stable")                # descending, lower id first on ties
    if top_k:
        order = order[:top_k]
    zk = z[order] / temperature
    p = np.exp(zk - zk[0])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    cdf = np.cumsum(p)
    idx = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(order[min(idx, len(order) - 1)])
