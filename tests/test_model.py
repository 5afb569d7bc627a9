"""The model: cached decoding, numerics modes, taps, random init, weight checks, generation."""

import numpy as np
import pytest

import refimpl
from refimpl import ops
from refimpl.config import preset, weight_shapes
from refimpl.errors import CheckpointError, InputError
from refimpl.random_init import random_weights

from .conftest import rel_err

FAMILIES = ["tiny-dense", "tiny-moge"]
IDS = np.array([1, 17, 42, 99, 3, 200, 7, 7, 150, 31, 64])

# prefill vs cached decode: same math on different row blocks; BLAS may sum in another order
CACHE_TOL = {"fp64": 1e-12, "fp32": 1e-5, "bf16": 3e-2, "fp16": 4e-3}
# each mode against fp64, relative to the logit scale
MODE_TOL = {"fp32": 1e-5, "bf16": 5e-2, "fp16": 8e-3}


@pytest.fixture(scope="module", params=FAMILIES)
def models(request):
    """The same seeded weights in every numerics mode."""
    return {mode: refimpl.init_model(request.param, seed=3, numerics=mode)
            for mode in ("fp64", "fp32", "bf16", "fp16")}


@pytest.mark.parametrize("mode", ["fp64", "fp32", "bf16", "fp16"])
def test_prefill_then_cached_decode_equals_full_forward(models, mode):
    model = models[mode]
    full = model.forward(IDS)
    cache = model.new_cache(capacity=2)  # forces the cache to grow
    parts = [model.forward(IDS[:5], cache)]
    for t in range(5, len(IDS)):
        parts.append(model.forward(IDS[t:t + 1], cache))
    assert cache.length == len(IDS)
    assert rel_err(np.concatenate(parts), full) < CACHE_TOL[mode]
    assert rel_err(model.forward(IDS, last_only=True), full[-1:]) < CACHE_TOL[mode]


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16"])
def test_numerics_modes_agree_to_their_precision(models, mode):
    ref = models["fp64"].forward(IDS)
    assert rel_err(models[mode].forward(IDS), ref) < MODE_TOL[mode]


def test_bf16_is_not_fp32(models):
    """The half modes really round: their logits differ from fp32 by more than fp32 noise."""
    assert rel_err(models["bf16"].forward(IDS), models["fp32"].forward(IDS)) > 1e-4


def test_logits_dtype_and_shape(models):
    for mode, model in models.items():
        logits = model.forward(IDS[:4])
        assert logits.shape == (4, model.config.vocab_size)
        assert logits.dtype == refimpl.numerics.storage_dtype(mode)


def test_taps_capture_every_boundary_and_chain(models):
    model = models["fp32"]
    taps = refimpl.Taps()
    logits = model.forward(IDS, taps=taps)
    c = model.config
    np.testing.assert_array_equal(taps["logits"], logits)
    np.testing.assert_array_equal(taps["layers.0.input"], taps["embed"])
    for i in range(c.num_hidden_layers):
        for name in ("input_norm", "q", "k", "v", "q_rope", "k_rope", "attn", "attn_out",
                     "resid_mid", "post_norm", "mlp_out", "out"):
            assert f"layers.{i}.{name}" in taps
        if i + 1 < c.num_hidden_layers:
            np.testing.assert_array_equal(taps[f"layers.{i}.out"], taps[f"layers.{i + 1}.input"])
        # the recorded boundaries recompose: out = resid_mid + mlp_out
        np.testing.assert_array_equal(
            taps[f"layers.{i}.out"], ops.add(taps[f"layers.{i}.resid_mid"],
                                             taps[f"layers.{i}.mlp_out"]))
    assert taps["layers.0.q"].shape == (len(IDS), c.num_attention_heads, c.head_dim)
    if c.is_moge:
        assert taps["layers.1.expert_ids"].shape == (len(IDS), c.num_groups)
        assert taps["layers.1.router_logits"].shape == (len(IDS), c.num_experts)
        e = int(taps["layers.1.expert_ids"][0, 0])
        assert f"layers.1.experts.{e}.in" in taps
    only = refimpl.Taps(layers=[1])
    model.forward(IDS, taps=only)
    assert "layers.1.out" in only and "layers.0.out" not in only and "logits" in only


def test_init_is_seeded_and_fewer_layers_keep_the_first_layers():
    a = random_weights(preset("tiny-moge"), seed=5)
    b = random_weights(preset("tiny-moge"), seed=5)
    c = random_weights(preset("tiny-moge"), seed=6)
    two = random_weights(preset("tiny-moge", num_hidden_layers=2), seed=5)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a[name], c[name])
    np.testing.assert_array_equal(a[name], two[name])


