"""The msModelSlim W8A8 checkpoint format, as vllm-ascend loads it (DEPLOYMENT.md section 4).

A quantised checkpoint is a Hugging Face directory (config.json, safetensors shards, the
tokenizer) plus `quant_model_description.json`, which names every tensor's scheme:

    {"model_quant_type": "W8A8" | "W8A8_DYNAMIC", "version": "1.0.0",
     "model.layers.0.self_attn.q_proj.weight": "W8A8", ...,
     "model.embed_tokens.weight": "FLOAT", ...,  [ "kv_cache_type": "C8" ]}

Per quantised linear P (every attention projection, every dense / expert / shared-expert
gate, up and down projection; the MoGE router gate, the norms, the embedding and the LM head
stay FLOAT):

    tensor              dtype                    shape   scheme
    P.weight            int8                     [n, k]  both (per-channel symmetric)
    P.weight_scale      model dtype (float32 for  [n, 1]  both
                        experts)
    P.weight_offset     as weight_scale          [n, 1]  both (zeros: symmetric)
    P.input_scale       as weight_scale          [1]     W8A8
    P.input_offset      int8                     [1]     W8A8
    P.deq_scale         float32 (bf16/fp32        [n]     W8A8: input_scale * weight_scale
                        models), int64 holding
                        float32 bits (fp16)
    P.quant_bias        int32                    [n]     W8A8: rint(bias / deq_scale)
                                                           - input_offset * sum_k weight
    P.bias              model dtype (if the model has biases; FLOAT: folded into quant_bias
                        for W8A8, added after dequantisation for W8A8_DYNAMIC)

With C8 (`kv_cache_type`), each attention layer also holds
`model.layers.L.self_attn.{k,v}_proj.kv_cache_scale` ([Hkv * D], float32): per-channel
symmetric scales of the int8 key and value caches.

`check_quant_weights` refuses (one line, `CheckpointError`) a quantised tensor without its
scales, a scale of the wrong shape or dtype, a description naming a tensor that does not
exist, a non-finite or zero scale, and every defect `refimpl.weights.check_weights` finds in
the FLOAT tensors.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from ..config import ModelConfig, weight_shapes
from ..errors import CheckpointError

DESCRIPTION_NAME = "quant_model_description.json"
DESCRIPTION_VERSION = "1.0.0"
SCHEMES = ("W8A8", "W8A8_DYNAMIC")
FLOAT = "FLOAT"
KV_CACHE_TYPES = ("C8",)
#: keys of the description that are not tensor names
META_KEYS = ("model_quant_type", "version", "kv_cache_type", "group_size")

#: the parts of a quantised linear besides its int8 weight, per scheme
PARTS = {"W8A8": ("weight_scale", "weight_offset", "input_scale", "input_offset", "deq_scale",
                  "quant_bias"),
         "W8A8_DYNAMIC": ("weight_scale", "weight_offset")}
#: scale tensors whose values must be finite and non-zero
SCALE_PARTS = ("weight_scale", "input_scale", "deq_scale")

_LINEAR_RE = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")


def is_quantisable(name: str) -> bool:
    """Whether a weight of the float model is a linear the W8A8 schemes quantise: the
    attention projections and the gate/up/down projections of dense MLPs, experts and the
    shared expert. The MoGE router (`mlp.gate.weight`), norms, embedding and LM head are not."""
    return name.startswith("model.layers.") and bool(_LINEAR_RE.search(name))


def linear_prefix(weight_name: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'model.layers.0.self_attn.q_proj'."""
    return weight_name[:-len(".weight")]


def is_expert(prefix: str) -> bool:
    return ".mlp.experts." in prefix


def kv_scale_names(config: ModelConfig) -> list:
    return [f"model.layers.{i}.self_attn.{kv}_proj.kv_cache_scale"
            for i in range(config.num_hidden_layers) for kv in "kv"]


def quant_tensor_specs(config: ModelConfig, scheme: str, model_dtype, kv_cache: str | None = None,
                       ) -> dict:
    """name -> (shape, dtype) of every tensor of a quantised checkpoint, in writing order.

    model_dtype: the float tensors' dtype (the checkpoint's torch_dtype). Experts' scales are
    float32 (vllm-ascend's fused-MoE parameters), the other linears' in the model dtype.
    """
    check_scheme(scheme)
    model_dtype = np.dtype(model_dtype)
    deq_dtype = np.dtype(np.int64) if model_dtype == np.float16 else np.dtype(np.float32)
    specs = {}
    for name, shape in weight_shapes(config).items():
        if not is_quantisable(name):
            specs[name] = (tuple(shape), model_dtype)
            continue
        p = linear_prefix(name)
        n = shape[0]
        sdt = np.dtype(np.float32) if is_expert(p) else model_dtype
        specs[name] = (tuple(shape), np.dtype(np.int8))
        part_specs = {"weight_scale": ((n, 1), sdt), "weight_offset": ((n, 1), sdt),
                      "input_scale": ((1,), sdt), "input_offset": ((1,), np.dtype(np.int8)),
                      "deq_scale": ((n,), deq_dtype), "quant_bias": ((n,), np.dtype(np.int32))}
        for part in PARTS[scheme]:
            specs[f"{p}.{part}"] = part_specs[part]
    if kv_cache is not None:
        check_kv_cache_type(kv_cache)
        kvd = config.num_key_value_heads * config.head_dim
        for name in kv_scale_names(config):
            specs[name] = ((kvd,), np.dtype(np.float32))
    return specs


