"""Hugging Face checkpoints: read by memory map, validated, and written one tensor at a time.

A checkpoint directory holds ``config.json`` and either one ``model.safetensors`` or shards
``model-0000X-of-0000N.safetensors`` listed in ``model.safetensors.index.json``
(``{"metadata": {"total_size": N}, "weight_map": {tensor: shard}}``), tensors in BF16, F16 or
F32 named as in `refimpl.config.weight_shapes`; optionally ``tokenizer.model``.

    model = refimpl.io.checkpoint.load_model("ckpt/", numerics="bf16")   # memory-mapped
    save_checkpoint("out/", config, weights, "bf16")                    # atomic directory

Loading never copies a tensor whose stored dtype is the numerics storage dtype: the arrays
are views of a memory map of the file (see `refimpl.io.safetensors_io`), so a bf16 checkpoint in
bf16 numerics costs page cache, not anonymous memory. Every defect is refused with one line
(CheckpointError): missing directory, config, shard or tensor; unexpected tensor; wrong
shape; config field disagreeing with the weights; truncated or corrupt file; NaN/Inf.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil

import numpy as np

from ..config import PRESET_NAMES, ModelConfig, preset, weight_shapes
from ..errors import CheckpointError, ConfigError
from ..numerics import storage_dtype
from ..quant.format import DESCRIPTION_NAME, check_quant_weights, read_description
from ..weights import check_finite, check_weights
from .safetensors_io import is_memory_mapped, read_safetensors, write_safetensors

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.model"
#: files copied beside tokenizer.model when a tokenizer is put into a checkpoint
TOKENIZER_FILES = (TOKENIZER_NAME, "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
#: the embedded default model shipped with the package
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                 "default")
#: the speculative-decoding draft model of the default (`run --draft default-draft`): the
#: same tokenizer, 0.87M parameters (tools/train_default_model.py --draft)
DEFAULT_DRAFT_DIR = os.path.join(os.path.dirname(DEFAULT_MODEL_DIR), "default-draft")

_TORCH_DTYPE_NAMES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32",
                      "float64": "float64"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


# ---------------------------------------------------------------------- reading
def load_config(path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (CheckpointError when there is none)."""
    path = _checkpoint_dir(path)
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: no {CONFIG_NAME} (not a checkpoint directory)")
    try:
        return ModelConfig.from_json(config_path)
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None


def _checkpoint_dir(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory with "
                              f"{CONFIG_NAME} and safetensors files)")
    return path


def checkpoint_files(path) -> dict:
    """safetensors file path -> the tensor names it must hold (None: whatever it holds).

    One ``model.safetensors`` if present, else the shards of ``model.safetensors.index.json``
    (each must exist and be a plain file name in the directory).
    """
    path = _checkpoint_dir(path)
    single = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(single):
        return {single: None}
    index_path = os.path.join(path, INDEX_NAME)
    if not os.path.isfile(index_path):
        raise CheckpointError(f"{path}: no {SINGLE_NAME} and no {INDEX_NAME}")
    try:
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index_path}: not valid JSON ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no \"weight_map\" object of tensor -> shard")
    files: dict = {}
    for name, shard in weight_map.items():
        if (not isinstance(shard, str) or not shard or os.path.basename(shard) != shard
                or shard in (".", "..")):
            raise CheckpointError(f"{index_path}: tensor {name} maps to {shard!r}, which is not "
                                  "a file name in the checkpoint directory")
        files.setdefault(os.path.join(path, shard), set()).add(name)
    for shard in files:
        if not os.path.isfile(shard):
            raise CheckpointError(f"{index_path} names shard {os.path.basename(shard)}, which "
                                  "is missing")
    return files


