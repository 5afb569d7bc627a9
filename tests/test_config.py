"""Config reading, validation and presets."""

import json

import pytest

from refimpl.config import (PRESET_NAMES, ModelConfig, parameter_count, preset,
                            weight_shapes)
from refimpl.errors import ConfigError

EMBEDDED_1B_JSON = {  # the published config.json fields of openPangu-Embedded-1B
    "architectures": ["PanguEmbeddedForCausalLM"], "model_type": "PanguEmbedded",
    "hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": 26,
    "num_attention_heads": 12, "num_key_value_heads": 6, "rms_norm_eps": 1e-5,
    "rope_theta": 4000000.0, "max_position_embeddings": 32768, "vocab_size": 153376,
    "tie_word_embeddings": True, "bias": True, "hidden_act": "silu", "bos_token_id": 1,
    "pad_token_id": 0, "eos_token_id": 45892, "torch_dtype": "bfloat16",
}


def test_embedded_1b_json_matches_preset():
    cfg = ModelConfig.from_hf_dict(EMBEDDED_1B_JSON)
    assert cfg.head_dim == 128  # absent: hidden_size / num_attention_heads
    assert cfg == preset("embedded-1b")
    assert cfg.kv_group_size == 2


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_round_trip_through_hf_dict(name, tmp_path):
    cfg = preset(name)
    path = tmp_path / "config.json"
    cfg.to_json(str(path))
    assert ModelConfig.from_json(str(path)) == cfg
    d = json.loads(path.read_text())
    assert d["model_type"] in ("PanguEmbedded", "PanguProMoE")


def test_parameter_counts_of_the_real_models():
    assert parameter_count(preset("embedded-1b")) == pytest.approx(1.156e9, rel=1e-3)
    moe = preset("pro-moe-72b")
    assert parameter_count(moe) == pytest.approx(72.0e9, rel=1e-3)
    assert parameter_count(moe, active=True) == pytest.approx(16.5e9, rel=1e-2)


def test_family_from_architectures_and_moe_theta_default():
    d = {"architectures": ["PanguProMoEForCausalLM"], "hidden_size": 64,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 100, "num_experts": 8, "num_experts_per_tok": 4,
         "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
         "eos_token_id": 2}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.is_moge and cfg.num_groups == 4 and cfg.experts_per_group == 2
    assert cfg.rope_theta == 16_000_000.0


def test_tied_embeddings_have_no_lm_head_and_moe_names():
    assert "lm_head.weight" not in weight_shapes(preset("embedded-1b"))
    shapes = weight_shapes(preset("pro-moe-72b", num_hidden_layers=1))
    assert shapes["model.layers.0.mlp.router_scale"] == (1, 64)
    assert shapes["model.layers.0.mlp.experts.63.down_proj.weight"] == (5120, 1344)
    assert shapes["model.layers.0.mlp.shared_expert.gate_proj.weight"] == (5376, 5120)
    assert shapes["model.layers.0.self_attn.o_proj.bias"] == (5120,)


def test_mlp_only_layers_are_dense():
    cfg = preset("tiny-moge", mlp_only_layers=[0], intermediate_size=96)
    shapes = weight_shapes(cfg)
    assert "model.layers.0.mlp.gate_proj.weight" in shapes
    assert "model.layers.1.mlp.gate.weight" in shapes


@pytest.mark.parametrize("change, field", [
    (dict(num_attention_heads=5, head_dim=None), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_experts=10), "num_experts_per_tok"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(eos_token_id=10_000), "eos_token_id"),
    (dict(rope_angles="float16"), "refimpl_rope_angles"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mlp_only_layers=[7]), "mlp_only_layers"),
])
def test_invalid_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        preset("tiny-moge", **change)


