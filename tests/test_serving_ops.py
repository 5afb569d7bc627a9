"""The serving-boundary operators (refimpl.ops.serving) against the plain operators.

Packed variable-length attention, the paged KV cache (reshape_and_cache writes through a slot
mapping, paged_attention reads through block tables), fused add + RMSNorm, RoPE from a
cos_sin_cache and the fused qkv / w13 layouts must give exactly the numbers of the unfused
model: the same function per sequence, so bit for bit in every mode.
"""

from __future__ import annotations

import numpy as np
import pytest

from refimpl import ops
from refimpl.errors import InputError
from refimpl.numerics import storage_dtype

MODES = ("fp64", "fp32", "bf16", "fp16")


def randn(rng, shape, dt, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dt)


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


# ---------------------------------------------------------------------- attention_varlen
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunked", [False, True])
def test_attention_varlen_is_attention_per_sequence(mode, chunked):
    rng = np.random.default_rng(1)
    dt = storage_dtype(mode)
    kv_lens = np.array([1, 37, 8, 64, 3], np.int32)          # 1 and odd lengths included
    q_lens = np.array([1, 5, 8, 1, 2], np.int32) if chunked else kv_lens.copy()
    Hq, Hkv, D = 8, 2, 16
    q = randn(rng, (int(q_lens.sum()), Hq, D), dt)
    k, v = randn(rng, (int(kv_lens.sum()), Hkv, D), dt), randn(rng, (int(kv_lens.sum()), Hkv, D), dt)
    out = ops.attention_varlen(q, k, v, q_lens, kv_lens)
    qs, ks = np.cumsum(np.r_[0, q_lens]), np.cumsum(np.r_[0, kv_lens])
    for b in range(len(q_lens)):
        want = ops.attention(q[qs[b]:qs[b + 1]], k[ks[b]:ks[b + 1]], v[ks[b]:ks[b + 1]])
        np.testing.assert_array_equal(bits(out[qs[b]:qs[b + 1]]), bits(want))
    # no attention across sequences: another sequence's keys do not change sequence 1
    k2 = k.copy()
    k2[ks[2]:] = randn(rng, k2[ks[2]:].shape, dt)
    again = ops.attention_varlen(q, k2, v, q_lens, kv_lens)
    np.testing.assert_array_equal(bits(again[:qs[2]]), bits(out[:qs[2]]))


def test_attention_varlen_refuses_inconsistent_lengths():
    q = np.zeros((5, 2, 4), np.float32)
    k = np.zeros((6, 1, 4), np.float32)
    with pytest.raises(InputError, match="q_lens sum to 4"):
        ops.attention_varlen(q, k, k, [2, 2], [3, 3])
    with pytest.raises(InputError, match="sequence 0: 4 queries but 3 keys"):
        ops.attention_varlen(q, k, k, [4, 1], [3, 3])
    with pytest.raises(InputError, match="2 sequences but kv_lens has 1"):
        ops.attention_varlen(q, k, k, [4, 1], [6])


