"""Operators at the boundaries serving stacks use (DEPLOYMENT.md section 2): packed
variable-length attention, the paged KV cache (write with a slot mapping, decode through block
tables), fused add + RMSNorm, RoPE from a `cos_sin_cache`, and the fused projection layouts.

Each is defined by the plain operators of `refimpl.ops` applied per sequence or per row, so
its numbers are exactly those of the unfused model (same cast points, bit for bit); what the
function adds is the layout and the index convention, checked as kernels receive them.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..numerics import round_to, to_accum
from .attention import attention
from .basic import linear
from .mlp import silu_and_mul
from .norm import rms_norm


def _lengths(name: str, lens, total: int | None = None) -> np.ndarray:
    """A 1-D vector of non-negative integer lengths as int64; InputError otherwise (and when
    `total` is given and they do not sum to it)."""
    a = np.asarray(lens)
    if a.ndim != 1 or a.dtype.kind not in "iu" or (a.size and a.min() < 0):
        raise InputError(f"{name} must be a 1-D vector of non-negative integers, got "
                         f"{list(a.shape)} of {a.dtype}")
    a = a.astype(np.int64)
    if total is not None and int(a.sum()) != total:
        raise InputError(f"{name} sum to {int(a.sum())} but the packed tensor has {total} rows")
    return a


def check_varlen(q, k, v, q_lens, kv_lens, causal: bool = True):
    """The inputs of a packed attention, checked as a kernel receives them: q [sum q_lens, Hq,
    D], k and v of one shape [sum kv_lens, Hkv, D], as many q_lens as kv_lens, and (causal)
    q_lens[b] <= kv_lens[b]. Returns (q_lens, kv_lens) int64; InputError otherwise."""
    if q.ndim != 3 or k.ndim != 3:
        raise InputError(f"q and k must be [tokens, heads, D], got {list(q.shape)} and "
                         f"{list(k.shape)}")
    ql = _lengths("q_lens", q_lens, q.shape[0])
    kl = _lengths("kv_lens", kv_lens, k.shape[0])
    if kl.size != ql.size:
        raise InputError(f"q_lens has {ql.size} sequences but kv_lens has {kl.size}")
    if k.shape != v.shape:
        raise InputError(f"k {list(k.shape)} and v {list(v.shape)} differ")
    if causal and (ql > kl).any():
        b = int(np.argmax(ql > kl))
        raise InputError(f"sequence {b}: {int(ql[b])} queries but {int(kl[b])} keys")
    return ql, kl


def attention_varlen(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_lens, kv_lens,
                     causal: bool = True, scale: float | None = None) -> np.ndarray:
    """Attention over a batch of sequences packed along the token axis.

    # q [sum q_lens, Hq, D], k/v [sum kv_lens, Hkv, D], q_lens/kv_lens [B] -> [sum q_lens, Hq, D]
    Sequence b owns rows q_start[b] .. q_start[b] + q_lens[b] - 1 of q (q_start the exclusive
    cumulative sum, cu_seqlens without its last entry) and kv_lens[b] rows of k and v; its
    queries are the last q_lens[b] of its kv_lens[b] positions (q_lens == kv_lens: batched
    prefill; q_lens < kv_lens: chunked prefill or a prefix cache). No attention across
    sequences. Each sequence is `refimpl.ops.attention`, so the cast points are its own.
    """
    ql, kl = check_varlen(q, k, v, q_lens, kv_lens, causal)
    out = np.empty(q.shape, q.dtype)
    qs, ks = np.concatenate([[0], np.cumsum(ql)]), np.concatenate([[0], np.cumsum(kl)])
    for b in range(ql.size):
        if ql[b]:
            out[qs[b]:qs[b + 1]] = attention(q[qs[b]:qs[b + 1]], k[ks[b]:ks[b + 1]],
                                             v[ks[b]:ks[b + 1]], causal=causal, scale=scale)
    return out


def _check_cache(key_cache, value_cache):
    if key_cache.ndim != 4 or key_cache.shape != value_cache.shape:
        raise InputError(f"key_cache and value_cache must both be [num_blocks, block_size, "
                         f"Hkv, D], got {list(key_cache.shape)} and {list(value_cache.shape)}")
    if np.shares_memory(key_cache, value_cache):
        raise InputError("key_cache and value_cache share memory (one buffer for both: a "
                         "cache shape missing its leading 2?)")


def reshape_and_cache(key: np.ndarray, value: np.ndarray, key_cache: np.ndarray,
                      value_cache: np.ndarray, slot_mapping, inplace: bool = False):
    """Write new keys and values into a paged cache; return the new caches (the inputs are
    not modified, unless inplace=True: then they are written and returned, as the kernel
    does and as `refimpl.cache.PagedKVCache` uses it).

    # key/value [T, Hkv, D], caches [num_blocks, block_size, Hkv, D], slot_mapping [T] ->
    # (key_cache, value_cache) [num_blocks, block_size, Hkv, D]
    Token t goes to block slot // block_size, offset slot % block_size, with
    slot = slot_mapping[t] = block_id * block_size + offset. A negative slot means "not
    cached" (vLLM's padding, -1): the token is skipped. Two tokens with the same slot are
    refused (which one wins would depend on the kernel).
    """
    _check_cache(key_cache, value_cache)
    NB, BS, Hkv, D = key_cache.shape
    if key.shape != value.shape or key.shape[1:] != (Hkv, D):
        raise InputError(f"key/value must be [T, {Hkv}, {D}] for this cache, got "
                         f"{list(key.shape)} and {list(value.shape)}")
    slots = np.asarray(slot_mapping)
    if slots.shape != (key.shape[0],) or slots.dtype.kind not in "iu":
        raise InputError(f"slot_mapping must be {key.shape[0]} integers, got "
                         f"{list(slots.shape)} of {slots.dtype}")
    slots = slots.astype(np.int64)
    keep = slots >= 0
    if (slots[keep] >= NB * BS).any():
        bad = int(slots[keep][slots[keep] >= NB * BS][0])
        raise InputError(f"slot_mapping: slot {bad} is outside the cache's {NB} x {BS} slots")
    used = slots[keep]
    if np.unique(used).size != used.size:
        raise InputError("slot_mapping: two tokens write the same slot")
    k_out, v_out = (key_cache, value_cache) if inplace else (key_cache.copy(), value_cache.copy())
    k_out.reshape(NB * BS, Hkv, D)[used] = key[keep].astype(key_cache.dtype)
    v_out.reshape(NB * BS, Hkv, D)[used] = value[keep].astype(value_cache.dtype)
    return k_out, v_out


def allocate_blocks(lengths, block_size: int, order):
    """Block tables and slot mappings for sequences of the given lengths, their blocks taken
    from `order` (block ids) in turn, as a cache allocator hands them out.

    # lengths [B] -> block_tables int32 [B, max_blocks] (-1 past a sequence's blocks),
    # slots: per sequence int64 [length], slot = block_tables[b, p // bs] * bs + p % bs
    """
    lens = _lengths("lengths", lengths)
    need = -(-lens // block_size)
    order = np.asarray(order)
    if int(need.sum()) > order.size:
        raise InputError(f"{int(need.sum())} blocks needed, {order.size} given")
    tables = np.full((lens.size, max(1, int(need.max(initial=0)))), -1, np.int32)
    slots, pos = [], 0
    for b, n in enumerate(lens):
        tables[b, :need[b]] = order[pos:pos + need[b]]
        pos += int(need[b])
        p = np.arange(int(n))
        slots.append(tables[b, p // block_size].astype(np.int64) * block_size + p % block_size)
    return tables, slots


def gather_paged(cache: np.ndarray, block_table, length: int) -> np.ndarray:
    """The first `length` positions of one sequence, read through its block table.

    # cache [num_blocks, block_size, Hkv, D], block_table [max_blocks] -> [length, Hkv, D]
    Position p is cache[block_table[p // block_size], p % block_size].
    """
    NB, BS = cache.shape[:2]
    table = np.asarray(block_table).astype(np.int64)
    need = -(-length // BS)
    if need > table.size:
        raise InputError(f"context of {length} positions needs {need} blocks of {BS}, the "
                         f"block table has {table.size}")
    blocks = table[:need]
    if need and (blocks.min() < 0 or blocks.max() >= NB):
        bad = int(blocks[(blocks < 0) | (blocks >= NB)][0])
        raise InputError(f"block table entry {bad} is outside the cache's {NB} blocks")
    return cache[blocks].reshape(need * BS, *cache.shape[2:])[:length]


def check_paged(query, key_cache, value_cache, block_tables, context_lens):
    """The inputs of a paged decode, checked as a kernel receives them: caches of one shape
    in separate buffers, query [B, Hq, D] with Hkv dividing Hq, integer block tables [B, *]
    whose first ceil(context_lens[b] / block_size) entries name blocks of the cache, context
    lengths >= 1. Returns (block_tables int64, context_lens int64); InputError otherwise."""
    _check_cache(key_cache, value_cache)
    NB, BS, Hkv, D = key_cache.shape
    if query.ndim != 3 or query.shape[2] != D or query.shape[1] % Hkv:
        raise InputError(f"query must be [B, heads, {D}] with {Hkv} KV heads dividing the "
                         f"heads, got {list(query.shape)}")
    B = query.shape[0]
    tables = np.asarray(block_tables)
    if tables.ndim != 2 or tables.shape[0] != B or tables.dtype.kind not in "iu":
        raise InputError(f"block_tables must be integers [{B}, max_blocks], got "
                         f"{list(tables.shape)} of {tables.dtype}")
    lens = _lengths("context_lens", context_lens)
    if lens.size != B:
        raise InputError(f"context_lens has {lens.size} entries for {B} queries")
    if (lens < 1).any():
        raise InputError("context_lens: every sequence needs at least one cached position "
                         "(its own)")
    tables = tables.astype(np.int64)
    need = -(-lens // BS)                                              # blocks per sequence
    if (need > tables.shape[1]).any():
        b = int(np.argmax(need > tables.shape[1]))
        raise InputError(f"context of {int(lens[b])} positions needs {int(need[b])} blocks of "
                         f"{BS}, the block table has {tables.shape[1]}")
    used = np.arange(tables.shape[1])[None, :] < need[:, None]         # [B, max_blocks]
    bad = used & ((tables < 0) | (tables >= NB))
    if bad.any():
        raise InputError(f"block table entry {int(tables[bad][0])} is outside the cache's {NB} "
                         "blocks")
    return tables, lens


def paged_attention(query: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray,
                    block_tables, context_lens, scale: float | None = None) -> np.ndarray:
    """Decode for a batch: one query per sequence against its cached positions.

    # query [B, Hq, D], caches [num_blocks, block_size, Hkv, D], block_tables int [B, max_blocks],
    # context_lens int [B] -> [B, Hq, D]
    Query b sits at position context_lens[b] - 1 and sees positions 0 .. context_lens[b] - 1,
    read through block_tables[b] (`gather_paged`); blocks need not be contiguous or
    increasing, and table entries past the context are never read. The result of each
    sequence is `refimpl.ops.attention` of its query over those keys, bit for bit.
    """
    tables, lens = check_paged(query, key_cache, value_cache, block_tables, context_lens)
    B = query.shape[0]
    out = np.empty(query.shape, query.dtype)
    for b in range(B):
        k = gather_paged(key_cache, tables[b], int(lens[b]))
        v = gather_paged(value_cache, tables[b], int(lens[b]))
        out[b:b + 1] = attention(query[b:b + 1], k, v, causal=True, scale=scale)
    return out


def add_rms_norm(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float):
    """Fused residual add and RMSNorm, as serving kernels return it.

    # x, residual [..., H], weight [H] -> y [..., H], x_sum [..., H], rstd [..., 1] float32
    x_sum = round(x + residual) in the storage dtype; y = rms_norm(x_sum, weight, eps) (the
    spec's cast points); rstd = 1 / sqrt(mean(x_sum^2) + eps) in the accumulation dtype
    (float32 for half inputs), the statistic the fused kernels also return.
    """
    if x.shape != residual.shape:
        raise InputError(f"x {list(x.shape)} and residual {list(residual.shape)} differ")
    x_sum = round_to(to_accum(x) + to_accum(residual), x.dtype).astype(x.dtype)
    xa = to_accum(x_sum)
    rstd = 1.0 / np.sqrt(np.mean(xa * xa, axis=-1, keepdims=True) + eps)
    return rms_norm(x_sum, weight, eps), x_sum, rstd.astype(xa.dtype)


def cos_sin_cache(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The serving layout of RoPE tables: cat(cos[:, :D/2], sin[:, :D/2]).

    # cos, sin [max_pos, D] (rotate-half tables, both halves equal) -> [max_pos, D]
    """
    d2 = cos.shape[-1] // 2
    return np.concatenate([cos[..., :d2], sin[..., :d2]], axis=-1)


def rope_cache(positions, cos_sin: np.ndarray):
    """cos and sin [T, D] (rotate-half layout, for `apply_rope`) of arbitrary position ids,
    gathered from a `cos_sin_cache` [max_pos, D] in its own dtype (float32 or the storage
    dtype). # positions [T] -> cos [T, D], sin [T, D]"""
    pos = np.asarray(positions)
    if pos.ndim != 1 or pos.dtype.kind not in "iu":
        raise InputError(f"positions must be a 1-D integer vector, got {list(pos.shape)} of "
                         f"{pos.dtype}")
    if pos.size and (pos.min() < 0 or pos.max() >= cos_sin.shape[0]):
        bad = int(pos[(pos < 0) | (pos >= cos_sin.shape[0])][0])
        raise InputError(f"position {bad} is outside the cos_sin_cache [0, {cos_sin.shape[0]})")
    d2 = cos_sin.shape[-1] // 2
    rows = cos_sin[pos]                                   # [T, D]
    cos, sin = rows[:, :d2], rows[:, d2:]
    return np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)


def qkv_proj(x: np.ndarray, w_qkv: np.ndarray, b_qkv: np.ndarray | None, q_size: int,
             kv_size: int):
    """The fused q/k/v projection layout: one weight of [q; k; v] rows (and bias), split.

    # x [T, H], w_qkv [q_size + 2 kv_size, H], b_qkv [q_size + 2 kv_size] -> q [T, q_size],
    # k [T, kv_size], v [T, kv_size]
    The layout changes no number: each part is `linear` over its own rows of w_qkv, so q, k
    and v equal the separate projections bit for bit (BLAS picks its kernel, and with it the
    last bits of a float32 sum, by the matrix shape: one product over all rows could differ
    from the separate ones by an ulp; a fused kernel is judged by k-error, not bits).
    """
    if w_qkv.shape[0] != q_size + 2 * kv_size:
        raise InputError(f"w_qkv has {w_qkv.shape[0]} rows, expected q {q_size} + 2 x kv "
                         f"{kv_size}")
    parts = (slice(0, q_size), slice(q_size, q_size + kv_size),
             slice(q_size + kv_size, q_size + 2 * kv_size))
    return tuple(linear(x, w_qkv[p], None if b_qkv is None else b_qkv[p]) for p in parts)


def swiglu_w13(x: np.ndarray, w13: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """SwiGLU with the fused gate/up weight w13 = cat(gate, up) [2I, H]:
    g = x w13[:I]^T; u = x w13[I:]^T; y = down(round(round(silu(g)) * u)), the cast points of
    `swiglu`, each half its own `linear` (so equal to `swiglu` bit for bit, see `qkv_proj`).
    # x [T, H], w13 [2I, H], w_down [H, I] -> [T, H]"""
    if w13.shape[0] % 2:
        raise InputError(f"w13 has {w13.shape[0]} rows; cat(gate, up) has an even number")
    inter = w13.shape[0] // 2
    g, u = linear(x, w13[:inter]), linear(x, w13[inter:])        # [T, I] each
    return linear(silu_and_mul(g, u), w_down)


__all__ = ["check_varlen", "attention_varlen", "reshape_and_cache", "allocate_blocks", "gather_paged",
           "check_paged",
           "paged_attention",
           "add_rms_norm", "cos_sin_cache", "rope_cache", "qkv_proj", "swiglu_w13"]
