"""The MoE serving stages (refimpl.ops.moe_stages): dispatch, grouped matmul, combine.

Dispatch is checked against a transcription of the equivalent-computation listing in
torch_npu's npu_moe_init_routing documentation (Ascend/op-plugin), and against the
definitions of both slot conventions; the grouped matmul against one `linear` per expert (bit
for bit) and for never reading past its groups; combine against the finalize formula written
out element by element; and `moe_block`, now built from the stages, against the loop over
experts it replaced, bit for bit in every mode.
"""

from __future__ import annotations

import numpy as np
import pytest

from refimpl import ops
from refimpl.errors import InputError
from refimpl.numerics import storage_dtype

MODES = ("fp64", "fp32", "bf16", "fp16")


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def _ids(rng, N, K, E, skip=()):
    """N tokens choosing K distinct experts of E, never those in `skip` (zero-token ones)."""
    allowed = np.array([e for e in range(E) if e not in skip])
    return np.stack([rng.choice(allowed, K, replace=False) for _ in range(N)])


def _init_routing_reference(x, row_idx, expert_idx):
    """torch_npu.npu_moe_init_routing's documented CPU equivalent, rewritten: stable argsort
    of the flattened ids, the row indices carried along, the inverse map, x gathered by
    source row modulo the number of rows."""
    num_rows, k = x.shape[0], expert_idx.shape[-1]
    order = np.argsort(expert_idx.reshape(-1), kind="stable")
    dst_to_src = row_idx.reshape(-1)[order]
    expanded_row_idx = np.zeros(dst_to_src.shape, np.int64)
    expanded_row_idx[dst_to_src] = np.arange(dst_to_src.size)
    return x[dst_to_src[:num_rows * k] % num_rows], expanded_row_idx, np.sort(
        expert_idx.reshape(-1)), dst_to_src


def test_dispatch_v1_is_npu_moe_init_routing():
    rng = np.random.default_rng(0)
    N, K, E = 37, 4, 16
    ids = _ids(rng, N, K, E, skip=(5, 11))
    x = rng.standard_normal((N, 24)).astype(np.float32)
    row_idx = np.arange(N * K).reshape(K, N).T                       # k*N + t, as served
    ex, eri, eids, srt = _init_routing_reference(x, row_idx, ids)
    d = ops.moe_dispatch(ids, E, "v1", x)
    np.testing.assert_array_equal(d["expanded_x"], ex)
    np.testing.assert_array_equal(d["expanded_row_idx"], eri)
    np.testing.assert_array_equal(d["sorted_expert_ids"], eids)
    np.testing.assert_array_equal(d["sorted_row_idx"], srt)
    assert d["expert_counts"][5] == d["expert_counts"][11] == 0
    np.testing.assert_array_equal(d["expert_cumsum"], np.cumsum(np.bincount(ids.ravel(),
                                                                            minlength=E)))


