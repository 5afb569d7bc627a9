"""Cross-check: refimpl's operators against ONNX's reference evaluator (opset 23).

``onnx.reference.ReferenceEvaluator`` implements RMSNormalization, RotaryEmbedding and
Attention in NumPy, written by the ONNX project from the operator specifications. We build
one-node models with ``onnx.helper`` and compare with ``refimpl.ops`` at the real sizes
(hidden 1536 and 5120; heads 12/6 and 40/8, head_dim 128).

Conventions found in ONNX (see docs/crosschecks.md):
* RotaryEmbedding takes cos/sin caches of *half* width, [max_position, head_dim / 2], plus
  position_ids; refimpl's rotate-half tables are cat(freqs, freqs), so the cache is their first
  half. interleaved=0 is rotate-half (refimpl's `apply_rope`), interleaved=1 is GPT-J
  (`apply_rope_interleaved`).
* Attention's causal mask is offset by the number of keys in ``past_key`` only: with all S keys
  passed as K (no past), query i sees keys j <= i (top-left), so a decode step (1 query, S
  keys) sees only key 0. Passing the earlier keys as past_key, or an explicit boolean
  attn_mask (refimpl's `causal_mask`), gives refimpl's bottom-right convention.

onnx is a hard requirement of these tests (the project's ``test`` extra): a missing import
fails, it does not skip. Measured figures print as ``crosscheck | ...`` lines with ``-s``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from refimpl import ops
from refimpl.config import preset

from .conftest import rel_err

OPSET = 23
EPS = 1e-5
HEAD_DIM = 128
# fp32 attention, relative to max |output|: ONNX scales q and k by sqrt(scale) each, refimpl
# scales q k^T once, so the roundings differ (measured: <= 6.1e-7 at T <= 16 and in decode,
# 1.8e-6 at T = 64; docs/crosschecks.md states "to 2e-6")
ATTN_TOL = 2e-6
_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
         np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL}


def report(name: str, **figures) -> None:
    body = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in figures.items())
    print(f"\ncrosscheck | {name} | {body}")


def run_node(op: str, inputs: dict, **attrs) -> np.ndarray:
    """Run one ONNX node (default domain, opset 23) on the reference evaluator; inputs whose
    value is None are omitted (an empty input name). The output Y has the first input's
    dtype and shape (true of the three operators tested here)."""
    names = [name if value is not None else "" for name, value in inputs.items()]
    feeds = {name: value for name, value in inputs.items() if value is not None}
    first = next(iter(feeds.values()))
    node = helper.make_node(op, names, ["Y"], **attrs)
    graph = helper.make_graph(
        [node], f"one_{op}",
        [helper.make_tensor_value_info(n, _ELEM[v.dtype], list(v.shape)) for n, v in feeds.items()],
        [helper.make_tensor_value_info("Y", _ELEM[first.dtype], list(first.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return ReferenceEvaluator(model).run(None, feeds)[0]


def agreement(ours, ref) -> dict:
    ours64, ref64 = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return {"max_abs": float(np.abs(ours64 - ref64).max()), "max_rel": rel_err(ours, ref),
            "bit_equal": float(np.mean(np.asarray(ours) == np.asarray(ref)))}


# ---------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hidden", [1536, 5120])
def test_rms_norm_equals_onnx(hidden, dtype):
    """Bit-equal in fp32; in fp64 too once refimpl is given ONNX's epsilon, which is a float32
    attribute (1e-5 becomes 9.99999974738e-06: a 1.4e-14 relative difference in fp64)."""
    eps = float(np.float32(EPS))
    rng = np.random.default_rng(hidden)
    x = (3.0 * rng.standard_normal((8, hidden))).astype(dtype)      # [T, H]
    w = (1.0 + 0.1 * rng.standard_normal(hidden)).astype(dtype)     # [H]
    ref = run_node("RMSNormalization", {"X": x, "scale": w}, axis=-1, epsilon=EPS, stash_type=1)
    ours = ops.rms_norm(x, w, eps)
    fig = agreement(ours, ref)
    eps_effect = rel_err(ops.rms_norm(x, w, EPS), ref)
    report(f"onnx RMSNormalization hidden={hidden} {np.dtype(dtype).name}", **fig,
           max_rel_with_float64_eps=eps_effect)
    assert ours.dtype == ref.dtype == dtype
    np.testing.assert_array_equal(ours, ref)                    # bit-equal, as documented
    assert eps_effect <= (0.0 if dtype == np.float32 else 2e-14)


# ---------------------------------------------------------------------- RoPE
def onnx_rope(x, positions, theta, max_pos, interleaved):
    """ONNX RotaryEmbedding with refimpl's tables as its caches.

    # x [T, heads, D] -> [T, heads, D]; caches [max_pos, D/2] (the first half of refimpl's
    # cat(freqs, freqs) tables), position_ids [1, T]
    """
    T, heads, D = x.shape
    cos, sin = ops.rope_tables(np.arange(max_pos), D, theta, dtype=x.dtype)  # [P, D]
    y = run_node("RotaryEmbedding",
                 {"X": x.reshape(1, T, heads * D), "cos_cache": cos[:, : D // 2].copy(),
                  "sin_cache": sin[:, : D // 2].copy(),
                  "position_ids": np.asarray(positions, np.int64)[None]},
                 num_heads=heads, interleaved=int(interleaved))
    return y.reshape(T, heads, D)


@pytest.mark.parametrize("heads, theta", [(12, 4_000_000.0), (8, 16_000_000.0)])
def test_rotary_embedding_rotate_half_equals_onnx(heads, theta):
    rng = np.random.default_rng(heads)
    max_pos = 4096
    positions = np.sort(rng.choice(max_pos, size=24, replace=False))  # not 0..T-1
    x = rng.standard_normal((24, heads, HEAD_DIM)).astype(np.float32)
    cos, sin = ops.rope_tables(positions, HEAD_DIM, theta, dtype=np.float32)
    ours = ops.apply_rope(x, cos, sin)
    ref = onnx_rope(x, positions, theta, max_pos, interleaved=False)
    fig = agreement(ours, ref)
    report(f"onnx RotaryEmbedding interleaved=0 heads={heads} theta={theta:.3g}", **fig)
    np.testing.assert_array_equal(ours, ref)                    # bit-equal, as documented


def test_rotary_embedding_interleaved_equals_apply_rope_interleaved():
    rng = np.random.default_rng(7)
    positions = np.arange(100, 132)
    x = rng.standard_normal((32, 12, HEAD_DIM)).astype(np.float32)
    cos, sin = ops.rope_tables(positions, HEAD_DIM, 4e6, dtype=np.float32)
    ref = onnx_rope(x, positions, 4e6, 256, interleaved=True)
    ours = ops.apply_rope_interleaved(x, cos, sin)
    fig = agreement(ours, ref)
    # the two conventions are different functions: rotate-half is far from ONNX interleaved
    other = rel_err(ops.apply_rope(x, cos, sin), ref)
    report("onnx RotaryEmbedding interleaved=1 vs apply_rope_interleaved", **fig,
           rotate_half_vs_interleaved_rel=other)
    np.testing.assert_array_equal(ours, ref)                    # bit-equal, as documented
    assert other > 0.1


# ---------------------------------------------------------------------- attention
def onnx_attention(q, k, v, causal=True, past=0, mask=None):
    """ONNX Attention on refimpl-layout tensors; the first `past` keys/values go in as
    past_key/past_value (so the causal mask is offset by them).

    # q [T, Hq, D], k/v [S, Hkv, D] -> [T, Hq, D]; ONNX: Q [1, T, Hq*D], K/V [1, S-past, Hkv*D],
    # past_key/past_value [1, Hkv, past, D]
    """
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape

    def kv3(a):
        return a[past:].reshape(1, S - past, Hkv * D)

    def kv4(a):
        return a[:past].transpose(1, 0, 2)[None].copy() if past else None

    y = run_node("Attention",
                 {"Q": q.reshape(1, T, Hq * D), "K": kv3(k), "V": kv3(v), "attn_mask": mask,
                  "past_key": kv4(k), "past_value": kv4(v)},
                 q_num_heads=Hq, kv_num_heads=Hkv, is_causal=int(causal))
    return y.reshape(T, Hq, D)


def qkv(T, S, Hq, Hkv, seed):
    """Random q, k, v with scores of order 3, so softmax rows are far from uniform."""
    rng = np.random.default_rng(seed)
    q = (1.8 * rng.standard_normal((T, Hq, HEAD_DIM))).astype(np.float32)
    k = (1.8 * rng.standard_normal((S, Hkv, HEAD_DIM))).astype(np.float32)
    v = rng.standard_normal((S, Hkv, HEAD_DIM)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("name", ["embedded-1b", "pro-moe-72b"])
@pytest.mark.parametrize("T", [16, 64])
def test_attention_gqa_causal_prefill_equals_onnx(name, T):
    c = preset(name)
    assert c.head_dim == HEAD_DIM
    q, k, v = qkv(T, T, c.num_attention_heads, c.num_key_value_heads, seed=T)
    ours = ops.attention(q, k, v, causal=True)
    ref = onnx_attention(q, k, v, causal=True)
    fig = agreement(ours, ref)
    report(f"onnx Attention prefill {name} heads {c.num_attention_heads}/"
           f"{c.num_key_value_heads} T={T} fp32", **fig)
    assert fig["max_rel"] <= ATTN_TOL
    # GQA head mapping: query head h reads KV head h // group in both
    swapped = ops.attention(q, k[:, ::-1].copy(), v[:, ::-1].copy(), causal=True)
    assert rel_err(swapped, ref) > 0.1


def test_onnx_causal_mask_without_past_is_top_left():
    """1 query against S keys, all passed as K: ONNX's causal query 0 sees key 0 only
    (top-left), where refimpl's decode query (the last position) sees all S keys."""
    q, k, v = qkv(1, 33, 12, 6, seed=1)
    ref = onnx_attention(q, k, v, causal=True)
    top_left = ops.attention(q, k[:1], v[:1], causal=True)
    assert rel_err(top_left, ref) <= 1e-6
    assert rel_err(ops.attention(q, k, v, causal=True), ref) > 0.1


@pytest.mark.parametrize("T, S", [(1, 33), (1, 64), (8, 40)])
@pytest.mark.parametrize("name", ["embedded-1b", "pro-moe-72b"])
def test_attention_decode_equals_onnx_with_past_or_mask(name, T, S):
    """Decode (1 query) and chunked prefill (T queries after S - T cached keys): ONNX with the
    earlier keys as past_key, and ONNX with refimpl's causal_mask as attn_mask, both equal
    refimpl's attention."""
    c = preset(name)
    q, k, v = qkv(T, S, c.num_attention_heads, c.num_key_value_heads, seed=S)
    ours = ops.attention(q, k, v, causal=True)
    with_past = onnx_attention(q, k, v, causal=True, past=S - T)
    with_mask = onnx_attention(q, k, v, causal=False, mask=ops.causal_mask(T, S))
    fig_past, fig_mask = agreement(ours, with_past), agreement(ours, with_mask)
    report(f"onnx Attention decode {name} T={T} S={S} fp32 (past_key)", **fig_past)
    report(f"onnx Attention decode {name} T={T} S={S} fp32 (attn_mask)", **fig_mask)
    assert fig_past["max_rel"] <= ATTN_TOL
    assert fig_mask["max_rel"] <= ATTN_TOL