def test_missing_field_and_unknown_family_and_preset():
    d = dict(EMBEDDED_1B_JSON)
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="'hidden_size': missing"):
        ModelConfig.from_hf_dict(d)
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf_dict({**EMBEDDED_1B_JSON, "model_type": "llama",
                                  "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        preset("nope")


def test_unreadable_config_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(str(bad))
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_json(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("field, value", [
    ("max_position_embeddings", "32768"), ("hidden_size", 1536.0), ("num_hidden_layers", True),
    ("intermediate_size", "6144"), ("head_dim", 12.5), ("rms_norm_eps", "1e-5"),
    ("rope_theta", "4e6"), ("rope_theta", float("nan")),
    ("tie_word_embeddings", "true"), ("tie_word_embeddings", 1), ("bias", 0),
    ("attention_bias", "yes"), ("hidden_act", 3), ("torch_dtype", "int8"),
    ("bos_token_id", "1"), ("eos_token_id", [45892, "x"]), ("eos_token_id", []),
    ("pad_token_id", 0.5), ("refimpl_rope_angles", 32),
])
def test_every_config_field_is_type_checked(field, value):
    """A value of the wrong type is one ConfigError naming the field (a string
    max_position_embeddings was an internal TypeError before)."""
    d = {k: v for k, v in EMBEDDED_1B_JSON.items() if not (field == "attention_bias"
                                                            and k == "bias")}
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
        ModelConfig.from_hf_dict({**d, field: value})


def test_moe_fields_are_type_checked():
    d = preset("tiny-moge").to_hf_dict()
    for field, value in (("num_experts", "12"), ("moe_intermediate_size", 32.0),
                         ("num_experts_per_tok", False), ("mlp_only_layers", 0),
                         ("mlp_only_layers", ["0"])):
        with pytest.raises(ConfigError, match=f"config field '{field}'"):
            ModelConfig.from_hf_dict({**d, field: value})


@pytest.mark.parametrize("field, value", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("sliding_window", 4096), ("use_sliding_window", True), ("qk_norm", True),
    ("use_qk_norm", True), ("qk_layernorm", True), ("attn_logit_softcapping", 50.0),
    ("final_logit_softcapping", 30.0), ("mlp_bias", True), ("partial_rotary_factor", 0.5),
])
def test_fields_that_would_change_the_math_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"config field '{field}'.*does not implement"):
        ModelConfig.from_hf_dict({**EMBEDDED_1B_JSON, field: value})


@pytest.mark.parametrize("extra", [
    {"rope_scaling": None}, {"rope_scaling": {"rope_type": "default"}},
    {"sliding_window": None}, {"sliding_window": 4096, "use_sliding_window": False},
    {"qk_norm": False}, {"attn_logit_softcapping": None}, {"mlp_bias": False},
    {"partial_rotary_factor": 1.0}, {"attention_bias": True},
])
def test_neutral_values_of_those_fields_are_accepted(extra):
    d = {k: v for k, v in EMBEDDED_1B_JSON.items() if k != "bias"}
    assert ModelConfig.from_hf_dict({**d, **extra}) == preset("embedded-1b")


def test_an_eos_list_keeps_every_id():
    c = ModelConfig.from_hf_dict({**EMBEDDED_1B_JSON, "eos_token_id": [45892, 45893, 2]})
    assert c.eos_token_ids == (45892, 45893, 2)
    assert c.to_hf_dict()["eos_token_id"] == [45892, 45893, 2]
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    with pytest.raises(ConfigError, match="'eos_token_id': 160000 is outside"):
        ModelConfig.from_hf_dict({**EMBEDDED_1B_JSON, "eos_token_id": [45892, 160000]})


def test_generation_stops_at_any_eos_id():
    import numpy as np

    import refimpl

    model = refimpl.init_model("tiny-dense", seed=0)
    free = list(refimpl.generate(model, [1, 2, 3], max_new_tokens=6, stop_at_eos=False))
    stop = free[2]
    model.config = model.config.replace(eos_token_id=(250, stop))
    assert list(refimpl.generate(model, [1, 2, 3], max_new_tokens=6)) == free[:free.index(stop) + 1]
    assert np.isfinite(stop)
