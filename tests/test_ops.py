"""The NumPy spec operators against direct formulas and their defining properties.

Direct formulas are written here in float64 loops/einsums, independently of refimpl.ops'
vectorised code. Odd sizes are included throughout.
"""

import numpy as np
import pytest

from refimpl import ops
from refimpl.errors import InputError
from refimpl.numerics import bfloat16

from .conftest import rel_err

DTYPES = [np.float64, np.float32, bfloat16, np.float16]


# ---------------------------------------------------------------------------- dtype contract
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_operator_returns_its_input_dtype(dtype, rng):
    x = rng.standard_normal((3, 8)).astype(dtype)
    w = rng.standard_normal(8).astype(dtype)
    W = rng.standard_normal((5, 8)).astype(dtype)
    assert ops.rms_norm(x, w, 1e-5).dtype == dtype
    assert ops.linear(x, W, W[:, 0]).dtype == dtype
    assert ops.silu(x).dtype == dtype
    assert ops.add(x, x).dtype == dtype
    q = rng.standard_normal((3, 4, 8)).astype(dtype)
    k = rng.standard_normal((3, 2, 8)).astype(dtype)
    cos, sin = ops.rope_tables(np.arange(3), 8, 1e4, dtype=np.float64)
    assert ops.apply_rope(q, cos, sin).dtype == dtype
    assert ops.attention(q, k, k).dtype == dtype
    assert ops.swiglu(x, W, W, W.T.copy()).dtype == dtype
    acc = np.float64 if dtype == np.float64 else np.float32
    assert ops.softmax(x).dtype == acc


# ---------------------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("shape", [(1, 7), (5, 64), (3, 1536)])
def test_rms_norm_matches_formula(shape, rng):
    x = rng.standard_normal(shape) * 3
    w = rng.standard_normal(shape[-1])
    expect = np.empty(shape)
    for t in range(shape[0]):
        rms = np.sqrt(sum(v * v for v in x[t]) / shape[-1] + 1e-5)
        expect[t] = w * (x[t] / rms)
    assert rel_err(ops.rms_norm(x, w, 1e-5), expect) < 1e-14
    assert rel_err(ops.rms_norm(x.astype(np.float32), w.astype(np.float32), 1e-5), expect) < 1e-6


def test_rms_norm_is_scale_invariant(rng):
    x = rng.standard_normal((4, 33))
    w = rng.standard_normal(33)
    np.testing.assert_allclose(ops.rms_norm(1000.0 * x, w, 0.0), ops.rms_norm(x, w, 0.0),
                               rtol=1e-13)


def test_rms_norm_rounds_the_normalised_value_before_the_weight(rng):
    x = rng.standard_normal((64, 128)).astype(bfloat16)
    w = (1 + 0.3 * rng.standard_normal(128)).astype(bfloat16)
    xf = x.astype(np.float32)
    n = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + 1e-5)
    cast_first = (w.astype(np.float32) * n.astype(bfloat16).astype(np.float32)).astype(bfloat16)
    cast_last = (w.astype(np.float32) * n).astype(bfloat16)
    got = ops.rms_norm(x, w, 1e-5)
    assert np.array_equal(got.view(np.uint16), cast_first.view(np.uint16))
    assert not np.array_equal(got.view(np.uint16), cast_last.view(np.uint16))


# ---------------------------------------------------------------------------- linear / basic
@pytest.mark.parametrize("T, n_in, n_out", [(1, 7, 5), (9, 33, 17), (4, 64, 1)])
def test_linear_matches_formula(T, n_in, n_out, rng):
    x, W, b = rng.standard_normal((T, n_in)), rng.standard_normal((n_out, n_in)), \
        rng.standard_normal(n_out)
    expect = np.array([[sum(x[t, i] * W[o, i] for i in range(n_in)) + b[o]
                        for o in range(n_out)] for t in range(T)])
    assert rel_err(ops.linear(x, W, b), expect) < 1e-13
    assert rel_err(ops.linear(x, W), expect - b) < 1e-13


def test_linear_bf16_rounds_once_after_the_bias(rng):
    x = rng.standard_normal((8, 32)).astype(bfloat16)
    W = rng.standard_normal((16, 32)).astype(bfloat16)
    b = rng.standard_normal(16).astype(bfloat16)
    exact = x.astype(np.float64) @ W.astype(np.float64).T + b.astype(np.float64)
    # one rounding of a float32-accumulated value: within half a bf16 ulp plus float32 noise
    got = ops.linear(x, W, b).astype(np.float64)
    assert np.all(np.abs(got - exact) <= np.abs(exact) * 2.0 ** -8 + 1e-5)