def load_weights(path, layers: int | None = None) -> tuple[ModelConfig, dict]:
    """(config, name -> memory-mapped array) of a checkpoint directory, validated.

    Checks: config.json present and valid; every shard present and complete (truncation and
    header corruption refused by `refimpl.io.safetensors_io.read_header`); the index agrees with
    the shards; the config agrees with the weights (the disagreeing field is named); no tensor
    missing, unexpected or misshaped. No tensor data is read. `layers` keeps only the first
    that many layers (config and weights).
    """
    config = load_config(path)
    weights: dict = {}
    for file, expected in checkpoint_files(path).items():
        tensors = read_safetensors(file)
        base = os.path.basename(file)
        if expected is not None:
            absent = sorted(expected - tensors.keys())
            if absent:
                raise CheckpointError(f"{INDEX_NAME} places {_listing(absent)} in {base}, "
                                      "which does not hold it")
            extra = sorted(tensors.keys() - expected)
            if extra:
                raise CheckpointError(f"{base} holds {_listing(extra)}, which {INDEX_NAME} "
                                      "does not list")
        weights.update(tensors)  # the index maps each name to one shard: no duplicates
    check_config_agrees(config, weights)
    desc = read_description(path)
    if desc is None:
        check_weights(config, weights)
    else:
        check_quant_weights(config, weights, desc)
    if layers is not None:
        config, weights = first_layers(config, weights, layers)
    return config, weights