@pytest.mark.parametrize("convention", ["v1", "v2"])
def test_dispatch_conventions_by_definition(convention):
    rng = np.random.default_rng(1)
    N, K, E = 29, 3, 9
    ids = _ids(rng, N, K, E, skip=(0,))
    x = rng.standard_normal((N, 8))
    d = ops.moe_dispatch(ids, E, convention, x)
    src = d["sorted_row_idx"]
    tok, k = (src % N, src // N) if convention == "v1" else (src // K, src % K)
    np.testing.assert_array_equal(ids[tok, k], d["sorted_expert_ids"])       # right slots
    assert np.all(np.diff(d["sorted_expert_ids"]) >= 0)
    np.testing.assert_array_equal(d["expanded_x"], x[tok])
    np.testing.assert_array_equal(d["expanded_row_idx"][src], np.arange(N * K))  # inverse
    bounds = np.r_[0, d["expert_cumsum"]]
    for e in range(E):                            # each expert's rows: its tokens, ascending
        np.testing.assert_array_equal(tok[bounds[e]:bounds[e + 1]], np.nonzero(ids == e)[0])


def test_dispatch_refuses_bad_ids():
    with pytest.raises(InputError, match="outside"):
        ops.moe_dispatch([[0, 9]], 4)
    with pytest.raises(InputError, match="integers"):
        ops.moe_dispatch(np.zeros((2, 2), np.float32), 4)
    with pytest.raises(InputError, match="v1 or v2"):
        ops.moe_dispatch([[0, 1]], 4, "v3")


class _Untouchable:
    """A weight that must not be read."""

    @property
    def shape(self):
        raise AssertionError("a weight of an empty group was read")

    def astype(self, *a, **k):
        raise AssertionError("a weight of an empty group was read")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group_list_type", ["cumsum", "count"])
def test_grouped_matmul_is_linear_per_group_and_reads_no_padding(mode, group_list_type):
    rng = np.random.default_rng(2)
    dt = storage_dtype(mode)
    counts = np.array([3, 0, 17, 1, 0, 40])
    R = int(counts.sum()) + 5                                   # 5 padding rows
    x = rng.standard_normal((R, 32)).astype(dt)
    x[-5:] = np.nan                                             # past the last group
    w = [rng.standard_normal((24, 32)).astype(dt) if n else _Untouchable() for n in counts]
    gl = np.cumsum(counts) if group_list_type == "cumsum" else counts
    y = ops.grouped_matmul(x, w, gl, group_list_type)
    assert y.shape == (R, 24) and y.dtype == dt
    assert np.isfinite(y.astype(np.float64)).all() and not y[-5:].any()
    b = np.r_[0, np.cumsum(counts)]
    for e in np.flatnonzero(counts):
        np.testing.assert_array_equal(bits(y[b[e]:b[e + 1]]), bits(ops.linear(x[b[e]:b[e + 1]],
                                                                              w[e])))


def test_group_lists_are_checked():
    x = np.zeros((4, 2), np.float32)
    w = [np.zeros((3, 2), np.float32)] * 2
    with pytest.raises(InputError, match="covers 5 rows"):
        ops.grouped_matmul(x, w, [2, 5])
    with pytest.raises(InputError, match="non-negative"):
        ops.grouped_matmul(x, w, [3, 2])
    with pytest.raises(InputError, match="2 integers"):
        ops.grouped_matmul(x, w, [1, 2, 3])
    with pytest.raises(InputError, match="cumsum or count"):
        ops.grouped_matmul(x, w, [1, 2], "counts")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("convention", ["v1", "v2"])
def test_combine_is_the_finalize_formula(mode, convention):
    """out(t) = skip1 + skip2 + sum_k scales[t,k] * (rows[dst(slot(t,k))] + bias[e(t,k)]),
    written element by element in the accumulation dtype, in the spec's order; dropped
    slots add nothing."""
    rng = np.random.default_rng(3)
    dt = storage_dtype(mode)
    acc = np.float64 if mode == "fp64" else np.float32
    N, K, E, H = 13, 3, 7, 10
    ids = _ids(rng, N, K, E, skip=(2,))
    d = ops.moe_dispatch(ids, E, convention)
    rows = rng.standard_normal((N * K, H)).astype(dt)
    scales = rng.uniform(0.1, 1.0, (N, K)).astype(np.float32)
    skip1, skip2 = (rng.standard_normal((N, H)).astype(dt) for _ in range(2))
    bias = rng.standard_normal((E, H)).astype(dt)
    dst = d["expanded_row_idx"].copy()
    dst[5] = -1                                                   # one dropped slot
    got = ops.moe_combine(rows, scales, dst, skip=(skip1, skip2), bias=bias, expert_ids=ids,
                          convention=convention)
    want = np.empty((N, H), dt)
    for t in range(N):
        for j in range(H):
            s = acc(skip1[t, j]) + acc(skip2[t, j])
            for k in range(K):
                slot = k * N + t if convention == "v1" else t * K + k
                if dst[slot] >= 0:
                    s = s + acc(scales[t, k]) * (acc(rows[dst[slot], j]) + acc(bias[ids[t, k], j]))
            want[t, j] = s
    np.testing.assert_array_equal(bits(got), bits(want))


def test_dispatch_then_combine_is_k_times_x():
    """Identity experts: combining the dispatched rows with unit scales gives K x (small
    integers: exact in any order)."""
    rng = np.random.default_rng(4)
    N, K, E = 20, 4, 12
    ids = _ids(rng, N, K, E, skip=(3,))
    x = rng.integers(-8, 9, (N, 6)).astype(np.float32)
    for conv in ("v1", "v2"):
        d = ops.moe_dispatch(ids, E, conv, x)
        y = ops.moe_combine(d["expanded_x"], np.ones((N, K)), d["expanded_row_idx"],
                            convention=conv)
        np.testing.assert_array_equal(y, K * x)


def test_combine_refuses_bad_maps():
    rows = np.zeros((4, 2), np.float32)
    with pytest.raises(InputError, match="outside the 4 rows"):
        ops.moe_combine(rows, np.ones((2, 2)), np.array([0, 1, 2, 7]))
    with pytest.raises(InputError, match="4 integers"):
        ops.moe_combine(rows, np.ones((2, 2)), np.array([0, 1, 2]))
    with pytest.raises(InputError, match="needs the expert_ids"):
        ops.moe_combine(rows, np.ones((2, 2)), np.arange(4), bias=np.zeros((3, 2)))


def _moe_block_by_loop(x, gate_w, scale, experts, shared, G):
    """The MoE block as it was written before the stages: a loop over the selected experts,
    each SwiGLU on its tokens, HF's index_add order."""
    from refimpl.numerics import round_to, to_accum

    dt = x.dtype
    ids, w = ops.moge_route(ops.linear(x, gate_w), scale, G)
    ws = w.astype(dt)
    y = np.zeros_like(to_accum(x))
    for e in np.unique(ids):
        tok, slot = np.nonzero(ids == e)
        out = ops.swiglu(x[tok], *experts[int(e)])
        y[tok] = round_to(y[tok] + round_to(to_accum(out) * to_accum(ws[tok, slot])[:, None],
                                            dt), dt)
    return round_to(y + to_accum(ops.swiglu(x, *shared)), dt).astype(dt)


@pytest.mark.parametrize("mode", MODES)
def test_moe_block_from_the_stages_is_the_expert_loop(mode):
    rng = np.random.default_rng(5)
    dt = storage_dtype(mode)
    T, H, E, G, I = 45, 32, 16, 4, 8
    x = rng.standard_normal((T, H)).astype(dt)
    gate_w = (rng.standard_normal((E, H)) * 0.3).astype(dt)
    gate_w[7] -= 100                                              # expert 7 never chosen
    scale = rng.uniform(0.5, 1.5, (1, E)).astype(dt)
    experts = [tuple((rng.standard_normal(s) * 0.2).astype(dt) for s in ((I, H), (I, H),
                                                                         (H, I)))
               for _ in range(E)]
    shared = tuple((rng.standard_normal(s) * 0.2).astype(dt) for s in ((I, H), (I, H), (H, I)))
    got = ops.moe_block(x, gate_w, scale, experts, shared, G)
    np.testing.assert_array_equal(bits(got), bits(_moe_block_by_loop(x, gate_w, scale, experts,
                                                                     shared, G)))