# ---------------------------------------------------------------------- the paged cache
def _paged_setup(rng, dt, context_lens, block_size, Hkv=2, D=16, spare=3):
    """Contiguous per-sequence keys/values, written into a paged cache whose blocks are
    handed out in shuffled order; every slot no sequence owns holds NaN."""
    num_blocks = sum(-(-int(n) // block_size) for n in context_lens) + spare
    tables, slots = ops.allocate_blocks(context_lens, block_size, rng.permutation(num_blocks))
    keys = [randn(rng, (int(n), Hkv, D), dt) for n in context_lens]
    values = [randn(rng, (int(n), Hkv, D), dt) for n in context_lens]
    cache = np.full((num_blocks, block_size, Hkv, D), np.nan, np.float32).astype(dt)
    kc, vc = ops.reshape_and_cache(np.concatenate(keys), np.concatenate(values), cache,
                                   cache.copy(), np.concatenate(slots).astype(np.int32))
    return keys, values, kc, vc, tables


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_size", [128, 16])
def test_paged_attention_equals_attention_on_contiguous_keys(mode, block_size):
    rng = np.random.default_rng(block_size)
    dt = storage_dtype(mode)
    context_lens = np.array([1, 127, 128, 129, 300], np.int32)
    keys, values, kc, vc, tables = _paged_setup(rng, dt, context_lens, block_size)
    query = randn(rng, (len(context_lens), 8, 16), dt)
    out = ops.paged_attention(query, kc, vc, tables, context_lens)
    assert np.isfinite(out.astype(np.float64)).all()           # no NaN slot was read
    for b in range(len(context_lens)):
        np.testing.assert_array_equal(ops.gather_paged(kc, tables[b], int(context_lens[b])),
                                      keys[b])
        want = ops.attention(query[b:b + 1], keys[b], values[b])
        np.testing.assert_array_equal(bits(out[b:b + 1]), bits(want))


def test_reshape_and_cache_writes_only_its_slots_and_returns_new_caches():
    rng = np.random.default_rng(0)
    cache = np.zeros((4, 8, 2, 4), np.float32)
    key, value = randn(rng, (5, 2, 4), np.float32), randn(rng, (5, 2, 4), np.float32)
    slots = np.array([31, 0, -1, 9, 16], np.int32)              # -1: padding, not cached
    kc, vc = ops.reshape_and_cache(key, value, cache, cache.copy(), slots)
    assert not cache.any()                                      # inputs untouched
    flat_k, flat_v = kc.reshape(32, 2, 4), vc.reshape(32, 2, 4)
    for t, s in enumerate(slots):
        if s >= 0:
            np.testing.assert_array_equal(flat_k[s], key[t])
            np.testing.assert_array_equal(flat_v[s], value[t])
    assert np.count_nonzero(np.abs(flat_k).sum(axis=(1, 2))) == 4


@pytest.mark.parametrize("slots, fragment", [
    ([0, 32], "slot 32 is outside the cache's 4 x 8 slots"),
    ([3, 3], "two tokens write the same slot"),
    ([0], "slot_mapping must be 2 integers"),
])
def test_reshape_and_cache_refuses_bad_slot_mappings(slots, fragment):
    cache = np.zeros((4, 8, 1, 2), np.float32)
    kv = np.ones((2, 1, 2), np.float32)
    with pytest.raises(InputError, match=fragment):
        ops.reshape_and_cache(kv, kv, cache, cache.copy(), np.array(slots, np.int32))


def test_aliased_caches_and_bad_block_tables_are_refused():
    cache = np.zeros((4, 8, 1, 2), np.float32)
    kv = np.ones((1, 1, 2), np.float32)
    with pytest.raises(InputError, match="share memory"):
        ops.reshape_and_cache(kv, kv, cache, cache, np.array([0], np.int32))
    q = np.ones((1, 2, 2), np.float32)
    with pytest.raises(InputError, match="block table entry 9 is outside the cache's 4 blocks"):
        ops.paged_attention(q, cache, cache.copy(), np.array([[9]], np.int32), np.array([3]))
    with pytest.raises(InputError, match="needs 2 blocks of 8, the block table has 1"):
        ops.paged_attention(q, cache, cache.copy(), np.array([[0]], np.int32), np.array([9]))
    with pytest.raises(InputError, match="at least one cached position"):
        ops.paged_attention(q, cache, cache.copy(), np.array([[0]], np.int32), np.array([0]))


# ---------------------------------------------------------------------- fused add + RMSNorm
@pytest.mark.parametrize("mode", MODES)
def test_add_rms_norm_is_add_then_rms_norm(mode):
    rng = np.random.default_rng(2)
    dt = storage_dtype(mode)
    x, res = randn(rng, (9, 96), dt, 3), randn(rng, (9, 96), dt, 3)
    w = (1 + 0.1 * rng.standard_normal(96)).astype(dt)
    y, x_sum, rstd = ops.add_rms_norm(x, res, w, 1e-5)
    np.testing.assert_array_equal(bits(x_sum), bits(ops.add(x, res)))
    np.testing.assert_array_equal(bits(y), bits(ops.rms_norm(ops.add(x, res), w, 1e-5)))
    xs = x_sum.astype(np.float64)
    assert rstd.shape == (9, 1) and rstd.dtype == (np.float64 if mode == "fp64" else np.float32)
    np.testing.assert_allclose(rstd, 1 / np.sqrt((xs * xs).mean(-1, keepdims=True) + 1e-5),
                               rtol=1e-6)


# ---------------------------------------------------------------------- RoPE from a cos_sin_cache
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("table_dtype", ["float32", "storage"])
def test_rope_cache_gathers_arbitrary_positions(mode, table_dtype):
    dt = storage_dtype(mode)
    D, theta, max_pos = 128, 4e6, 4096
    tdt = np.float32 if table_dtype == "float32" and mode != "fp64" else dt
    cos, sin = ops.rope_tables(np.arange(max_pos), D, theta, dtype=np.float64)
    cache = ops.cos_sin_cache(cos, sin).astype(tdt)             # [max_pos, D]
    positions = np.array([4095, 7, 7, 1000, 0, 2049])           # not contiguous, repeated
    c, s = ops.rope_cache(positions, cache)
    want_c, want_s = ops.rope_tables(positions, D, theta, dtype=np.float64)
    np.testing.assert_array_equal(c, want_c.astype(tdt))
    np.testing.assert_array_equal(s, want_s.astype(tdt))
    q = np.random.default_rng(3).standard_normal((6, 4, D)).astype(dt)
    np.testing.assert_array_equal(bits(ops.apply_rope(q, c, s)),
                                  bits(ops.apply_rope(q, want_c.astype(tdt), want_s.astype(tdt))))
    with pytest.raises(InputError, match="position 4096 is outside"):
        ops.rope_cache([4096], cache)


# ---------------------------------------------------------------------- fused layouts
@pytest.mark.parametrize("mode", MODES)
def test_fused_qkv_and_w13_equal_the_separate_projections(mode):
    rng = np.random.default_rng(4)
    dt = storage_dtype(mode)
    H, Hq, Hkv, D, inter = 64, 4, 2, 16, 96
    x = randn(rng, (7, H), dt)
    wq, wk, wv = (randn(rng, (n, H), dt, 0.1) for n in (Hq * D, Hkv * D, Hkv * D))
    bq, bk, bv = (randn(rng, (n,), dt, 0.1) for n in (Hq * D, Hkv * D, Hkv * D))
    q, k, v = ops.qkv_proj(x, np.concatenate([wq, wk, wv]), np.concatenate([bq, bk, bv]),
                           Hq * D, Hkv * D)
    for got, w, b in ((q, wq, bq), (k, wk, bk), (v, wv, bv)):
        np.testing.assert_array_equal(bits(got), bits(ops.linear(x, w, b)))
    wg, wu, wd = randn(rng, (inter, H), dt, 0.1), randn(rng, (inter, H), dt, 0.1), \
        randn(rng, (H, inter), dt, 0.1)
    np.testing.assert_array_equal(bits(ops.swiglu_w13(x, np.concatenate([wg, wu]), wd)),
                                  bits(ops.swiglu(x, wg, wu, wd)))


def test_lengths_that_are_not_vectors_are_refused():
    q = np.zeros((2, 1, 4), np.float32)
    with pytest.raises(InputError, match="q_lens must be a 1-D vector"):
        ops.attention_varlen(q, q, q, 2, [2])
    with pytest.raises(InputError, match="kv_lens must be a 1-D vector"):
        ops.attention_varlen(q, q, q, [2], [[2]])
