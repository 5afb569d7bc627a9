"""Choosing the next token from a row of logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def _check_sampling(temperature, top_k, top_p) -> None:
    if not np.isfinite(temperature) or temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise InputError(f"sampling: need a finite temperature >= 0, 0 < top_p <= 1, top_k >= 0 "
                         f"(got {temperature}, {top_p}, {top_k})")


def _kept_order_probs(z: np.ndarray, temperature: float, top_k: int, top_p: float):
    """(ids kept, in descending order; their probabilities, float64) of `sample`'s rule."""
    order = np.argsort(-z, kind="stable")                # descending, lower id first on ties
    if top_k:
        order = order[:top_k]
    zk = z[order] / temperature
    p = np.exp(zk - zk[0])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return order, p


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> int:
    """The next token id from logits [V].

    temperature == 0: greedy, argmax with ties to the lowest id. Otherwise, in float64:
    z = logits / temperature; keep the top_k largest (0 = all; ties broken by lower id);
    p = softmax(z over kept); keep the smallest prefix of tokens in descending p (stable,
    lower id first on ties) whose cumulative probability reaches top_p (at least one);
    renormalise and draw with u = rng.random() by inverse CDF over that order. The same
    seed gives the same tokens. `sampling_probs` is the distribution it draws from.
    """
    _check_sampling(temperature, top_k, top_p)
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature == 0.0:
        return int(np.argmax(z))
    if rng is None:
        raise InputError("sampling with temperature > 0 needs a seeded rng")
    order, p = _kept_order_probs(z, temperature, top_k, top_p)
    cdf = np.cumsum(p)
    idx = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(order[min(idx, len(order) - 1)])


def sampling_probs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
                   dtype=np.float64) -> np.ndarray:
    """The distribution `sample` draws from, over the whole vocabulary: temperature, then
    top-k, then top-p as `sample` applies them (computed in float64), zeros for the tokens
    they drop, cast to `dtype`. temperature 0 gives the one-hot of the argmax. What the
    speculative decoder hands the rejection sampler as p (target) and q (draft); the
    serving stack's equivalent is vLLM's compute_probs (softmax of apply_top_k_top_p(logits
    / T), float32), which differs from this only in how top-k / top-p treat exact ties.
    # logits [V] or [N, V] -> [V] or [N, V]"""
    _check_sampling(temperature, top_k, top_p)
    z = np.asarray(logits, dtype=np.float64)
    rows = z.reshape(-1, z.shape[-1])
    out = np.zeros(rows.shape, np.float64)
    for r, row in enumerate(rows):
        if temperature == 0.0:
            out[r, int(np.argmax(row))] = 1.0
        else:
            order, p = _kept_order_probs(row, temperature, top_k, top_p)
            out[r, order] = p
    return out.reshape(z.shape).astype(dtype)