def _listing(names, limit=6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def first_layers(config: ModelConfig, weights: dict, layers: int) -> tuple[ModelConfig, dict]:
    """The config and weights of the first `layers` layers (same width)."""
    if not isinstance(layers, int) or not 1 <= layers <= config.num_hidden_layers:
        raise CheckpointError(f"--layers {layers}: the checkpoint has "
                              f"{config.num_hidden_layers} layers (choose 1 to "
                              f"{config.num_hidden_layers})")
    config = with_layers(config, layers)
    keep = weight_shapes(config)

    def kept(name):          # a float tensor of the config, or a layer's W8A8 / C8 part
        m = _LAYER_RE.match(name)
        return name in keep or (m is not None and int(m.group(1)) < layers)
    return config, {name: w for name, w in weights.items() if kept(name)}


def with_layers(config: ModelConfig, layers: int) -> ModelConfig:
    """The same model with `layers` layers (mlp_only_layers beyond them dropped)."""
    return config.replace(num_hidden_layers=layers,
                          mlp_only_layers=tuple(i for i in config.mlp_only_layers if i < layers))


def check_config_agrees(config: ModelConfig, weights: dict) -> None:
    """CheckpointError naming the config field that disagrees with the stored tensors.

    Compares the fields that the tensor shapes and names determine (hidden_size, vocab_size,
    num_hidden_layers, tie_word_embeddings, bias, model_type, head counts, MLP and expert
    sizes). Only shapes are read. Other defects are left to `check_weights`.
    """
    c = config

    def shape(name):
        w = weights.get(name)
        return tuple(w.shape) if w is not None else None

    def disagree(field, value, what):
        raise CheckpointError(f"config.json disagrees with the weights: {field} is {value} "
                              f"but {what}")

    emb = shape("model.embed_tokens.weight")
    if emb is not None and len(emb) == 2:
        if emb[1] != c.hidden_size:
            disagree("config field 'hidden_size'", c.hidden_size,
                     f"model.embed_tokens.weight has shape {list(emb)} (width {emb[1]})")
        if emb[0] != c.vocab_size:
            disagree("config field 'vocab_size'", c.vocab_size,
                     f"model.embed_tokens.weight has shape {list(emb)} ({emb[0]} rows)")
    found_layers = {int(m.group(1)) for m in map(_LAYER_RE.match, weights) if m}
    if found_layers and max(found_layers) + 1 != c.num_hidden_layers:
        disagree("config field 'num_hidden_layers'", c.num_hidden_layers,
                 f"the weights hold layers 0..{max(found_layers)}")
    has_head = "lm_head.weight" in weights
    if c.tie_word_embeddings and has_head:
        disagree("config field 'tie_word_embeddings'", "true",
                 "the checkpoint has lm_head.weight (tied models have none)")
    if not c.tie_word_embeddings and not has_head:
        disagree("config field 'tie_word_embeddings'", "false",
                 "the checkpoint has no lm_head.weight")
    has_experts = any(".mlp.experts." in name for name in weights)
    if has_experts and not c.is_moge:
        disagree("config field 'model_type'", "PanguEmbedded (dense)",
                 "the weights hold MoGE experts (model.layers.*.mlp.experts.*)")
    moe_layers = [i for i in range(c.num_hidden_layers) if c.layer_is_moe(i)]
    if c.is_moge and moe_layers and not has_experts:
        disagree("config field 'model_type'", "PanguProMoE (MoGE)",
                 "the weights hold no experts (model.layers.*.mlp.experts.*)")
    p = "model.layers.0.self_attn."
    has_bias = (p + "q_proj.bias") in weights
    if "model.layers.0.self_attn.q_proj.weight" in weights and has_bias != c.bias:
        disagree("config field 'bias'", str(c.bias).lower(),
                 f"the checkpoint {'has' if has_bias else 'has no'} {p}q_proj.bias")
    for proj, field, heads in (("q", "num_attention_heads", c.num_attention_heads),
                               ("k", "num_key_value_heads", c.num_key_value_heads)):
        s = shape(p + f"{proj}_proj.weight")
        if s is not None and len(s) == 2 and s[0] != heads * c.head_dim:
            disagree(f"config fields '{field}' x 'head_dim'",
                     f"{heads} x {c.head_dim} = {heads * c.head_dim}",
                     f"{p}{proj}_proj.weight has {s[0]} rows (shape {list(s)})")
    for i in range(c.num_hidden_layers):
        m = f"model.layers.{i}.mlp."
        if c.layer_is_moe(i):
            experts = {int(x.group(2)) for x in map(_EXPERT_RE.match, weights)
                       if x and int(x.group(1)) == i}
            if experts and max(experts) + 1 != c.num_experts:
                disagree("config field 'num_experts'", c.num_experts,
                         f"layer {i} holds experts 0..{max(experts)}")
            checks = ((m + "experts.0.gate_proj.weight", "moe_intermediate_size",
                       c.moe_intermediate_size),
                      (m + "shared_expert.gate_proj.weight", "shared_expert_intermediate_size",
                       c.shared_expert_intermediate_size))
        else:
            checks = ((m + "gate_proj.weight", "intermediate_size", c.intermediate_size),)
        for name, field, value in checks:
            s = shape(name)
            if s is not None and len(s) == 2 and s[0] != value:
                disagree(f"config field '{field}'", value,
                         f"{name} has {s[0]} rows (shape {list(s)})")


def check_all_finite(weights: dict, chunk: int = 1 << 22) -> None:
    """`refimpl.weights.check_finite` over every tensor, a block of `chunk` values at a time
    (so a memory-mapped tensor is never converted whole)."""
    for name in sorted(weights):
        flat = np.asarray(weights[name]).reshape(-1)
        for start in range(0, flat.size, chunk):
            check_finite({name: flat[start:start + chunk]})


def load_model(path, numerics: str = "fp32", backend: str = "numpy", lazy: bool = False,
               allow_nonfinite: bool = False, layers: int | None = None):
    """A `refimpl.Model` from a checkpoint directory, its weights memory-mapped.

    numerics/backend/lazy as in `refimpl.Model` (plus 'w8a8': a W8A8 checkpoint over bf16
    activations; a W8A8 checkpoint runs in any mode, its integer path unchanged, and its
    quant_model_description.json is validated with the tensors): with lazy=False a tensor stored in the
    storage dtype stays a view of the file and any other is converted once; with lazy=True
    every tensor is converted when it is used. NaN/Inf weights are refused unless
    allow_nonfinite. `layers` keeps the first that many layers.
    """
    from ..model import Model

    desc = read_description(path)
    if numerics == "w8a8":
        if desc is None:
            raise CheckpointError(f"--numerics w8a8 runs a W8A8 checkpoint, and {path} has no "
                                  f"{DESCRIPTION_NAME} (write one with: python -m refimpl "
                                  "quantize --model DIR --scheme w8a8 --out QDIR)")
        numerics = "bf16"
    storage_dtype(numerics)  # refuse an unknown mode before touching the files
    config, weights = load_weights(path, layers=layers)
    if not allow_nonfinite:
        check_all_finite(weights)
    model = Model(config, weights, numerics=numerics, backend=backend, lazy=lazy, check=False,
                  quant=desc)
    return model


# ---------------------------------------------------------------------- writing
def shard_plan(specs: dict, max_shard_bytes: int) -> list:
    """Tensor names grouped into shards in order, each at most max_shard_bytes (a tensor
    larger than that gets a shard of its own)."""
    shards, current, size = [], [], 0
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def save_checkpoint(directory, config: ModelConfig, weights, dtype="bf16",
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer=None,
                    specs: dict | None = None, extra_json: dict | None = None) -> dict:
    """Write config.json and the weights in `dtype` ('bf16' | 'fp16' | 'fp32' | 'fp64' or a
    numpy dtype) as a checkpoint directory; return a summary dict.

    weights: a mapping name -> array, or a function name -> array called once per tensor just
    before it is written (so a checkpoint larger than memory can be written). One
    model.safetensors up to max_shard_bytes, else shards model-0000X-of-0000N.safetensors
    plus model.safetensors.index.json. Everything is written into DIR.tmp-XXXX which is then
    renamed to DIR, so DIR appears complete or not at all; DIR must not exist (or be empty).
    `tokenizer`: a tokenizer.model file, or a directory holding one, to copy in.
    `specs` name -> (shape, dtype), in writing order, replaces the config's tensors in `dtype`
    (a quantised checkpoint: `refimpl.quant`; config.json's torch_dtype is then the dtype of
    model.embed_tokens.weight); `extra_json` {file name: object} adds JSON files.
    """
    if specs is not None:
        dtype = np.dtype(specs["model.embed_tokens.weight"][1])
    dtype = storage_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be a positive integer, got "
                              f"{max_shard_bytes!r}")
    shapes = weight_shapes(config)
    if callable(weights):
        produce = weights
    else:
        if specs is None:
            check_weights(config, weights)
        produce = weights.__getitem__
    if specs is None:
        specs = {name: (shape, dtype) for name, shape in shapes.items()}
    tensor_bytes = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize
                       for s, d in specs.values())
    tokenizer_files = _tokenizer_files(tokenizer, config) if tokenizer is not None else []

    out = check_new_dir(directory)
    parent = os.path.dirname(out)
    free = shutil.disk_usage(parent).free
    if tensor_bytes > free:
        raise CheckpointError(f"the checkpoint needs {tensor_bytes / 2**30:.2f} GiB but "
                              f"{parent} has {free / 2**30:.2f} GiB free")
    tmp = f"{out}.tmp-{secrets.token_hex(4)}"
    os.mkdir(tmp)
    try:
        config = config.replace(torch_dtype=_TORCH_DTYPE_NAMES[dtype.name])
        config.to_json(os.path.join(tmp, CONFIG_NAME))
        shards = shard_plan(specs, max_shard_bytes)
        cast = lambda name: np.asarray(produce(name)).astype(specs[name][1],  # noqa: E731
                                                              copy=False)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            files = [SINGLE_NAME]
        else:
            n = len(shards)
            files = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        file_bytes = 0
        for file, names in zip(files, shards):
            file_bytes += write_safetensors(os.path.join(tmp, file),
                                            {name: specs[name] for name in names}, cast,
                                            metadata)
        if len(shards) > 1:
            index = {"metadata": {"total_size": tensor_bytes},
                     "weight_map": {name: file for file, names in zip(files, shards)
                                    for name in names}}
            _write_json(os.path.join(tmp, INDEX_NAME), index)
        for name, obj in (extra_json or {}).items():
            _write_json(os.path.join(tmp, name), obj)
        for src in tokenizer_files:
            shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
        try:
            os.rename(tmp, out)  # atomic; replaces an empty directory
        except OSError as exc:
            raise CheckpointError(f"cannot create {out}: {exc.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": out, "files": files, "tensors": len(specs), "tensor_bytes": tensor_bytes,
            "file_bytes": file_bytes, "dtype": dtype.name,
            "tokenizer": [os.path.basename(f) for f in tokenizer_files]}