def description_of(specs: dict, scheme: str, kv_cache: str | None = None) -> dict:
    """The quant_model_description.json of a checkpoint's tensor specs: the scheme for each
    int8 weight and its parts, FLOAT for the rest."""
    desc = {"model_quant_type": scheme, "version": DESCRIPTION_VERSION}
    if kv_cache is not None:
        desc["kv_cache_type"] = kv_cache
    quant_prefixes = {linear_prefix(n) for n, (_, dt) in specs.items()
                      if n.endswith(".weight") and dt == np.int8}
    for name in specs:
        p = name.rsplit(".", 1)[0]
        if name.endswith(".kv_cache_scale"):
            desc[name] = kv_cache
        elif p in quant_prefixes and not name.endswith(".bias"):
            desc[name] = scheme
        else:
            desc[name] = FLOAT
    return desc


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise CheckpointError(f"unknown quantisation scheme {scheme!r} (choose "
                              f"{', '.join(SCHEMES)})")
    return scheme


def check_kv_cache_type(kind: str) -> str:
    if kind not in KV_CACHE_TYPES:
        raise CheckpointError(f"unknown kv_cache_type {kind!r} (refimpl implements "
                              f"{', '.join(KV_CACHE_TYPES)})")
    return kind


# ---------------------------------------------------------------------- reading
def read_description(directory) -> dict | None:
    """The checkpoint's quant_model_description.json, validated, or None when it has none."""
    path = os.path.join(os.fspath(directory), DESCRIPTION_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            desc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(desc, dict):
        raise CheckpointError(f"{path}: must be a JSON object of tensor name -> scheme")
    kind = desc.get("model_quant_type")
    if kind not in SCHEMES:
        raise CheckpointError(f"{path}: model_quant_type {kind!r} is not one refimpl "
                              f"implements ({', '.join(SCHEMES)})")
    if "kv_cache_type" in desc:
        try:
            check_kv_cache_type(desc["kv_cache_type"])
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    allowed = set(SCHEMES) | {FLOAT} | set(KV_CACHE_TYPES)
    for name, value in desc.items():
        if name in META_KEYS:
            continue
        if not isinstance(value, str) or value not in allowed:
            raise CheckpointError(f"{path}: tensor {name} has scheme {value!r} (expected one "
                                  f"of {', '.join(sorted(allowed))})")
    return desc


def quantised_linears(desc: dict, weights) -> dict:
    """prefix -> scheme of every linear whose int8 weight the description marks W8A8*."""
    return {linear_prefix(name): value for name, value in desc.items()
            if value in SCHEMES and name.endswith(".weight") and name in weights
            and np.dtype(weights[name].dtype) == np.int8}


def check_quant_weights(config: ModelConfig, weights, desc: dict) -> dict:
    """Validate a quantised checkpoint's tensors against its config and description; return
    prefix -> scheme of its quantised linears. CheckpointError (one line) otherwise."""
    from ..weights import _listing

    absent = sorted(n for n in desc if n not in META_KEYS and n not in weights)
    if absent:
        raise CheckpointError(f"{DESCRIPTION_NAME} names {_listing(absent)}, which the "
                              "checkpoint does not hold")
    undescribed = sorted(n for n in weights if n not in desc)
    if undescribed:
        raise CheckpointError(f"{DESCRIPTION_NAME} does not describe {_listing(undescribed)}")
    scheme = desc["model_quant_type"]
    expected = weight_shapes(config)
    missing = [n for n in expected if n not in weights]
    if missing:
        raise CheckpointError(f"missing tensors for this config: {_listing(missing)}")
    quant = {}
    for name, shape in expected.items():
        w = weights[name]
        if tuple(w.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name}: expected shape {list(shape)}, found "
                                  f"{list(w.shape)}")
        dt = np.dtype(w.dtype)
        if not is_quantisable(name) or desc[name] == FLOAT:
            if dt.kind != "f" and dt.name != "bfloat16":
                what = (" (a FLOAT tensor in the description)" if is_quantisable(name) else "")
                raise CheckpointError(f"tensor {name}: dtype {dt.name} is not floating point"
                                      f"{what}")
            continue
        if desc[name] != scheme:
            raise CheckpointError(f"tensor {name}: scheme {desc[name]} differs from "
                                  f"model_quant_type {scheme} (mixed schemes are not "
                                  "implemented)")
        if dt != np.int8:
            raise CheckpointError(f"tensor {name} is {scheme} but its dtype is {dt.name}, "
                                  "not int8")
        p = linear_prefix(name)
        _check_parts(p, scheme, shape[0], weights)
        quant[p] = scheme
    _check_whole_expert_layers(config, quant)
    extra = sorted(n for n in weights if n not in expected and not _is_part(n, quant)
                   and not n.endswith(".kv_cache_scale"))
    if extra:
        raise CheckpointError(f"unexpected tensors not in this config: {_listing(extra)}")
    if "kv_cache_type" in desc:
        kvd = config.num_key_value_heads * config.head_dim
        for name in kv_scale_names(config):
            if name not in weights:
                raise CheckpointError(f"kv_cache_type {desc['kv_cache_type']} but {name} is "
                                      "missing")
            _check_scale(name, weights[name], (kvd,), ("float32", "float16", "bfloat16"))
    return quant


