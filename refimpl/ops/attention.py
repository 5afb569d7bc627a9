"""Scaled dot-product attention with grouped-query (GQA) heads and a causal mask, computed a
block of queries at a time so that long contexts run in bounded memory."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..numerics import accum_dtype, round_to, to_accum
from .basic import softmax

#: bytes of one head's scores [rows, S] (accumulation dtype) that `attention` holds at once;
#: at the embedded-1b shape and S = 32768 that is 256 float32 query rows per block
ATTENTION_BLOCK_BYTES = 32 * 2**20
#: query blocks start at multiples of this many rows (and a block is never shorter)
ATTENTION_BLOCK_ALIGN = 8


def causal_mask(num_queries: int, num_keys: int, rows: slice | None = None) -> np.ndarray:
    """allowed[t, j] = key j is visible to query t, where the T queries are the last T of the
    S positions: query t sits at position S - T + t and sees keys j <= S - T + t.

    # -> [T, S] bool (or the queries in `rows` only: [len(rows), S])
    """
    offset = num_keys - num_queries
    t = np.arange(num_queries)[rows if rows is not None else slice(None)]
    return np.arange(num_keys)[None, :] <= (t[:, None] + offset)


def attention_query_blocks(num_queries: int, num_keys: int, itemsize: int,
                           block_rows: int | None = None) -> list[tuple[int, int]]:
    """The query blocks (start, stop) `attention` works in.

    Rows per block: `block_rows`, or as many as keep one head's scores [rows, S] within
    ATTENTION_BLOCK_BYTES; rounded down to a multiple of ATTENTION_BLOCK_ALIGN (at least that).
    Blocks start at multiples of it; a tail shorter than ATTENTION_BLOCK_ALIGN joins the block
    before it, so no product has fewer rows than that unless T itself is smaller.
    """
    align = ATTENTION_BLOCK_ALIGN
    if block_rows is None:
        block_rows = ATTENTION_BLOCK_BYTES // max(1, num_keys * itemsize)
    rows = max(align, int(block_rows) // align * align)
    if num_queries <= rows:
        return [(0, num_queries)]
    starts = list(range(0, num_queries, rows))
    if num_queries - starts[-1] < align:
        starts.pop()
    return list(zip(starts, starts[1:] + [num_queries]))


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = True,
              scale: float | None = None, block_rows: int | None = None) -> np.ndarray:
    """o = softmax(q k^T * scale + mask) v per head, scale = head_dim ** -0.5.

    # q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, D] -> [T, Hq, D]
    GQA: query head h reads KV head h // (Hq / Hkv). The T queries are the last T of the S
    positions (prefill: T = S; decode against a cache: T = 1). Cast points as Hugging Face
    eager: s = round(q k^T); s = round(s * scale); p = round(softmax_float32(s));
    o = round(p v).

    Computed per head and per block of queries (`attention_query_blocks`): a block holds its
    scores against all S keys (masked ones included, so every product has the shape of the
    unblocked one but for its row count), never [Hq, T, S] at once. Every output element is
    the same formula whatever the blocking; it is the same bits when the BLAS computes each
    row of a product independently of how many rows the product has (true of OpenBLAS's
    generic x86-64 kernels that the committed suite is made with, for blocks of even rows;
    its AVX2 kernels can move a float32 sum's last bit with the row count, as they do with
    the thread count).
    """
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    if Hq % Hkv:
        raise InputError(f"attention: {Hkv} KV heads do not divide {Hq} query heads")
    if causal and T > S:
        raise InputError(f"attention: {T} queries but only {S} keys; causal rows would be empty")
    scale = D ** -0.5 if scale is None else scale
    dt, acc = q.dtype, accum_dtype(q.dtype)
    group = Hq // Hkv
    qa, ka, va = to_accum(q), to_accum(k), to_accum(v)  # [T, Hq, D], [S, Hkv, D] x 2
    out = np.empty((T, Hq, D), dt)
    for start, stop in attention_query_blocks(T, S, acc.itemsize, block_rows):
        rows = slice(start, stop)
        allowed = causal_mask(T, S, rows) if causal else None       # [rows, S]
        for h in range(Hq):
            kh, vh = ka[:, h // group, :], va[:, h // group, :]     # [S, D] each
            scores = round_to(qa[rows, h, :] @ kh.T, dt)            # [rows, D] x [D, S]
            scores = round_to(scores * scores.dtype.type(scale), dt)
            if causal:
                scores = np.where(allowed, scores, -np.inf)
            probs = round_to(softmax(scores, axis=-1), dt)          # [rows, S]
            out[rows, h, :] = round_to(probs @ vh, dt)              # [rows, S] x [S, D]
    return out