def check_new_dir(directory) -> str:
    """The absolute path of a checkpoint directory to create; CheckpointError when it exists
    (and is not empty) or its parent does not."""
    out = os.path.abspath(os.fspath(directory))
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise CheckpointError(f"{out} already exists; choose a new directory or remove it")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise CheckpointError(f"{parent}: no such directory to write the checkpoint in")
    return out


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def _tokenizer_files(tokenizer, config: ModelConfig) -> list:
    """The tokenizer files to copy (tokenizer.model and its JSON companions), checked to fit
    the vocabulary."""
    model_file = tokenizer_file(tokenizer)
    pieces = tokenizer_pieces(model_file)
    if pieces > config.vocab_size:
        raise CheckpointError(f"{model_file} has {pieces} pieces but the model's vocab_size is "
                              f"{config.vocab_size}; its ids would be out of range")
    folder = os.path.dirname(model_file)
    files = [model_file]
    files += [os.path.join(folder, f) for f in TOKENIZER_FILES[1:]
              if os.path.isfile(os.path.join(folder, f))]
    return files


def tokenizer_file(path) -> str:
    """The tokenizer.model named by a file path or a directory holding one."""
    src = os.fspath(path)
    model_file = os.path.join(src, TOKENIZER_NAME) if os.path.isdir(src) else src
    if not os.path.isfile(model_file):
        raise CheckpointError(f"{model_file}: no such tokenizer file")
    return model_file