def test_realistic_scales():
    w = random_weights(preset("tiny-moge"), seed=0)
    scale = w["model.layers.0.mlp.router_scale"]
    assert scale.min() >= 0.5 and scale.max() <= 1.5
    assert abs(float(np.mean(w["model.norm.weight"])) - 1.0) < 0.1
    assert np.std(w["model.layers.0.self_attn.q_proj.bias"]) > 0.01


def test_tied_embeddings_serve_as_lm_head():
    model = refimpl.init_model("tiny-dense", numerics="fp64")
    assert "lm_head.weight" not in model.weights
    taps = refimpl.Taps()
    logits = model.forward(IDS[:3], taps=taps)
    np.testing.assert_allclose(logits, taps["final_norm"] @ model.w("model.embed_tokens.weight").T,
                               rtol=1e-12)


def test_weight_checks_name_the_problem():
    cfg = preset("tiny-dense")
    w = random_weights(cfg)
    missing = dict(w)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="missing tensors.*layers.1.mlp.up_proj"):
        refimpl.Model(cfg, missing)
    extra = {**w, "model.layers.9.mlp.up_proj.weight": w["model.norm.weight"]}
    with pytest.raises(CheckpointError, match="unexpected tensors.*layers.9"):
        refimpl.Model(cfg, extra)
    bad = {**w, "model.norm.weight": np.ones(63, np.float32)}
    with pytest.raises(CheckpointError, match=r"model.norm.weight: expected shape \[64\], found \[63\]"):
        refimpl.Model(cfg, bad)
    assert set(w) == set(weight_shapes(cfg))


def test_token_ids_are_checked():
    model = refimpl.init_model("tiny-dense")
    with pytest.raises(InputError, match="token id 257 is outside the vocabulary"):
        model.forward([1, 257])
    with pytest.raises(InputError, match="non-empty"):
        model.forward([])
    with pytest.raises(InputError, match="max_position_embeddings"):
        model.forward(np.ones(513, dtype=np.int64))


def test_generation_greedy_sampled_and_eos():
    model = refimpl.init_model("tiny-moge", numerics="fp32")
    greedy = list(refimpl.generate(model, [1, 5, 9], max_new_tokens=6, stop_at_eos=False))
    assert len(greedy) == 6
    # greedy generation equals repeated argmax over a full forward
    seq = [1, 5, 9]
    for _ in range(6):
        seq.append(int(np.argmax(model.forward(seq)[-1])))
    assert greedy == seq[3:]
    # the generator runs no forward after the last token
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        assert len(list(refimpl.generate(model, [1, 5], max_new_tokens=3, stop_at_eos=False))) == 3
    finally:
        del model.forward
    assert len(calls) == 3  # the prefill and two decode steps
    eos = greedy[-1]
    stop = list(refimpl.generate(model, [1, 5, 9], max_new_tokens=6, eos_id=eos))
    assert stop == greedy[:greedy.index(eos) + 1]
    s1 = list(refimpl.generate(model, [1, 5], 8, temperature=1.0, top_p=0.9, seed=4,
                               stop_at_eos=False))
    s2 = list(refimpl.generate(model, [1, 5], 8, temperature=1.0, top_p=0.9, seed=4,
                               stop_at_eos=False))
    assert s1 == s2


def test_unknown_numerics_and_backend():
    from refimpl.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown numerics mode 'fp8'"):
        refimpl.init_model("tiny-dense", numerics="fp8")
    with pytest.raises(ConfigError, match="unknown backend 'cuda'"):
        refimpl.init_model("tiny-dense", backend="cuda")


@pytest.mark.slow
def test_embedded_1b_runs_at_real_shape_in_bf16():
    """Embedded-1B with seeded random weights fits this machine in bf16 numerics and runs."""
    model = refimpl.init_model("embedded-1b", seed=0, numerics="bf16")
    total = sum(w.nbytes for w in model.weights.values())
    assert total == 2 * refimpl.parameter_count(model.config)
    cache = model.new_cache()
    logits = model.forward(np.array([1, 100, 2000, 30000]), cache, last_only=True)
    assert logits.shape == (1, 153376) and np.all(np.isfinite(logits.astype(np.float32)))
    step = model.forward(np.array([45892]), cache, last_only=True)
    assert np.all(np.isfinite(step.astype(np.float32)))


def test_load_model_is_at_the_top_level():
    import refimpl.io.checkpoint

    assert refimpl.load_model is refimpl.io.checkpoint.load_model
    model = refimpl.load_model(refimpl.io.checkpoint.DEFAULT_MODEL_DIR, numerics="bf16",
                               backend="numpy")
    assert model.numerics == "bf16" and model.config.family == "dense"