def _check_whole_expert_layers(config: ModelConfig, quant: dict) -> None:
    """The routed experts of a MoE layer are quantised all together or not at all, as
    vllm-ascend's fused MoE quantises a layer (one quant method, one activation scale for
    every expert); a partly quantised expert layer would change the math and is refused.
    Attention and dense / shared-expert linears may each be FLOAT on their own."""
    for i in range(config.num_hidden_layers):
        if not config.layer_is_moe(i):
            continue
        names = [f"model.layers.{i}.mlp.experts.{e}.{k}_proj" for e in range(config.num_experts)
                 for k in ("gate", "up", "down")]
        done = [n for n in names if n in quant]
        if done and len(done) != len(names):
            left = next(n for n in names if n not in quant)
            raise CheckpointError(f"layer {i}: {len(done)} of its {len(names)} expert linears "
                                  f"are quantised but {left} is FLOAT; a partly quantised "
                                  "expert layer is not implemented (all or none)")


def _is_part(name: str, quant: dict) -> bool:
    p, _, part = name.rpartition(".")
    return p in quant and part in PARTS[quant[p]]


def _check_parts(p: str, scheme: str, n: int, weights) -> None:
    floats = ("float32", "float16", "bfloat16")
    shapes = {"weight_scale": ((n, 1), floats), "weight_offset": ((n, 1), floats),
              "input_scale": ((1,), floats), "input_offset": ((1,), ("int8",) + floats),
              "deq_scale": ((n,), ("float32", "int64")), "quant_bias": ((n,), ("int32",))}
    for part in PARTS[scheme]:
        name = f"{p}.{part}"
        if name not in weights:
            raise CheckpointError(f"tensor {p}.weight is {scheme} but {name} is missing")
        shape, dtypes = shapes[part]
        if part in SCALE_PARTS:
            _check_scale(name, weights[name], shape, dtypes)
        else:
            _check_shape_dtype(name, weights[name], shape, dtypes)


def _check_shape_dtype(name, w, shape, dtypes) -> None:
    if tuple(w.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name}: expected shape {list(shape)}, found "
                              f"{list(w.shape)}")
    if np.dtype(w.dtype).name not in dtypes:
        raise CheckpointError(f"tensor {name}: dtype {np.dtype(w.dtype).name} (expected "
                              f"{' or '.join(dtypes)})")


def _check_scale(name, w, shape, dtypes) -> None:
    """Shape, dtype, and every value finite and non-zero (an int64 deq_scale decoded)."""
    from ..ops.quant import decode_deq_scale

    _check_shape_dtype(name, w, shape, dtypes)
    values = np.asarray(w)
    values = decode_deq_scale(values) if values.dtype == np.int64 else \
        values.astype(np.float32)
    bad = ~np.isfinite(values) | (values == 0)
    if bad.any():
        v = values.reshape(-1)[int(np.flatnonzero(bad.reshape(-1))[0])]
        raise CheckpointError(f"tensor {name}: scale {v!r} is {'zero' if v == 0 else 'not finite'}"
                              f" ({int(bad.sum())} such values)")


__all__ = ["DESCRIPTION_NAME", "SCHEMES", "FLOAT", "PARTS", "is_quantisable", "linear_prefix",
           "quant_tensor_specs", "description_of", "read_description", "quantised_linears",
           "check_quant_weights", "kv_scale_names", "check_scheme"]