def tokenizer_pieces(model_file: str) -> int:
    """The number of pieces (ids) of a SentencePiece model file."""
    try:
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=model_file).get_piece_size()
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{model_file}: not a SentencePiece model ({exc})") from None


def init_checkpoint(preset_name: str, directory, seed: int = 0, dtype="bf16",
                    layers: int | None = None, tokenizer=None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Write the seeded random weights of a preset (`refimpl.random_init.random_tensor`, the
    same values as `init_model(preset, seed, num_hidden_layers=layers)`) as a checkpoint, one
    tensor generated and written at a time. `layers` keeps the real width with fewer layers."""
    from ..random_init import random_tensor

    config = preset(preset_name)
    if layers is not None:
        config = with_layers(config, layers)
    dt = storage_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    shapes = weight_shapes(config)
    return save_checkpoint(directory, config,
                           lambda name: random_tensor(config, name, shapes[name], seed, dt),
                           dt, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)


# ---------------------------------------------------------------------- --model DIR|PRESET
def is_checkpoint_dir(spec) -> bool:
    return isinstance(spec, (str, os.PathLike)) and os.path.isdir(spec)


def model_config(spec: str, layers: int | None = None) -> ModelConfig:
    """The config behind a --model argument (directory or preset), without reading weights."""
    if is_checkpoint_dir(spec):
        config = load_config(spec)
        return first_layers(config, {}, layers)[0] if layers is not None else config
    if os.path.abspath(os.fspath(spec)) == DEFAULT_MODEL_DIR:
        raise CheckpointError(f"the default model is missing from {DEFAULT_MODEL_DIR}; pass "
                              f"--model DIR or a preset ({', '.join(PRESET_NAMES)})")
    if spec in PRESET_NAMES:
        return preset(spec) if layers is None else with_layers(preset(spec), layers)
    raise CheckpointError(f"--model {spec!r} is neither a checkpoint directory nor a preset "
                          f"({', '.join(PRESET_NAMES)})")


__all__ = ["load_model", "load_weights", "load_config", "read_safetensors", "save_checkpoint",
           "init_checkpoint", "checkpoint_files", "check_config_agrees", "check_all_finite",
           "first_layers", "with_layers", "tokenizer_file", "tokenizer_pieces", "shard_plan",
           "model_config", "is_checkpoint_dir", "is_memory_mapped", "DEFAULT_MODEL_DIR",
           "DEFAULT_DRAFT_DIR",
           "DEFAULT_MAX_SHARD_BYTES"]
