"""The two numerics conventions (DEPLOYMENT.md section 1) as switches and profiles.

`hf` (the default) is Hugging Face eager; `vllm-ascend` takes the router softmax in the
activation dtype, applies the routing weight before down_proj (then sums a token's K rows in
float32) and fuses the residual add into RMSNorm. Each switch is checked against a
transcription of the serving formula; the fused residual is bit-identical to `hf` (refimpl's
residual add already rounds to the storage dtype, as the fused kernel's x_sum does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import refimpl
from refimpl import ops
from refimpl.config import CONVENTION_PROFILES, ModelConfig, preset
from refimpl.errors import ConfigError
from refimpl.numerics import round_to, storage_dtype, to_accum

MODES = ("fp64", "fp32", "bf16", "fp16")


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def test_profiles_round_trip_through_config_json():
    c = preset("tiny-moge")
    assert c.conventions == "hf" and c.router_softmax_dtype == "float32"
    v = c.with_conventions("vllm-ascend")
    d = v.to_hf_dict()
    assert d["refimpl_conventions"] == "vllm-ascend"
    assert d["refimpl_moe_weight_point"] == "before_down"
    assert ModelConfig.from_hf_dict(d) == v
    # a profile plus one switch of the other: the switch wins, the config is "custom"
    d2 = dict(c.to_hf_dict(), refimpl_conventions="vllm-ascend",
              refimpl_moe_weight_point="after_down")
    d2.pop("refimpl_router_softmax_dtype"), d2.pop("refimpl_residual_rounding")
    custom = ModelConfig.from_hf_dict(d2)
    assert custom.conventions == "custom" and custom.router_softmax_dtype == "activation"
    assert "refimpl_conventions" not in custom.to_hf_dict()
    for bad, fragment in (({"refimpl_conventions": "tgi"}, "refimpl_conventions"),
                          ({"refimpl_moe_weight_point": "middle"}, "refimpl_moe_weight_point"),
                          ({"refimpl_residual_rounding": 1}, "refimpl_residual_rounding")):
        with pytest.raises(ConfigError, match=fragment):
            ModelConfig.from_hf_dict({**c.to_hf_dict(), **bad})
    with pytest.raises(ConfigError, match="choose one of hf, vllm-ascend"):
        c.with_conventions("sglang")


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_activation_softmax_router_is_torchs_bf16_softmax(mode):
    """vllm-ascend: p = softmax(logits) in the activation dtype (torch computes in float32 and
    rounds), per-group argmax of those p, weight = p * router_scale in that dtype."""
    import torch

    rng = np.random.default_rng(0)
    dt = storage_dtype(mode)
    T, E, G = 256, 64, 8
    logits = (rng.standard_normal((T, E)) * 0.3).astype(dt)   # a router's narrow spread
    scale = rng.uniform(0.5, 1.5, (1, E)).astype(dt)
    tdt = torch.bfloat16 if mode == "bf16" else torch.float16
    tl = torch.from_numpy(logits.astype(np.float32)).to(tdt)
    p = torch.softmax(tl, dim=-1)                                   # in the activation dtype
    best, local = p.view(T, G, E // G).max(dim=-1)
    t_ids = (local + torch.arange(G) * (E // G)).numpy()
    t_w = (best * torch.from_numpy(scale.astype(np.float32)).to(tdt).view(E)[
        torch.from_numpy(t_ids)]).float().numpy()
    ids, w = ops.moge_route(logits, scale, G, softmax_dtype="activation")
    ties = ops.near_ties(logits, ids, G, 0, 4)
    p_ours = round_to(ops.softmax(logits), dt)
    # exact ties of the rounded p (common in half precision) go to the lowest id here
    rounded_tie = np.zeros_like(ties)
    for g in range(G):
        block = p_ours[:, g * E // G:(g + 1) * E // G]
        rounded_tie[:, g] = (block == block.max(axis=1, keepdims=True)).sum(axis=1) > 1
    same = (ids == t_ids) | ties | rounded_tie
    assert same.all(), int((~same).sum())
    agree = ids == t_ids
    np.testing.assert_array_equal(w[agree], t_w[agree])
    # and it differs from the float32 router on some choices (the point of the switch):
    # measured on N(0, 0.3^2) bf16 logits, 0.57% of 32768 choices (2.3% at 0.1, 0.06% at 1)
    ids32, _ = ops.moge_route(logits, scale, G)
    assert 0 < (ids32 != ids).mean() < 0.05


def _vllm_ascend_moe(x, gate_w, scale, experts, shared, G):
    """The vllm-ascend MoGE path transcribed: bf16 softmax router, tokens sorted by expert,
    gate/up, SwiGLU, scaled by the routing weight, down, unsorted, reshape(T, K, H).sum(1)
    (float32 accumulation, one rounding), plus the shared expert."""
    dt = x.dtype
    T, K = x.shape[0], G
    ids, w = ops.moge_route(ops.linear(x, gate_w), scale, G, softmax_dtype="activation")
    acc = np.float64 if dt == np.float64 else np.float32
    rows = np.zeros((T, K, x.shape[1]), acc)
    for e in np.unique(ids):
        tok, k = np.nonzero(ids == e)
        wg, wu, wd = experts[int(e)]
        act = ops.silu_and_mul(ops.linear(x[tok], wg), ops.linear(x[tok], wu))
        act = round_to(to_accum(act) * to_accum(w[tok, k].astype(dt))[:, None], dt).astype(dt)
        rows[tok, k] = to_accum(ops.linear(act, wd))
    routed = np.zeros((T, x.shape[1]), acc)
    for k in range(K):
        routed = routed + rows[:, k]
    routed = routed.astype(dt)
    return round_to(to_accum(routed) + to_accum(ops.swiglu(x, *shared)), dt).astype(dt)


@pytest.mark.parametrize("mode", MODES)
def test_before_down_block_is_the_serving_formula(mode):
    rng = np.random.default_rng(1)
    dt = storage_dtype(mode)
    T, H, E, G, I = 40, 32, 16, 4, 8
    x = rng.standard_normal((T, H)).astype(dt)
    gate_w = (rng.standard_normal((E, H)) * 0.3).astype(dt)
    scale = rng.uniform(0.5, 1.5, (1, E)).astype(dt)
    experts = [tuple((rng.standard_normal(s) * 0.2).astype(dt) for s in ((I, H), (I, H), (H, I)))
               for _ in range(E)]
    shared = tuple((rng.standard_normal(s) * 0.2).astype(dt) for s in ((I, H), (I, H), (H, I)))
    got = ops.moe_block(x, gate_w, scale, experts, shared, G, router_softmax_dtype="activation",
                        weight_point="before_down")
    want = _vllm_ascend_moe(x, gate_w, scale, experts, shared, G)
    np.testing.assert_array_equal(bits(got), bits(want))
    from refimpl import kernels as K

    fast = K.moe_block(x, gate_w, scale, experts, shared, G, router_softmax_dtype="activation",
                       weight_point="before_down")
    # the Numba stages: the spec's routing; sums in another order (tests/test_kernels.py
    # checks them bit for bit on exact inputs)
    tol = {"fp64": 1e-13, "fp32": 2e-6, "bf16": 1e-2, "fp16": 2e-3}[mode]
    scale_ref = np.abs(got.astype(np.float64)).max()
    assert np.abs(fast.astype(np.float64) - got.astype(np.float64)).max() <= tol * scale_ref
    hf = ops.moe_block(x, gate_w, scale, experts, shared, G)
    if mode in ("bf16", "fp16"):
        assert not np.array_equal(bits(hf), bits(got))


@pytest.mark.parametrize("mode", MODES)
def test_fused_residual_rounding_is_bit_identical_to_hf(mode):
    c = preset("tiny-moge")
    fused = ModelConfig.from_hf_dict({**c.to_hf_dict(), "refimpl_residual_rounding":
                                      "fused_add_norm"})
    ids = np.arange(1, 30)
    a = refimpl.init_model(c, seed=2, numerics=mode).forward(ids)
    b = refimpl.init_model(fused, seed=2, numerics=mode).forward(ids)
    np.testing.assert_array_equal(bits(a), bits(b))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_vllm_ascend_profile_runs_end_to_end(backend):
    c = preset("tiny-moge").with_conventions("vllm-ascend")
    m = refimpl.init_model(c, seed=0, numerics="bf16", backend=backend)
    logits = m.forward(np.arange(1, 20))
    ref = refimpl.init_model(c, seed=0, numerics="bf16").forward(np.arange(1, 20))
    err = np.max(np.abs(logits.astype(float) - ref.astype(float))) / np.max(np.abs(ref.astype(
        float)))
    assert err < 5e-2, err       # the model tolerance of tests/test_kernels.py (bf16)
    hf = refimpl.init_model(preset("tiny-moge"), seed=0, numerics="bf16").forward(
        np.arange(1, 20))
    assert not np.array_equal(bits(hf), bits(logits))
    cache = m.new_cache()
    m.forward(np.arange(1, 19), cache)
    np.testing.assert_array_equal(bits(m.forward(np.array([19]), cache)), bits(logits[-1:]))


def test_conventions_on_the_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REFIMPL_DEBUG"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "refimpl", *map(str, args)],
                              capture_output=True, text=True, timeout=600, env=env)

    r = cli("run", "--conventions", "vllm-ascend", "--model", "tiny-moge", "--token-ids",
            "1,2,3", "--numerics", "bf16", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    r = cli("info", "--model", "tiny-moge", "--conventions", "vllm-ascend", "--json")
    assert json.loads(r.stdout)["config"]["refimpl_conventions"] == "vllm-ascend"
    r = cli("golden", "--model", "tiny-moge", "--token-ids", "1,2,3", "--layers", "0",
            "--conventions", "vllm-ascend", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "tiny-moge-layer0-vllm-ascend-bf16" / "manifest.json").read_text())
    assert m["source"]["config"]["refimpl_conventions"] == "vllm-ascend"
    assert "--conventions vllm-ascend" in m["command"]
    r = cli("golden", "--preset", "tiny-moge", "--ops", "moe", "--conventions", "vllm-ascend",
            "--out", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "p" / "tiny-moge-moe-vllm-ascend-bf16" / "manifest.json").read_text())
    assert m["source"]["config"]["refimpl_moe_weight_point"] == "before_down"
    r = cli("run", "--conventions", "tgi", "--model", "tiny-moge")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