def test_softmax_is_stable_and_normalised():
    x = np.array([[1000.0, 1000.0, -np.inf], [-5.0, 0.0, 5.0]])
    p = ops.softmax(x)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0])


def test_silu_formula_and_extremes():
    x = np.array([-1000.0, -3.0, 0.0, 2.5, 1000.0])
    np.testing.assert_allclose(ops.silu(x), x / (1 + np.exp(-np.clip(x, -700, 700))),
                               rtol=1e-15, atol=1e-300)
    assert np.all(np.isfinite(ops.silu(x.astype(np.float32))))


def test_embedding_rejects_out_of_range_ids(rng):
    table = rng.standard_normal((10, 4))
    np.testing.assert_array_equal(ops.embedding(np.array([3, 0, 9]), table), table[[3, 0, 9]])
    with pytest.raises(InputError, match="token id 10 is outside the vocabulary"):
        ops.embedding(np.array([1, 10]), table)


# ---------------------------------------------------------------------------- RoPE
def test_rope_tables_exact_formula():
    pos, d, theta = np.array([0, 1, 17, 30000]), 8, 4e6
    cos, sin = ops.rope_tables(pos, d, theta)
    for t, p in enumerate(pos):
        for i in range(d // 2):
            angle = p * theta ** (-2.0 * i / d)
            assert cos[t, i] == pytest.approx(np.cos(angle), abs=1e-12)
            assert cos[t, i + d // 2] == cos[t, i]
            assert sin[t, i] == pytest.approx(np.sin(angle), abs=1e-12)


def test_rope_float32_angles_drift_at_long_positions():
    pos = np.array([30000])
    c64, s64 = ops.rope_tables(pos, 128, 4e6, angles="exact")
    c32, s32 = ops.rope_tables(pos, 128, 4e6, angles="float32")
    drift = np.max(np.abs(np.arctan2(s32, c32) - np.arctan2(s64, c64)))
    assert 1e-4 < drift < 3e-3  # ~1e-3 rad at position 30000
    c, s = ops.rope_tables(np.array([3]), 128, 4e6, angles="float32")
    e, f = ops.rope_tables(np.array([3]), 128, 4e6)
    assert np.max(np.abs(c - e)) < 1e-6


def _rope_direct(x, pos, theta):
    """rotate-half by hand: pair (i, i + d/2) rotated by angle p * theta^(-2i/d)."""
    T, H, d = x.shape
    y = np.empty_like(x)
    for t in range(T):
        for i in range(d // 2):
            a = pos[t] * theta ** (-2.0 * i / d)
            x1, x2 = x[t, :, i], x[t, :, i + d // 2]
            y[t, :, i] = x1 * np.cos(a) - x2 * np.sin(a)
            y[t, :, i + d // 2] = x2 * np.cos(a) + x1 * np.sin(a)
    return y


@pytest.mark.parametrize("T, H, d", [(1, 1, 2), (5, 3, 16), (7, 2, 128)])
def test_apply_rope_matches_pair_rotation(T, H, d, rng):
    x = rng.standard_normal((T, H, d))
    pos = rng.integers(0, 5000, T)
    cos, sin = ops.rope_tables(pos, d, 1e4)
    # angles up to 5000 rad: one float64 ulp of the angle is ~1e-12 of a unit rotation
    assert rel_err(ops.apply_rope(x, cos, sin), _rope_direct(x, pos, 1e4)) < 1e-11


def test_rope_preserves_norms_and_dot_products_depend_on_offset_only(rng):
    d = 64
    q, k = rng.standard_normal((1, 1, d)), rng.standard_normal((1, 1, d))

    def rot(x, p):
        c, s = ops.rope_tables(np.array([p]), d, 4e6)
        return ops.apply_rope(x, c, s)

    np.testing.assert_allclose(np.linalg.norm(rot(q, 12345)), np.linalg.norm(q), rtol=1e-13)
    dot = lambda a, b: float(np.sum(a * b))  # noqa: E731
    ref = dot(rot(q, 10), rot(k, 3))
    for shift in (1, 100, 20000):
        assert dot(rot(q, 10 + shift), rot(k, 3 + shift)) == pytest.approx(ref, rel=1e-9)
    assert dot(rot(q, 11), rot(k, 3)) != pytest.approx(ref, rel=1e-6)


def test_interleaved_is_a_different_function(rng):
    x = rng.standard_normal((4, 2, 16))
    pos = np.arange(1, 5)
    cos, sin = ops.rope_tables(pos, 16, 1e4)
    inter = ops.apply_rope_interleaved(x, cos, sin)
    # interleaved == rotate-half applied to the de-interleaved vector, re-interleaved
    perm = np.concatenate([np.arange(0, 16, 2), np.arange(1, 16, 2)])
    via_half = np.empty_like(x)
    via_half[..., perm] = ops.apply_rope(x[..., perm], cos, sin)
    assert rel_err(inter, via_half) < 1e-14
    assert rel_err(inter, ops.apply_rope(x, cos, sin)) > 0.1


# ---------------------------------------------------------------------------- attention
def _attention_direct(q, k, v, causal=True):
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    out = np.zeros((T, Hq, D))
    for h in range(Hq):
        g = h // (Hq // Hkv)
        for t in range(T):
            last = S - T + t if causal else S - 1
            s = np.array([q[t, h] @ k[j, g] / np.sqrt(D) for j in range(last + 1)])
            p = np.exp(s - s.max())
            p /= p.sum()
            out[t, h] = sum(p[j] * v[j, g] for j in range(last + 1))
    return out


@pytest.mark.parametrize("T, S, Hq, Hkv, D", [(1, 1, 1, 1, 4), (5, 5, 4, 2, 8), (1, 9, 6, 3, 16),
                                              (3, 11, 12, 6, 32), (7, 7, 5, 5, 6)])
def test_attention_matches_formula(T, S, Hq, Hkv, D, rng):
    q, k, v = (rng.standard_normal((T, Hq, D)), rng.standard_normal((S, Hkv, D)),
               rng.standard_normal((S, Hkv, D)))
    assert rel_err(ops.attention(q, k, v), _attention_direct(q, k, v)) < 1e-13
    assert rel_err(ops.attention(q, k, v, causal=False),
                   _attention_direct(q, k, v, causal=False)) < 1e-13


def test_gqa_equals_multihead_with_repeated_kv_heads(rng):
    q, k, v = rng.standard_normal((6, 12, 16)), rng.standard_normal((6, 6, 16)), \
        rng.standard_normal((6, 6, 16))
    k_rep, v_rep = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)  # head h -> h // 2
    np.testing.assert_array_equal(ops.attention(q, k, v), ops.attention(q, k_rep, v_rep))


def test_causal_rows_see_no_future(rng):
    q, k, v = rng.standard_normal((8, 2, 8)), rng.standard_normal((8, 1, 8)), \
        rng.standard_normal((8, 1, 8))
    base = ops.attention(q, k, v)
    k2, v2 = k.copy(), v.copy()
    k2[5:] += 100.0
    v2[5:] -= 100.0
    changed = ops.attention(q, k2, v2)
    np.testing.assert_array_equal(base[:5], changed[:5])
    assert not np.allclose(base[5:], changed[5:])


def test_decode_query_equals_last_prefill_row(rng):
    q, k, v = rng.standard_normal((9, 4, 16)), rng.standard_normal((9, 2, 16)), \
        rng.standard_normal((9, 2, 16))
    full = ops.attention(q, k, v)
    np.testing.assert_allclose(ops.attention(q[-1:], k, v)[0], full[-1], rtol=1e-13)
    np.testing.assert_allclose(ops.attention(q[-3:], k, v), full[-3:], rtol=1e-13)


def test_attention_refuses_more_queries_than_keys(rng):
    q, k = rng.standard_normal((4, 2, 8)), rng.standard_normal((3, 2, 8))
    with pytest.raises(InputError, match="4 queries but only 3 keys"):
        ops.attention(q, k, k)


# ---------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("T, H, I", [(1, 8, 5), (6, 17, 31)])
def test_swiglu_matches_formula(T, H, I, rng):
    x = rng.standard_normal((T, H))
    wg, wu, wd = rng.standard_normal((I, H)), rng.standard_normal((I, H)), \
        rng.standard_normal((H, I))
    g, u = x @ wg.T, x @ wu.T
    expect = (g / (1 + np.exp(-g)) * u) @ wd.T
    assert rel_err(ops.swiglu(x, wg, wu, wd), expect) < 1e-13


# ---------------------------------------------------------------------------- MoGE
def test_moge_route_one_expert_per_group_weight_is_prob_times_scale(rng):
    T, E, G = 11, 12, 3
    logits = rng.standard_normal((T, E))
    scale = rng.uniform(0.5, 1.5, (1, E))
    ids, w = ops.moge_route(logits, scale, G)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for t in range(T):
        for g in range(G):
            block = probs[t, 4 * g:4 * g + 4]
            assert ids[t, g] == 4 * g + int(np.argmax(block))  # exactly one, inside group g
            assert w[t, g] == pytest.approx(probs[t, ids[t, g]] * scale[0, ids[t, g]], rel=1e-14)
    assert not np.allclose(w.sum(-1), 1.0)  # no renormalisation


def test_moge_route_ties_go_to_lowest_id():
    logits = np.zeros((2, 8))
    logits[1, [5, 6]] = 3.0
    ids, _ = ops.moge_route(logits, np.ones((1, 8)), 2)
    np.testing.assert_array_equal(ids, [[0, 4], [0, 5]])


def test_moge_route_rejects_indivisible_groups():
    with pytest.raises(InputError, match="do not divide"):
        ops.moge_route(np.zeros((1, 10)), np.ones((1, 10)), 3)


@pytest.mark.parametrize("dtype", [np.float64, bfloat16])
def test_moe_block_equals_dense_evaluation_masked_by_routing(dtype, rng):
    T, H, E, G, I, S = 9, 16, 8, 4, 6, 10
    x = rng.standard_normal((T, H)).astype(dtype)
    gate = rng.standard_normal((E, H)).astype(dtype)
    scale = rng.uniform(0.5, 1.5, (1, E)).astype(dtype)
    experts = [tuple(rng.standard_normal(s).astype(dtype) * 0.3
                     for s in ((I, H), (I, H), (H, I))) for _ in range(E)]
    shared = tuple(rng.standard_normal(s).astype(dtype) * 0.3 for s in ((S, H), (S, H), (H, S)))
    got = ops.moe_block(x, gate, scale, experts, shared, G)
    ids, w = ops.moge_route(ops.linear(x, gate), scale, G)
    mask = np.zeros((T, E))
    for g in range(G):
        mask[np.arange(T), ids[:, g]] = w[:, g]
    every = np.stack([ops.swiglu(x, *experts[e]).astype(np.float64) for e in range(E)], 1)
    dense = np.einsum("te,teh->th", mask, every) + ops.swiglu(x, *shared).astype(np.float64)
    tol = 1e-13 if dtype == np.float64 else 3e-2
    assert rel_err(got, dense) < tol


def test_moe_block_touches_only_selected_experts(rng):
    T, H, E, G, I = 2, 8, 16, 4, 4
    x = rng.standard_normal((T, H))
    experts = [tuple(rng.standard_normal(s) for s in ((I, H), (I, H), (H, I))) for _ in range(E)]
    touched = []

    class Lazy:
        def __getitem__(self, e):
            touched.append(e)
            return experts[e]

    ops.moe_block(x, rng.standard_normal((E, H)), np.ones((1, E)), Lazy(),
                  experts[0], G)
    assert len(touched) <= T * G and len(set(touched)) == len(touched)


# ---------------------------------------------------------------------------- sampling
def test_greedy_sampling_is_argmax_lowest_tie():
    assert ops.sample(np.array([0.0, 3.0, 3.0, 1.0])) == 1


def test_seeded_sampling_reproducible_and_filters(rng):
    logits = rng.standard_normal(50)
    draw = lambda seed, **kw: [ops.sample(logits, 1.0, rng=np.random.default_rng(seed), **kw)  # noqa: E731
                               for _ in range(1)]
    a = [ops.sample(logits, 0.8, rng=r) for r in [np.random.default_rng(7)] for _ in range(20)]
    b = [ops.sample(logits, 0.8, rng=r) for r in [np.random.default_rng(7)] for _ in range(20)]
    assert a == b
    assert draw(1, top_k=1) == [int(np.argmax(logits))]
    assert draw(2, top_p=1e-9) == [int(np.argmax(logits))]
    top5 = set(np.argsort(-logits)[:5])
    r = np.random.default_rng(3)
    assert all(ops.sample(logits, 2.0, top_k=5, rng=r) in top5 for _ in range(200))


def test_sampling_frequencies_follow_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    r = np.random.default_rng(0)
    counts = np.bincount([ops.sample(logits, 1.0, rng=r) for _ in range(20000)], minlength=3)
    np.testing.assert_allclose(counts / 20000, [0.5, 0.3, 0.2], atol=0.015)


def test_sampling_rejects_bad_parameters():
    with pytest.raises(InputError):
        ops.sample(np.zeros(3), temperature=-1.0)
    with pytest.raises(InputError):
        ops.sample(np.zeros(3), temperature=1.0, top_p=0.0, rng=np.random.default_rng(0))
