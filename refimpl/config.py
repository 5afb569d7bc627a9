"""Model configuration: read, validate and write Hugging Face `config.json` of both families.

Two families share one config type:

* ``dense``: openPangu-Embedded (``model_type`` ``PanguEmbedded``), a Llama-shaped decoder.
* ``moge``: Pangu Pro MoE v1 (``model_type`` ``PanguProMoE``), the same attention with a
  Mixture of Grouped Experts MLP in every layer (except those in ``mlp_only_layers``).

Switches for facts MODEL-SPEC marks *uncertain*, or that have two conventions:

* ``rope_angles``: ``"exact"`` (default) computes RoPE angles ``position * inv_freq`` in
  float64 and rounds cos/sin once; ``"float32"`` reproduces Hugging Face's recipe (inv_freq
  and angle in float32), which drifts by ~1e-3 rad at position 30000.
* ``rope_theta`` of Pro-MoE defaults to 1.6e7 (taken from the configuration class defaults).
* The numerics conventions where Hugging Face eager and the vllm-ascend serving path differ
  (DEPLOYMENT.md section 1), each a switch whose default is Hugging Face's:
  ``router_softmax_dtype`` (``float32`` | ``activation``), ``moe_weight_point``
  (``after_down`` | ``before_down``), ``residual_rounding`` (``hf`` | ``fused_add_norm``).
  A profile sets them together: ``refimpl_conventions`` in config.json (or ``--conventions``
  on the command line) is ``hf`` or ``vllm-ascend`` (CONVENTION_PROFILES); an individual
  ``refimpl_*`` key given beside it wins, and the config then reports ``custom``.
* ``router`` (MoGE only): ``moge`` (default: one expert per group, its argmax) or
  ``moge_voted``, the 300I Duo deployment's batch-dependent router that keeps per group only
  the ``num_voted_experts`` (default 5, vllm-ascend's value there) experts the batch chose
  most (``refimpl.ops.moge_vote``). Not part of a profile.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from .errors import ConfigError

DENSE = "dense"
MOGE = "moge"

_FAMILY_BY_MODEL_TYPE = {"PanguEmbedded": DENSE, "PanguProMoE": MOGE}
_MODEL_TYPE_BY_FAMILY = {DENSE: "PanguEmbedded", MOGE: "PanguProMoE"}
_ARCH_BY_FAMILY = {DENSE: "PanguEmbeddedForCausalLM", MOGE: "PanguProMoEForCausalLM"}
_FAMILY_BY_ARCH = {arch: fam for fam, arch in _ARCH_BY_FAMILY.items()}
ROPE_ANGLE_MODES = ("exact", "float32")
#: profile name -> its switches (the first is the default)
CONVENTION_PROFILES = {
    "hf": {"router_softmax_dtype": "float32", "moe_weight_point": "after_down",
           "residual_rounding": "hf"},
    "vllm-ascend": {"router_softmax_dtype": "activation", "moe_weight_point": "before_down",
                    "residual_rounding": "fused_add_norm"},
}
CONVENTION_CHOICES = {"router_softmax_dtype": ("float32", "activation"),
                      "moe_weight_point": ("after_down", "before_down"),
                      "residual_rounding": ("hf", "fused_add_norm")}
#: the refimpl switches: dataclass fields written as refimpl_<name> in config.json
SWITCHES = ("rope_angles",) + tuple(CONVENTION_CHOICES)
ROUTERS = ("moge", "moge_voted")
#: the MoGE-only refimpl switches, written as refimpl_<name> for MoGE configs
MOGE_SWITCHES = ("router", "num_voted_experts")
_TORCH_DTYPES = ("bfloat16", "float16", "float32", "float64")
#: dataclass field -> its config.json name where they differ
_HF_NAME = {name: f"refimpl_{name}" for name in SWITCHES + MOGE_SWITCHES}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _default_rope_scaling(v) -> bool:
    return v is None or (isinstance(v, dict) and
                         v.get("rope_type", v.get("type")) in ("default", None) and
                         set(v) <= {"rope_type", "type"})


#: config.json fields that would change the math and that refimpl does not implement:
#: field -> (what it is, whether a value leaves the math as refimpl computes it)
UNIMPLEMENTED_FIELDS = {
    "rope_scaling": ("RoPE scaling (linear, dynamic NTK, YaRN, ...)", _default_rope_scaling),
    "sliding_window": ("sliding-window attention", lambda v, d: v is None
                       or d.get("use_sliding_window") is False),
    "use_sliding_window": ("sliding-window attention", lambda v: v is False or v is None),
    "qk_norm": ("QK-norm", lambda v: not v),
    "use_qk_norm": ("QK-norm", lambda v: not v),
    "qk_layernorm": ("QK-norm", lambda v: not v),
    "attn_logit_softcapping": ("attention logit soft-capping", lambda v: v is None),
    "final_logit_softcapping": ("final logit soft-capping", lambda v: v is None),
    "mlp_bias": ("MLP biases", lambda v: v is False or v is None),
    "partial_rotary_factor": ("partial RoPE", lambda v: v is None or v == 1),
}


def _refuse_unimplemented(d: dict) -> None:
    """ConfigError for the first config.json field that would change the math but is not
    implemented (silently ignoring it would give numbers for another model)."""
    for name, (what, neutral) in UNIMPLEMENTED_FIELDS.items():
        if name not in d:
            continue
        value = d[name]
        ok = neutral(value, d) if neutral.__code__.co_argcount == 2 else neutral(value)
        if not ok:
            raise ConfigError(f"config field '{name}': {value!r} asks for {what}, which refimpl "
                              "does not implement (remove it or set it to null to run the "
                              "model without it)")


@dataclass(frozen=True)
class ModelConfig:
    """Every field of MODEL-SPEC for both families; MoE fields are None for dense models."""

    family: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    intermediate_size: int | None = None
    head_dim: int | None = None  # None in config.json means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 4_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bias: bool = True  # q, k, v and o projections carry a bias
    hidden_act: str = "silu"
    bos_token_id: int = 1
    pad_token_id: int = 0
    eos_token_id: int | tuple = 45892  # one id, or a tuple when config.json lists several
    torch_dtype: str = "bfloat16"
    # Pro-MoE (MoGE) fields
    num_experts: int | None = None
    num_experts_per_tok: int | None = None  # = number of groups, one expert per group
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    mlp_only_layers: tuple = ()
    # refimpl switches (not in the Hugging Face config; written under "refimpl_" keys)
    rope_angles: str = "exact"
    router_softmax_dtype: str = "float32"
    moe_weight_point: str = "after_down"
    residual_rounding: str = "hf"
    router: str = "moge"
    num_voted_experts: int = 5

    @property
    def voted_experts(self):
        """num_voted_experts when the router is moge_voted, else None (plain MoGE)."""
        return self.num_voted_experts if self.router == "moge_voted" else None

    @property
    def conventions(self) -> str:
        """The profile whose switches these are ("hf", "vllm-ascend"), else "custom"."""
        for name, switches in CONVENTION_PROFILES.items():
            if all(getattr(self, k) == v for k, v in switches.items()):
                return name
        return "custom"

    def with_conventions(self, profile: str) -> "ModelConfig":
        """This config under a named profile (CONVENTION_PROFILES)."""
        if profile not in CONVENTION_PROFILES:
            raise ConfigError(f"conventions {profile!r}: choose one of "
                              f"{', '.join(CONVENTION_PROFILES)}")
        return dataclasses.replace(self, **CONVENTION_PROFILES[profile])

    def __post_init__(self):
        if self.head_dim is None and _is_int(self.hidden_size) and \
                _is_int(self.num_attention_heads):
            if self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
                object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.mlp_only_layers, (list, tuple)) or not self.mlp_only_layers:
            object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers or ()))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def is_moge(self) -> bool:
        return self.family == MOGE

    @property
    def num_groups(self) -> int:
        """MoGE groups = num_experts_per_tok (one expert is chosen from each group)."""
        return self.num_experts_per_tok

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_experts_per_tok

    @property
    def kv_group_size(self) -> int:
        """Query heads per KV head: query head h reads KV head h // kv_group_size."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple:
        """Every end-of-sequence id (config.json may list several; generation stops at any)."""
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (tuple, list)) else (eos,)

    def layer_is_moe(self, layer: int) -> bool:
        return self.is_moge and layer not in self.mlp_only_layers

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first field that is missing or inconsistent."""

        def need(cond, fieldname, msg):
            if not cond:
                raise ConfigError(f"config field '{fieldname}': {msg}")

        need(self.family in (DENSE, MOGE), "model_type", f"unknown family {self.family!r}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            need(_is_int(value) and value > 0, name, f"must be a positive integer, got {value!r}")
        for name in ("intermediate_size", "head_dim", "num_experts", "num_experts_per_tok",
                     "moe_intermediate_size", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            need(value is None or (_is_int(value) and value > 0), name,
                 f"must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            need(_is_number(value) and math.isfinite(value), name,
                 f"must be a finite number, got {value!r}")
        for name in ("tie_word_embeddings", "bias"):
            value = getattr(self, name)
            need(isinstance(value, bool), _HF_NAME.get(name, name),
                 f"must be true or false, got {value!r}")
        for name in ("hidden_act", "torch_dtype") + SWITCHES:
            value = getattr(self, name)
            need(isinstance(value, str), _HF_NAME.get(name, name),
                 f"must be a string, got {value!r}")
        need(self.torch_dtype in _TORCH_DTYPES, "torch_dtype",
             f"must be one of {', '.join(_TORCH_DTYPES)}, got {self.torch_dtype!r}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            need(value is None or _is_int(value), name,
                 f"must be an integer token id, got {value!r}")
        eos = self.eos_token_ids
        need(all(_is_int(v) for v in eos) and (eos or self.eos_token_id is None),
             "eos_token_id", f"must be a token id or a non-empty list of them, got "
                             f"{self.eos_token_id!r}")
        need(all(_is_int(v) for v in self.mlp_only_layers), "mlp_only_layers",
             f"must be a list of layer indices, got {list(self.mlp_only_layers)!r}")
        need(self.hidden_size % self.num_attention_heads == 0 or self.head_dim is not None,
             "num_attention_heads",
             f"{self.num_attention_heads} does not divide hidden_size {self.hidden_size}"
             " and head_dim is not given")
        need(isinstance(self.head_dim, int) and self.head_dim > 0 and self.head_dim % 2 == 0,
             "head_dim", f"must be a positive even integer (RoPE rotates pairs), got {self.head_dim!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"{self.num_key_value_heads} does not divide num_attention_heads "
             f"{self.num_attention_heads}")
        need(isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0,
             "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps!r}")
        need(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1, "rope_theta",
             f"must be > 1, got {self.rope_theta!r}")
        need(self.hidden_act == "silu", "hidden_act",
             f"only 'silu' is specified, got {self.hidden_act!r}")
        need(self.rope_angles in ROPE_ANGLE_MODES, "refimpl_rope_angles",
             f"must be one of {ROPE_ANGLE_MODES}, got {self.rope_angles!r}")
        for name, choices in CONVENTION_CHOICES.items():
            need(getattr(self, name) in choices, _HF_NAME[name],
                 f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name, values in (("bos_token_id", [self.bos_token_id]),
                             ("eos_token_id", self.eos_token_ids),
                             ("pad_token_id", [self.pad_token_id])):
            for value in values:
                need(value is None or 0 <= value < self.vocab_size, name,
                     f"{value} is outside the vocabulary [0, {self.vocab_size})")
        dense_layers = [i for i in range(self.num_hidden_layers) if not self.layer_is_moe(i)]
        if dense_layers:
            need(isinstance(self.intermediate_size, int) and self.intermediate_size > 0,
                 "intermediate_size", f"must be a positive integer, got {self.intermediate_size!r}")
        if self.is_moge:
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                         "shared_expert_intermediate_size"):
                value = getattr(self, name)
                need(isinstance(value, int) and value > 0, name,
                     f"must be a positive integer for a MoGE model, got {value!r}")
            need(self.num_experts % self.num_experts_per_tok == 0, "num_experts_per_tok",
                 f"the {self.num_experts} experts do not divide into {self.num_experts_per_tok}"
                 " equal groups")
            need(self.router in ROUTERS, "refimpl_router",
                 f"must be one of {', '.join(ROUTERS)}, got {self.router!r}")
            need(_is_int(self.num_voted_experts) and self.num_voted_experts >= 1,
                 "refimpl_num_voted_experts", f"must be a positive integer (at least the "
                 f"experts per group keeps them all), got {self.num_voted_experts!r}")
            for layer in self.mlp_only_layers:
                need(isinstance(layer, int) and 0 <= layer < self.num_hidden_layers,
                     "mlp_only_layers", f"layer {layer!r} is not in [0, {self.num_hidden_layers})")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict; family from model_type/architectures."""
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        family = _FAMILY_BY_MODEL_TYPE.get(d.get("model_type"))
        if family is None:
            for arch in d.get("architectures") or ():
                family = _FAMILY_BY_ARCH.get(arch)
                if family:
                    break
        if family is None:
            raise ConfigError(
                f"config field 'model_type': {d.get('model_type')!r} (architectures "
                f"{d.get('architectures')!r}) is not PanguEmbedded or PanguProMoE")
        names = {f.name for f in dataclasses.fields(cls)} - {"family", *SWITCHES,
                                                             *MOGE_SWITCHES}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
        for name in required:
            if name not in kwargs:
                raise ConfigError(f"config field '{name}': missing")
        kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
        _refuse_unimplemented(d)
        if "attention_bias" in d and not isinstance(d["attention_bias"], bool):
            raise ConfigError(f"config field 'attention_bias': must be true or false, got "
                              f"{d['attention_bias']!r}")
        if "attention_bias" in d and "bias" not in d:
            kwargs["bias"] = d["attention_bias"]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        if isinstance(kwargs.get("mlp_only_layers"), list):
            kwargs["mlp_only_layers"] = tuple(kwargs["mlp_only_layers"])
        elif "mlp_only_layers" in kwargs:
            raise ConfigError(f"config field 'mlp_only_layers': must be a list of layer "
                              f"indices, got {kwargs['mlp_only_layers']!r}")
        if family == MOGE and "rope_theta" not in d:
            kwargs["rope_theta"] = 16_000_000.0
        if "refimpl_conventions" in d:
            profile = d["refimpl_conventions"]
            if not isinstance(profile, str) or profile not in CONVENTION_PROFILES:
                raise ConfigError(f"config field 'refimpl_conventions': must be one of "
                                  f"{', '.join(CONVENTION_PROFILES)}, got {profile!r}")
            kwargs.update(CONVENTION_PROFILES[profile])
        for name in SWITCHES + (MOGE_SWITCHES if family == MOGE else ()):
            if _HF_NAME[name] in d:
                kwargs[name] = d[_HF_NAME[name]]
        for name in ("rms_norm_eps", "rope_theta"):
            if name in kwargs and _is_int(kwargs[name]):
                kwargs[name] = float(kwargs[name])
        try:
            return cls(family=family, **kwargs)
        except TypeError as exc:  # pragma: no cover - defensive
            raise ConfigError(f"config.json: {exc}") from None

    def to_hf_dict(self) -> dict:
        """The Hugging Face config.json dict of this config (refimpl switches as refimpl_*)."""
        d = {"architectures": [_ARCH_BY_FAMILY[self.family]],
             "model_type": _MODEL_TYPE_BY_FAMILY[self.family]}
        for f in dataclasses.fields(self):
            if f.name == "family" or f.name in SWITCHES + MOGE_SWITCHES:
                continue
            value = getattr(self, f.name)
            if value is None or (f.name == "mlp_only_layers" and not self.is_moge):
                continue
            d[f.name] = list(value) if isinstance(value, tuple) else value
        for name in SWITCHES + (MOGE_SWITCHES if self.is_moge else ()):
            d[_HF_NAME[name]] = getattr(self, name)
        if self.conventions != "custom":
            d["refimpl_conventions"] = self.conventions
        return d

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_hf_dict(d)

    def to_json(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_hf_dict(), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- weight layout
def weight_shapes(config: ModelConfig) -> dict:
    """Every tensor name of the Hugging Face checkpoint -> its shape, in checkpoint order.

    Linear weights are stored [out_features, in_features]. ``lm_head.weight`` is absent when
    the embeddings are tied.
    """
    c = config
    H, D = c.hidden_size, c.head_dim
    q_out, kv_out = c.num_attention_heads * D, c.num_key_value_heads * D
    shapes = {"model.embed_tokens.weight": (c.vocab_size, H)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        for name, out_features in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (out_features, H)
            if c.bias:
                shapes[p + f"self_attn.{name}_proj.bias"] = (out_features,)
        shapes[p + "self_attn.o_proj.weight"] = (H, q_out)
        if c.bias:
            shapes[p + "self_attn.o_proj.bias"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        if c.layer_is_moe(i):
            shapes[p + "mlp.gate.weight"] = (c.num_experts, H)
            shapes[p + "mlp.router_scale"] = (1, c.num_experts)
            for e in range(c.num_experts):
                shapes.update(_swiglu_shapes(p + f"mlp.experts.{e}.", H, c.moe_intermediate_size))
            shapes.update(_swiglu_shapes(p + "mlp.shared_expert.", H,
                                         c.shared_expert_intermediate_size))
        else:
            shapes.update(_swiglu_shapes(p + "mlp.", H, c.intermediate_size))
    shapes["model.norm.weight"] = (H,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, H)
    return shapes


def _swiglu_shapes(prefix: str, hidden: int, inter: int) -> dict:
    return {prefix + "gate_proj.weight": (inter, hidden),
            prefix + "up_proj.weight": (inter, hidden),
            prefix + "down_proj.weight": (hidden, inter)}


def parameter_count(config: ModelConfig, active: bool = False) -> int:
    """Total parameters, or with active=True those one token touches (selected experts only)."""
    total = 0
    for name, shape in weight_shapes(config).items():
        n = 1
        for s in shape:
            n *= s
        if active and ".mlp.experts." in name:
            n = n * config.num_experts_per_tok // config.num_experts
        total += n
    return total


# ---------------------------------------------------------------------- presets
_PRESETS = {
    "embedded-1b": dict(
        family=DENSE, hidden_size=1536, intermediate_size=6144, num_hidden_layers=26,
        num_attention_heads=12, num_key_value_heads=6, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=4_000_000.0, max_position_embeddings=32768, vocab_size=153376,
        tie_word_embeddings=True, bias=True),
    "embedded-7b": dict(
        family=DENSE, hidden_size=4096, intermediate_size=12800, num_hidden_layers=34,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=16_000_000.0, max_position_embeddings=32768, vocab_size=153376,
        tie_word_embeddings=False, bias=True),
    "pro-moe-72b": dict(
        family=MOGE, hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=16_000_000.0,
        max_position_embeddings=131072, vocab_size=153376, tie_word_embeddings=False,
        bias=True, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=1344,
        shared_expert_intermediate_size=5376),
    # Small shapes for tests and demos: same structure (GQA, biases, several MoGE groups).
    "tiny-dense": dict(
        family=DENSE, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=4_000_000.0, max_position_embeddings=512, vocab_size=257,
        tie_word_embeddings=True, bias=True, eos_token_id=2),
    "tiny-moge": dict(
        family=MOGE, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=16_000_000.0,
        max_position_embeddings=512, vocab_size=257, tie_word_embeddings=False, bias=True,
        num_experts=12, num_experts_per_tok=3, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, eos_token_id=2),
}

PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides) -> ModelConfig:
    """The config of a named preset; keyword overrides (e.g. num_hidden_layers=2) apply on top."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return ModelConfig(**{**_PRESETS[name], **overrides})


def resolve_config(preset_or_config) -> ModelConfig:
    """Accept a ModelConfig, a preset name, or a Hugging Face config dict."""
    if isinstance(preset_or_config, ModelConfig):
        return preset_or_config
    if isinstance(preset_or_config, str):
        return preset(preset_or_config)
    if isinstance(preset_or_config, dict):
        return ModelConfig.from_hf_dict(preset_or_config)
    raise ConfigError(f"expected a preset name, config dict or ModelConfig, got "
                      f"{type(preset_or_config).__name__}")


__all__ = ["ModelConfig", "weight_shapes", "parameter_count", "preset", "PRESET_NAMES",
           "resolve_config", "DENSE", "MOGE", "ROPE_ANGLE_MODES"]
