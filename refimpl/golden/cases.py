"""Golden cases for kernel developers: per operator at a preset's real shapes, or per layer of
a model forward. The format is `refimpl.golden.format` (documented in golden/README.md).

Every output is computed by the spec (`refimpl.ops`) in the case's numerics mode from inputs
already rounded to the storage dtype, and stored with `NAME.ref64`: the same operator in
float64 from the same rounded inputs, so a kernel can be judged by "its error against the
float64 reference is at most k x the spec's own low-precision error" (criterion k-error).

    cases = operator_cases("tiny-moge", ["attention", "moe"], "bf16", seed=0, tokens=16)
    cases = model_cases(refimpl.init_model("tiny-dense"), [1, 5, 7], layers=[0])
    for case in cases: write_case("out/", case)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .. import ops
from ..config import ROPE_ANGLE_MODES, ModelConfig, preset, weight_shapes
from ..errors import InputError
from ..io.checkpoint import with_layers
from ..numerics import accum_dtype, storage_dtype
from ..random_init import random_tensor, tensor_rng
from ..taps import Taps
from .format import DEFAULT_K, REF_SUFFIX, Case, is_float, numerics_entry
from .quant_cases import BUILDERS as QUANT_BUILDERS
from .quant_cases import QUANT_MOGE_OPERATORS, QUANT_OPERATORS
from .speculative_cases import BUILDERS as SPECULATIVE_BUILDERS
from .speculative_cases import SPECULATIVE_OPERATORS

OPERATORS = ("rms_norm", "rope", "attention", "swiglu", "moge_route", "moe",
             "attention_varlen", "paged_attention", "reshape_and_cache", "add_rms_norm",
             "rope_cache", "qkv_proj", "swiglu_w13", "moe_dispatch", "grouped_matmul",
             "moe_combine", "moe_ep") + QUANT_OPERATORS + SPECULATIVE_OPERATORS
#: tokens per block of the paged KV cache cases (vLLM / vllm-ascend default)
DEFAULT_BLOCK_SIZE = 128
MOGE_OPERATORS = ("moge_route", "moe", "moe_dispatch", "grouped_matmul", "moe_combine",
                  "moe_ep") + QUANT_MOGE_OPERATORS
#: per-query offset of the attention scores, from a key direction shared by all keys (as
#: trained models have): softmax is unchanged by it, but exp() without max-subtraction
#: overflows float16 (exp(12) > 65504)
ATTENTION_SCORE_OFFSET = 12.0

ALLCLOSE = {"name": "allclose"}
EXACT = {"name": "exact"}
#: int8 taps of a W8A8 layer: each quantises a float tap of the same case, which a correct
#: kernel rounds its own way, so a value may sit across a rounding boundary (at 1 in 100)
QUANT_LAYER_X_Q = {"name": "ulp", "max_ulp": 1, "max_fraction": 1e-2}
QUANT_ACC_NOTE = ("the int32 accumulator of this run (not judged: it moves by a weight "
                  "wherever x_q moves by 1); the quant_matmul / quant_grouped_matmul operator "
                  "cases judge it exactly from exact inputs")
#: the freedom a correct kernel has in a router choice, in ulps of the router logits' storage
#: dtype, when it computes the logits itself (a reordered float32 dot product rounds to the
#: same or a neighbouring half-precision value; in float32 it may land tens of ulps away);
#: 0 when the logits are given to it. See refimpl.ops.near_ties.
ROUTER_LOGIT_ULPS = {"bfloat16": 2, "float16": 2, "float32": 64, "float64": 64}
#: ... and in ulps of the probability (softmax: exp and the sum differ between kernels)
ROUTER_PROB_ULPS = 4
#: the same under the activation-dtype router (vllm-ascend): its probabilities are rounded to
#: bf16/fp16, and a softmax whose float32 exp differs by an ulp rounds one of them at most to
#: its neighbour (measured against torch's bf16 softmax: 1 of 5184)
ROUTER_ACTIVATION_PROB_ULPS = 1
ROUTING_MODES = ("tie-tolerant", "exact")
_WHY_K = ("a long reduction: a fixed atol is too loose or too tight, so a kernel passes when "
          "its max error against the float64 reference is at most k x the spec's own "
          "low-precision error (plus the dtype's atol)")
_WHY_ALLCLOSE = ("elementwise with a bounded relative error: torch.testing.assert_close "
                 "tolerances of the output dtype")


# ---------------------------------------------------------------------- determinism
#: (get, set) symbol pairs of OpenBLAS builds: NumPy's wheels (scipy-openblas, 64-bit
#: integers), then plain OpenBLAS
_BLAS_THREAD_FUNCTIONS = tuple(
    (f"{prefix}_get_num_threads{suffix}", f"{prefix}_set_num_threads{suffix}")
    for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""),
                           ("openblas", "64_"), ("openblas", "")))


def _openblas_thread_controls():
    """(get, set) of the OpenBLAS library this process loaded (NumPy's), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            paths = sorted({line.split(None, 5)[-1].strip() for line in fh
                            if "openblas" in line.lower() and "/" in line})
    except OSError:  # not Linux: leave the BLAS as it is
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get, put in _BLAS_THREAD_FUNCTIONS:
            if hasattr(lib, get) and hasattr(lib, put):
                getter, setter = getattr(lib, get), getattr(lib, put)
                getter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
                return getter, setter
    return None


@contextlib.contextmanager
def single_threaded_blas():
    """Run the block with OpenBLAS on one thread: its multi-threaded GEMM splits a product
    differently by thread count and the last bits of some elements change (measured: 9 of
    39 x 257 float64 logits with OPENBLAS_NUM_THREADS=2 vs 1), so goldens would depend on it."""
    controls = _openblas_thread_controls()
    if controls is None:
        yield
        return
    getter, setter = controls
    before = getter()
    setter(1)
    try:
        yield
    finally:
        setter(before)


def _deterministic(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_threaded_blas():
            return fn(*args, **kwargs)
    return wrapper


def k_error(name: str, k: float = DEFAULT_K) -> dict:
    return {"name": "k-error", "k": k, "reference": name + REF_SUFFIX}


def f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


# ---------------------------------------------------------------------- operator cases
@dataclass
class _Ctx:
    config: ModelConfig
    preset: str
    mode: str
    seed: int
    tokens: int
    export: tuple
    rope_angles: str
    rope_override: bool
    overrides: dict
    block_size: int = DEFAULT_BLOCK_SIZE
    context: int | None = None
    ep_size: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return storage_dtype(self.mode)

    @property
    def keys(self) -> int:
        """Positions a query attends to (`--context`; default `--tokens`)."""
        return self.tokens if self.context is None else self.context

    def command(self, op: str) -> str:
        parts = ["python -m refimpl golden", f"--preset {self.preset}", f"--ops {op}",
                 f"--numerics {self.mode}", f"--seed {self.seed}", f"--tokens {self.tokens}"]
        if self.rope_override:
            parts.append(f"--rope-angles {self.rope_angles}")
        if op in PAGED_OPERATORS:
            parts.append(f"--block-size {self.block_size}")
        if op in CONTEXT_OPERATORS and self.context is not None:
            parts.append(f"--context {self.context}")
        if op == "moe_ep" and self.ep_size is not None:
            parts.append(f"--ep-size {self.ep_size}")
        for name, value in self.overrides.items():
            text = json.dumps(list(value) if isinstance(value, tuple) else value)
            parts.append(f"--set {shlex.quote(f'{name}={text}')}")
        if self.export:
            parts.append(f"--export {','.join(self.export)}")
        return " ".join(parts + ["--out DIR"])

    def normal(self, tag: str, shape, std: float = 1.0) -> np.ndarray:
        """Seeded N(0, std^2) activations, rounded to the storage dtype."""
        rng = tensor_rng(self.seed, f"golden.{tag}")
        return (rng.standard_normal(shape) * std).astype(self.dtype)

    def weight(self, name: str) -> np.ndarray:
        """The checkpoint tensor `name` as `refimpl.init_model(preset, seed)` makes it."""
        return random_tensor(self.config, name, weight_shapes_of(self.config, name), self.seed,
                             self.dtype)

    def case(self, op: str, variant: str, description: str, parameters: dict, cast_ops,
             criterion: dict) -> Case:
        profile = self.config.conventions
        name = f"{self.preset}-{op.replace('_', '-')}{'-' + variant if variant else ''}-" \
               f"{_profile_tag(self.config)}{self.mode}"
        parameters = {**parameters, "conventions": profile}
        return Case(name=name, operator=op, description=description, parameters=parameters,
                    numerics=numerics_entry(self.mode, cast_ops), seed=self.seed,
                    source={"kind": "preset", "preset": self.preset,
                            **({"overrides": {k: list(v) if isinstance(v, tuple) else v
                                              for k, v in self.overrides.items()}}
                               if self.overrides else {}),
                            "config": self.config.to_hf_dict(),
                            "weights": f"refimpl.random_init.random_tensor(config, NAME, shape, "
                                       f"seed={self.seed}): the layer-0 tensors of "
                                       f"refimpl.init_model('{self.preset}', seed={self.seed})"},
                    command=self.command(op), criterion=criterion)


def _profile_tag(config: ModelConfig) -> str:
    """The part of a case name that says a non-default numerics profile ("vllm-ascend-")."""
    return "" if config.conventions == "hf" else f"{config.conventions}-"


def weight_shapes_of(config: ModelConfig, name: str) -> tuple:
    """The checkpoint shape of a layer-0 (or global) tensor name."""
    return weight_shapes(with_layers(config, 1))[name]


def add_output(case: Case, name: str, out: np.ndarray, ref: np.ndarray | None,
               criterion: dict, produced_by=None, note=None, routing=None,
               optional=False) -> None:
    """An output and (for float outputs) its float64 reference `NAME.ref64`. `routing`:
    "rows" when row t depends on token t's expert choice, "expert" when the output belongs
    to one expert (how `compare --routing tie-tolerant` treats a near-tie decided the other
    way); the float64 reference of such an output is computed with this run's routing."""
    case.add(name, out, "output", criterion=criterion, produced_by=produced_by, note=note,
             routing=routing, optional=optional)
    if ref is not None and is_float(out.dtype):
        forced = " and this run's expert selection" if routing else ""
        case.add(name + REF_SUFFIX, f64(ref), "reference",
                 note=f"{name} computed in float64 from the same rounded inputs{forced}")


def add_routing(case: Case, name: str, router_logits: np.ndarray, expert_ids: np.ndarray,
                ref_logits: np.ndarray, num_groups: int, logits_given: bool,
                produced_by: dict, optional: bool = False,
                softmax_dtype: str = "float32") -> dict:
    """The expert selection as an output judged exactly but for near-ties, with what the
    verdict needs and a reader wants to know as references:

    NAME.near_tie   int64 [T, G], 1 where a correct kernel may choose differently
                    (`refimpl.ops.near_ties`, ROUTER_LOGIT_ULPS / ROUTER_PROB_ULPS)
    NAME.margin     float64 [T, G], the chosen logit minus the group's next best (spec's)
    NAME.prob_margin  float64 [T, G], the same in probability (the spec's float32 softmax)
    NAME.ref64      int64 [T, G], what the float64 router would choose (from the float64
                    reference's own logits); the references of outputs downstream are
                    computed with `expert_ids` forced instead, so they measure arithmetic

    Returns the routing summary recorded under parameters["routing"].
    """
    dt = np.asarray(router_logits).dtype
    logit_ulps = 0 if logits_given else ROUTER_LOGIT_ULPS[dt.name]
    activation = softmax_dtype == "activation" and dt.itemsize == 2
    prob_ulps = ROUTER_ACTIVATION_PROB_ULPS if activation else ROUTER_PROB_ULPS
    prob_unit = (f"{dt.name} (the probabilities are rounded to it)" if activation
                 else "the accumulation dtype")
    ties = ops.near_ties(router_logits, expert_ids, num_groups, logit_ulps, prob_ulps,
                         softmax_dtype)
    margin, prob_margin = ops.routing_margins(router_logits, expert_ids, num_groups,
                                              softmax_dtype)
    free64, _ = ops.moge_route(f64(ref_logits), np.ones(ref_logits.shape[1]), num_groups)
    agrees = free64 == expert_ids
    crit = {"name": "exact", "near_ties": name + ".near_tie",
            "routing": "exact, except near-ties under compare --routing tie-tolerant (default)"}
    case.add(name, expert_ids.astype(np.int64), "output", criterion=crit,
             produced_by=produced_by, optional=optional)
    case.add(name + ".near_tie", ties.astype(np.int64), "reference",
             note=f"1 where the choice is a near-tie: logit margin <= {logit_ulps} ulp of "
                  f"{dt.name} or probability margin <= {prob_ulps} ulp of {prob_unit}")
    case.add(name + ".margin", margin, "reference",
             note="chosen router logit minus the best other logit of its group")
    case.add(name + ".prob_margin", prob_margin, "reference",
             note="chosen probability minus the best other of its group (softmax as the spec)")
    case.add(name + REF_SUFFIX, free64.astype(np.int64), "reference",
             note="the float64 router's own choice (references downstream use this run's)")
    summary = {"choices": int(expert_ids.size), "near_ties": int(ties.sum()),
               "near_tie_rule": f"logit margin <= {logit_ulps} ulp of {dt.name} or probability "
                                f"margin <= {prob_ulps} ulp of {prob_unit}",
               "reference_agrees": int(agrees.sum()),
               "reference_disagrees": int((~agrees).sum()),
               "reference_disagrees_at_near_ties": int((~agrees & ties).sum()),
               "min_logit_margin": float(margin.min()) if margin.size else None,
               "references": "float64 references downstream of the router use this run's "
                             "expert_ids (routing forced), so they differ from the outputs "
                             "only by arithmetic"}
    return summary


def available_operators(config: ModelConfig) -> tuple:
    return OPERATORS if config.is_moge else tuple(o for o in OPERATORS
                                                  if o not in MOGE_OPERATORS)


def parse_ops(text: str | None, config: ModelConfig, name: str) -> list:
    """--ops a,b -> operator names, in OPERATORS order; all the architecture has if None."""
    if text is None:
        return list(available_operators(config))
    wanted = [o.strip() for o in text.split(",") if o.strip()]
    if not wanted:
        raise InputError(f"--ops {text!r}: name at least one of {', '.join(OPERATORS)}")
    for op in wanted:
        if op not in OPERATORS:
            raise InputError(f"--ops: unknown operator {op!r}; choose from "
                             f"{', '.join(OPERATORS)}")
        if op in MOGE_OPERATORS and not config.is_moge:
            raise InputError(f"--ops {op}: preset {name} is a dense model (PanguEmbedded) with "
                             "no MoGE router or experts; use a MoGE preset (tiny-moge, "
                             "pro-moe-72b)")
    return [o for o in OPERATORS if o in wanted]


@_deterministic
def operator_cases(preset_name: str, operators, mode: str, seed: int = 0, tokens: int = 16,
                   rope_angles: str | None = None, export=(), overrides=None,
                   block_size: int = DEFAULT_BLOCK_SIZE, context: int | None = None,
                   ep_size: int | None = None) -> list:
    """The cases of the named operators at the preset's shapes (see the module docstring);
    `overrides` change config fields (`golden --set FIELD=VALUE`); `block_size` is the paged
    cache's (`--block-size`); `context` the positions the attention cases' queries see
    (`--context`, default `tokens`); `ep_size` the ranks of the moe_ep cases (`--ep-size`, a
    divisor of the experts; default one group per rank)."""
    overrides = dict(overrides or {})
    config = preset(preset_name, **overrides)
    storage_dtype(mode)  # refuse an unknown mode first
    if not isinstance(tokens, int) or not 1 <= tokens <= config.max_position_embeddings:
        raise InputError(f"--tokens must be in [1, {config.max_position_embeddings}] "
                         f"(max_position_embeddings of {preset_name}), got {tokens}")
    if rope_angles is not None and rope_angles not in ROPE_ANGLE_MODES:
        raise InputError(f"--rope-angles {rope_angles!r}: choose one of "
                         f"{', '.join(ROPE_ANGLE_MODES)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise InputError(f"--block-size must be a positive integer, got {block_size}")
    if context is not None and (not isinstance(context, int) or
                                not tokens <= context <= config.max_position_embeddings):
        raise InputError(f"--context must be in [--tokens {tokens}, "
                         f"{config.max_position_embeddings}] (the queries are the last "
                         f"--tokens of --context positions), got {context}")
    ops_list = parse_ops(",".join(operators), config, preset_name)
    ctx = _Ctx(config, preset_name, mode, int(seed), tokens, tuple(export),
               rope_angles or config.rope_angles, rope_angles is not None, overrides,
               block_size, context, ep_size)
    if ep_size is not None and (not config.is_moge or not isinstance(ep_size, int)
                                or ep_size < 1 or config.num_experts % ep_size):
        raise InputError(f"--ep-size must be a positive divisor of the experts of a MoGE "
                         f"preset ({config.num_experts} in {preset_name}), got {ep_size}")
    builders = {"rms_norm": _rms_norm_cases, "rope": _rope_cases,
                "attention": _attention_cases, "swiglu": _swiglu_cases,
                "moge_route": _moge_route_cases, "moe": _moe_cases,
                "attention_varlen": _attention_varlen_cases,
                "paged_attention": _paged_attention_cases,
                "reshape_and_cache": _reshape_and_cache_cases,
                "add_rms_norm": _add_rms_norm_cases, "rope_cache": _rope_cache_cases,
                "qkv_proj": _qkv_proj_cases, "swiglu_w13": _swiglu_w13_cases,
                "moe_dispatch": _moe_dispatch_cases, "grouped_matmul": _grouped_matmul_cases,
                "moe_combine": _moe_combine_cases, "moe_ep": _moe_ep_cases, **QUANT_BUILDERS,
                **SPECULATIVE_BUILDERS}
    cases = []
    for op in ops_list:
        cases.extend(builders[op](ctx))
    return cases


def _rms_norm_cases(ctx: _Ctx) -> list:
    c, T = ctx.config, ctx.tokens
    H, eps = c.hidden_size, c.rms_norm_eps
    wname = "model.layers.0.input_layernorm.weight"
    case = ctx.case("rms_norm", "", "RMSNorm of T token vectors: y = weight * round(x / "
                    "sqrt(mean(x^2) + eps)), statistics in the accumulation dtype",
                    {"eps": eps, "hidden_size": H, "tokens": T, "axis": -1,
                     "formula": "y = round(weight * round(x * 1/sqrt(mean(x^2) + eps)))",
                     "weight": wname},
                    ["rms_norm"], {"default": "allclose", "why": _WHY_ALLCLOSE})
    x = ctx.normal("rms_norm.x", (T, H))                     # [T, H]
    w = ctx.weight(wname)                                    # [H]
    case.add("x", x, "input")
    case.add("weight", w, "input")
    y = ops.rms_norm(x, w, eps)                              # [T, H]
    add_output(case, "y", y, ops.rms_norm(f64(x), f64(w), eps), ALLCLOSE,
               {"op": "rms_norm", "args": ["x", "weight"]})
    return [case]


def _rope_cases(ctx: _Ctx) -> list:
    c, T, dt = ctx.config, ctx.tokens, ctx.dtype
    D, Hq, Hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    top = c.max_position_embeddings
    cases = []
    for variant, positions, what in (
            ("", np.arange(T), f"positions 0..{T - 1}"),
            ("long", np.arange(top - T, top), f"positions {top - T}..{top - 1}, the last before "
                                              f"max_position_embeddings {top}")):
        case = ctx.case("rope", variant,
                        f"rotate-half RoPE of q and k at {what}; cos/sin tables given as "
                        "inputs (already rounded to the storage dtype)",
                        {"theta": c.rope_theta, "head_dim": D, "num_heads": Hq,
                         "num_kv_heads": Hkv, "tokens": T, "angle_mode": ctx.rope_angles,
                         "angle_modes": {"exact": "inv_freq and angle in float64, cos/sin in "
                                                  "float64, one rounding",
                                         "float32": "Hugging Face: inv_freq and angle in "
                                                    "float32"},
                         "convention": "rotate-half (GPT-NeoX / Hugging Face Llama)",
                         "formula": "inv_freq[i] = theta^(-2i/d); angle = position * inv_freq; "
                                    "cos = cat(cos(angle), cos(angle)); rotate_half(x) = "
                                    "cat(-x[d/2:], x[:d/2]); y = round(round(x*cos) + "
                                    "round(rotate_half(x)*sin))",
                         "positions": what, "max_position_embeddings": top},
                        ["rope tables", "apply_rope"], {"default": "k-error", "why":
                        "x*cos + rotate_half(x)*sin cancels: near-zero results carry the "
                        "rounding error of their larger terms, so a relative tolerance fails "
                        "correct kernels; judged by k x the spec's own error"})
        q = ctx.normal(f"rope{variant}.q", (T, Hq, D))       # [T, Hq, D]
        k = ctx.normal(f"rope{variant}.k", (T, Hkv, D))      # [T, Hkv, D]
        cos, sin = ops.rope_tables(positions, D, c.rope_theta, angles=ctx.rope_angles,
                                   dtype=accum_dtype(dt))    # [T, D] each
        cos, sin = cos.astype(dt), sin.astype(dt)
        case.add("q", q, "input")
        case.add("k", k, "input")
        case.add("positions", positions.astype(np.int64), "input")
        case.add("cos", cos, "input", note="rope_tables(positions) rounded to the storage dtype")
        case.add("sin", sin, "input", note="rope_tables(positions) rounded to the storage dtype")
        for name, x in (("q_rope", q), ("k_rope", k)):
            src = name[0]
            add_output(case, name, ops.apply_rope(x, cos, sin),
                       ops.apply_rope(f64(x), f64(cos), f64(sin)), k_error(name),
                       {"op": "apply_rope", "args": [src, "cos", "sin"]})
        cases.append(case)
    return cases


def _attention_inputs(ctx: _Ctx, tag: str, T: int, S: int):
    """q [T, Hq, D], k/v [S, Hkv, D]: N(0, 1) plus a direction u shared by the keys of a KV
    head (and the queries reading it), giving scores a per-query offset of about
    ATTENTION_SCORE_OFFSET with a spread of a few units."""
    c = ctx.config
    D, Hq, Hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    rng = tensor_rng(ctx.seed, f"golden.{tag}.u")
    u = rng.standard_normal((Hkv, D))
    u *= np.sqrt(D) / np.linalg.norm(u, axis=-1, keepdims=True)   # |u_h|^2 = D
    alpha = np.sqrt(ATTENTION_SCORE_OFFSET / np.sqrt(D))         # q.k/sqrt(D) ~ alpha^2 sqrt(D)
    kv_head = np.arange(Hq) // c.kv_group_size
    q = tensor_rng(ctx.seed, f"golden.{tag}.q").standard_normal((T, Hq, D)) + alpha * u[kv_head]
    k = tensor_rng(ctx.seed, f"golden.{tag}.k").standard_normal((S, Hkv, D)) + alpha * u
    v = tensor_rng(ctx.seed, f"golden.{tag}.v").standard_normal((S, Hkv, D))
    return q.astype(ctx.dtype), k.astype(ctx.dtype), v.astype(ctx.dtype)


def _attention_cases(ctx: _Ctx) -> list:
    c, S = ctx.config, ctx.keys
    D, Hq, Hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    cases = []
    for variant, T in (("prefill", ctx.tokens), ("decode", 1)):
        if variant == "decode":
            what = f"decode: 1 query (position {S - 1}) against a cache of {S} positions"
        elif T == S:
            what = f"prefill: {T} queries over their own {S} keys, causal"
        else:
            what = (f"chunked prefill: {T} queries at positions {S - T} .. {S - 1} over {S} "
                    "keys, causal")
        case = ctx.case("attention", variant,
                        f"scaled dot-product attention with GQA, {what}",
                        {"num_heads": Hq, "num_kv_heads": Hkv, "head_dim": D,
                         "group": c.kv_group_size, "gqa": "query head h reads KV head h // group",
                         "queries": T, "keys": S, "causal": True,
                         "mask": "query t sits at position S - T + t and sees keys j <= S - T + t",
                         "scale": D ** -0.5, "softmax_dtype": "float32 (float64 in fp64 mode)",
                         "layout": "q [T, heads, D], k/v [S, kv_heads, D], o [T, heads, D]",
                         "formula": "s = round(q k^T); s = round(s * scale); mask; p = "
                                    "round(softmax(s)); o = round(p v)",
                         "score_offset": f"keys share a direction per KV head (as trained models' "
                                         f"keys do): scores carry a per-query offset of about "
                                         f"{ATTENTION_SCORE_OFFSET:g}, so exp() without "
                                         "max-subtraction overflows float16"},
                        ["attention"], {"default": "k-error", "why": _WHY_K})
        q, k, v = _attention_inputs(ctx, f"attention.{variant}", T, S)
        for name, a in (("q", q), ("k", k), ("v", v)):
            case.add(name, a, "input")
        o = ops.attention(q, k, v, causal=True)              # [T, Hq, D]
        add_output(case, "o", o, ops.attention(f64(q), f64(k), f64(v), causal=True),
                   k_error("o"), {"op": "attention", "args": ["q", "k", "v"]})
        cases.append(case)
    return cases


PAGED_OPERATORS = ("paged_attention", "reshape_and_cache")
#: operators whose sizes `--context` sets (positions attended to; default `--tokens`)
CONTEXT_OPERATORS = ("attention", "attention_varlen", "paged_attention", "rope_cache")
_WHY_COPY = "a copy: every slot is bit-equal to what was written or what was there"


def varlen_lengths(T: int, chunked: bool, max_positions: int | None = None):
    """(q_lens, kv_lens) int32 of the attention_varlen cases: 4 sequences of 1, T, an odd
    length near T (above it, or below where that would pass max_positions) and 3 positions;
    chunked: 1, T // 3 (at least 1), 1 and 2 new queries."""
    odd = T + 1 if T % 2 == 0 else T + 2
    if max_positions is not None and odd > max_positions:
        odd = max(1, T - 1 if T % 2 == 0 else T - 2)
    kv_lens = np.array([1, T, odd, 3], np.int32)
    q_lens = np.array([1, max(1, T // 3), 1, 2], np.int32) if chunked else kv_lens.copy()
    return q_lens, kv_lens


def _attention_varlen_cases(ctx: _Ctx) -> list:
    c = ctx.config
    D, Hq, Hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    cases = []
    for variant, chunked in (("prefill", False), ("chunked", True)):
        q_lens, kv_lens = varlen_lengths(ctx.keys, chunked, c.max_position_embeddings)
        case = ctx.case(
            "attention_varlen", variant,
            f"attention over {len(q_lens)} sequences packed along the token axis ("
            f"{'chunked prefill: q_lens < kv_lens' if chunked else 'batched prefill'})",
            {"num_heads": Hq, "num_kv_heads": Hkv, "head_dim": D, "group": c.kv_group_size,
             "q_lens": [int(n) for n in q_lens], "kv_lens": [int(n) for n in kv_lens],
             "cu_seqlens_q": [int(n) for n in np.cumsum(np.r_[0, q_lens])],
             "cu_seqlens_kv": [int(n) for n in np.cumsum(np.r_[0, kv_lens])],
             "layout": "q [sum q_lens, heads, D], k/v [sum kv_lens, kv_heads, D]: sequence b "
                       "owns rows cu_seqlens[b] .. cu_seqlens[b+1]-1",
             "mask": "lengths, no mask tensor: sequence b's queries are the last q_lens[b] of "
                     "its kv_lens[b] positions, causal; no attention across sequences",
             "scale": D ** -0.5,
             "formula": "per sequence, refimpl.ops.attention (the attention case's cast points)"},
            ["attention"], {"default": "k-error", "why": _WHY_K})
        q, k, v = _attention_inputs(ctx, f"attention_varlen.{variant}", int(q_lens.sum()),
                                    int(kv_lens.sum()))
        for name, a in (("q", q), ("k", k), ("v", v), ("q_lens", q_lens),
                        ("kv_lens", kv_lens)):
            case.add(name, a, "input")
        o = ops.attention_varlen(q, k, v, q_lens, kv_lens)
        add_output(case, "o", o, ops.attention_varlen(f64(q), f64(k), f64(v), q_lens, kv_lens),
                   k_error("o"), {"op": "attention_varlen",
                                  "args": ["q", "k", "v", "q_lens", "kv_lens"]})
        cases.append(case)
    return cases


def _paged_layout(ctx: _Ctx, tag: str, lengths, spare: int = 2):
    """Blocks for sequences of the given lengths handed out in a seeded shuffled order (so
    tables are neither contiguous nor increasing), `spare` blocks nobody owns, the last
    block among them (where a slot of -1 lands when a kernel takes it for an index).
    Returns (num_blocks, block_tables int32 [B, max_blocks] padded with -1, slots per
    sequence)."""
    bs = ctx.block_size
    num_blocks = sum(-(-int(n) // bs) for n in lengths) + spare
    order = tensor_rng(ctx.seed, f"golden.{tag}.blocks").permutation(num_blocks - 1)
    tables, slots = ops.allocate_blocks(lengths, bs, order)
    return num_blocks, tables, slots


def paged_context_lens(T: int, block_size: int, max_positions: int) -> np.ndarray:
    """context_lens int32 of the paged_attention cases: 1, T, block_size + 1 (not a multiple
    of the block size) and 2 x block_size, each at most max_positions."""
    lens = [1, T, block_size + 1, 2 * block_size]
    return np.array([min(n, max_positions) for n in lens], np.int32)


def _paged_attention_cases(ctx: _Ctx) -> list:
    c, bs, dt = ctx.config, ctx.block_size, ctx.dtype
    D, Hq, Hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    lens = paged_context_lens(ctx.keys, bs, c.max_position_embeddings)
    num_blocks, tables, slots = _paged_layout(ctx, "paged_attention", lens)
    case = ctx.case(
        "paged_attention", "",
        f"decode for {len(lens)} sequences, one query each, keys and values read through "
        f"block tables from a paged cache of {num_blocks} blocks of {bs}",
        {"num_heads": Hq, "num_kv_heads": Hkv, "head_dim": D, "block_size": bs,
         "num_blocks": num_blocks, "context_lens": [int(n) for n in lens],
         "layout": "query [B, heads, D]; key_cache/value_cache [num_blocks, block_size, "
                   "kv_heads, D]; block_tables int32 [B, max_blocks] (-1 past a sequence's "
                   "blocks); context_lens int32 [B]",
         "indexing": "position p of sequence b is cache[block_tables[b, p // block_size], "
                     "p % block_size]; query b sits at position context_lens[b] - 1 and sees "
                     "positions 0 .. context_lens[b] - 1",
         "unowned_slots": "every cache slot no sequence owns is NaN: a kernel that reads "
                          "outside its table or past its context returns NaN (unusable)",
         "scale": D ** -0.5,
         "formula": "per sequence, refimpl.ops.attention of its query over the gathered keys"},
        ["attention"], {"default": "k-error", "why": _WHY_K})
    query, keys, values = _attention_inputs(ctx, "paged_attention", len(lens), int(lens.sum()))
    key_cache = np.full((num_blocks * bs, Hkv, D), np.nan, dt)
    value_cache = np.full((num_blocks * bs, Hkv, D), np.nan, dt)
    flat = np.concatenate(slots)
    key_cache[flat], value_cache[flat] = keys, values
    key_cache = key_cache.reshape(num_blocks, bs, Hkv, D)
    value_cache = value_cache.reshape(num_blocks, bs, Hkv, D)
    for name, a in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("block_tables", tables), ("context_lens", lens)):
        case.add(name, a, "input")
    out = ops.paged_attention(query, key_cache, value_cache, tables, lens)
    add_output(case, "out", out,
               ops.paged_attention(f64(query), f64(key_cache), f64(value_cache), tables, lens),
               k_error("out"), {"op": "paged_attention",
                                "args": ["query", "key_cache", "value_cache", "block_tables",
                                         "context_lens"]})
    return [case]


def _reshape_and_cache_cases(ctx: _Ctx) -> list:
    c, T, bs, dt = ctx.config, ctx.tokens, ctx.block_size, ctx.dtype
    D, Hkv = c.head_dim, c.num_key_value_heads
    num_blocks, _, (slots,) = _paged_layout(ctx, "reshape_and_cache", [T], spare=1)
    rng = tensor_rng(ctx.seed, "golden.reshape_and_cache.slots")
    slot_mapping = rng.permutation(np.r_[slots, -1]).astype(np.int32)  # one padding token
    case = ctx.case(
        "reshape_and_cache", "",
        f"write {T} new keys and values (and one padding token, slot -1) into a paged cache "
        f"of {num_blocks} blocks of {bs} through a slot mapping",
        {"num_kv_heads": Hkv, "head_dim": D, "block_size": bs, "num_blocks": num_blocks,
         "tokens": T + 1,
         "layout": "key/value [T, kv_heads, D]; key_cache/value_cache [num_blocks, "
                   "block_size, kv_heads, D]; slot_mapping int32 [T]",
         "indexing": "token t goes to block slot // block_size, offset slot % block_size, "
                     "slot = slot_mapping[t]; a negative slot is padding and is not written; "
                     "every other slot keeps its value",
         "formula": "key_cache_out = key_cache with the new rows written (the same for "
                    "values); no arithmetic"},
        [], {"default": "exact", "why": _WHY_COPY})
    key = ctx.normal("reshape_and_cache.key", (T + 1, Hkv, D))
    value = ctx.normal("reshape_and_cache.value", (T + 1, Hkv, D))
    key_cache = ctx.normal("reshape_and_cache.key_cache", (num_blocks, bs, Hkv, D))
    value_cache = ctx.normal("reshape_and_cache.value_cache", (num_blocks, bs, Hkv, D))
    for name, a in (("key", key), ("value", value), ("key_cache", key_cache),
                    ("value_cache", value_cache), ("slot_mapping", slot_mapping)):
        case.add(name, a, "input")
    k_out, v_out = ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    produced = {"op": "reshape_and_cache",
                "args": ["key", "value", "key_cache", "value_cache", "slot_mapping"]}
    for name, a in (("key_cache_out", k_out), ("value_cache_out", v_out)):
        case.add(name, a, "output", criterion={"name": "allclose"}, produced_by=produced,
                 tolerance={"rtol": 0.0, "atol": 0.0},
                 note="a copy: compared with zero tolerance")
    return [case]


#: add_rms_norm's y in bf16/fp16: each rounding is specified, so a correct kernel differs
#: from the spec only where the float32 sum of squares, summed in another order, moves the
#: inverse RMS by an ulp across a rounding midpoint of n = round(x_sum * rstd): measured
#: 1e-4 of the elements, by at most 2 ulps (one of n, one more after the weight). A kernel
#: that normalises the unrounded sum or rounds once moves about a quarter of them.
ADD_RMS_NORM_Y = {"name": "ulp", "max_ulp": 2, "max_fraction": 1e-3}
#: rstd in float32: the sum-of-squares order moves it by an ulp or two (1.2e-7 measured); the
#: statistics of the unrounded sum are 2e-5 .. 2e-4 away
ADD_RMS_NORM_RSTD_RTOL = {"float32": 1e-6, "float64": 1e-13}
_WHY_ULP = ("every rounding specified: a correct kernel moves a last bit only where a float32 "
            "sum's order decides a rounding (about 1e-4 of the elements); a missing cast point "
            "moves a quarter of them, within any allclose tolerance, so allclose cannot see it")


def _add_rms_norm_cases(ctx: _Ctx) -> list:
    c, T, dt = ctx.config, ctx.tokens, ctx.dtype
    H, eps = c.hidden_size, c.rms_norm_eps
    wname = "model.layers.0.post_attention_layernorm.weight"
    half = dt.itemsize == 2
    case = ctx.case(
        "add_rms_norm", "", "fused residual add + RMSNorm as the serving path runs it: the "
        "rounded sum is the new residual and the input of the norm, which also returns rstd",
        {"eps": eps, "hidden_size": H, "tokens": T, "weight": wname,
         "layout": "x, residual [T, H]; y, x_sum [T, H] in the storage dtype; rstd [T, 1] in "
                   "the accumulation dtype (float32; float64 in fp64 mode)",
         "formula": "x_sum = round(x + residual) (float32 add, one rounding); rstd = 1 / "
                    "sqrt(mean(x_sum^2) + eps) from the rounded x_sum; y = round(weight * "
                    "round(x_sum * rstd)) (the rms_norm case's cast points)",
         "inputs": "x ~ N(0, 1) (a block's output), residual ~ N(0, 16) (the residual stream)"},
        ["residual add", "rms_norm"],
        {"default": "x_sum exact; y " + ("ulp" if half else "k-error") + "; rstd allclose",
         "why": _WHY_ULP if half else _WHY_K})
    x = ctx.normal("add_rms_norm.x", (T, H))                 # [T, H]
    residual = ctx.normal("add_rms_norm.residual", (T, H), std=4.0)
    w = ctx.weight(wname)                                    # [H]
    for name, a in (("x", x), ("residual", residual), ("weight", w)):
        case.add(name, a, "input")
    y, x_sum, rstd = ops.add_rms_norm(x, residual, w, eps)
    produced = {"op": "add_rms_norm", "args": ["x", "residual", "weight"]}
    case.add("x_sum", x_sum, "output", criterion={"name": "allclose"}, produced_by=produced,
             tolerance={"rtol": 0.0, "atol": 0.0},
             note="one rounding of an exact float32 sum: compared with zero tolerance")
    # references from the rounded sum: the normalisation of x_sum, not of x + residual
    y64, _, rstd64 = ops.add_rms_norm(f64(x_sum), np.zeros((T, H)), f64(w), eps)
    add_output(case, "y", y, y64, ADD_RMS_NORM_Y if half else k_error("y"), produced,
               note="reference: float64 rms_norm of the rounded x_sum")
    rtol = ADD_RMS_NORM_RSTD_RTOL[rstd.dtype.name]
    case.add("rstd", rstd, "output", criterion={"name": "allclose"}, produced_by=produced,
             tolerance={"rtol": rtol, "atol": 0.0},
             note="the inverse RMS of the rounded x_sum in the accumulation dtype")
    case.add("rstd" + REF_SUFFIX, rstd64, "reference",
             note="rstd in float64 from the rounded x_sum")
    return [case]


def rope_cache_positions(ctx: _Ctx) -> np.ndarray:
    """Position ids of the rope_cache case: T seeded draws from [0, --context) (repeats and
    any order, as a batch of sequences at different positions), the first two 0 and
    context - 1."""
    P = ctx.keys
    pos = tensor_rng(ctx.seed, "golden.rope_cache.positions").integers(0, P, ctx.tokens)
    pos[:2] = [0, P - 1][:ctx.tokens]
    return pos.astype(np.int64)


def _rope_cache_cases(ctx: _Ctx) -> list:
    c, T, dt = ctx.config, ctx.tokens, ctx.dtype
    D, Hq, Hkv, P = c.head_dim, c.num_attention_heads, c.num_key_value_heads, ctx.keys
    cases = []
    positions = rope_cache_positions(ctx)
    q = ctx.normal("rope_cache.q", (T, Hq, D))              # [T, Hq, D]
    k = ctx.normal("rope_cache.k", (T, Hkv, D))             # [T, Hkv, D]
    for variant, table_dt in (("f32-table", np.dtype(np.float32)), ("storage-table", dt)):
        case = ctx.case(
            "rope_cache", variant,
            f"RoPE of queries and keys at arbitrary position ids, cos and sin gathered from "
            f"a cos_sin_cache of {P} positions in {table_dt.name}",
            {"head_dim": D, "num_heads": Hq, "num_kv_heads": Hkv, "tokens": T,
             "cache_positions": P, "table_dtype": table_dt.name, "angle_mode": ctx.rope_angles,
             "theta": c.rope_theta,
             "layout": "cos_sin_cache [P, D] = cat(cos[:, :D/2], sin[:, :D/2]) of the "
                       "rotate-half tables (rope_tables of positions 0 .. P-1, rounded once "
                       "to the table dtype); positions int64 [T], any order, repeats allowed",
             "formula": "cos = cat(c, c), sin = cat(s, s) with c, s = cos_sin_cache[pos] "
                        "halves; each rounded to the query dtype; y = round(round(x * cos) + "
                        "round(rotate_half(x) * sin))"},
            ["rope tables", "apply_rope"], {"default": "k-error", "why": _WHY_K})
        cos_t, sin_t = ops.rope_tables(np.arange(P), D, c.rope_theta, angles=ctx.rope_angles,
                                       dtype=np.float64)
        table = ops.cos_sin_cache(cos_t, sin_t).astype(table_dt)      # [P, D]
        case.add("q", q, "input")
        case.add("k", k, "input")
        case.add("positions", positions, "input")
        case.add("cos_sin_cache", table, "input")
        cos, sin = ops.rope_cache(positions, table)                   # [T, D] each
        cos64, sin64 = ops.rope_cache(positions, f64(table))
        for name, x in (("q_rope", q), ("k_rope", k)):
            add_output(case, name, ops.apply_rope(x, cos, sin),
                       ops.apply_rope(f64(x), cos64, sin64), k_error(name),
                       {"op": "apply_rope(x, *rope_cache(positions, cos_sin_cache))",
                        "args": [name[0], "positions", "cos_sin_cache"]})
        cases.append(case)
    return cases


def _qkv_proj_cases(ctx: _Ctx) -> list:
    c, T = ctx.config, ctx.tokens
    H, D, Hq, Hkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    q_size, kv_size = Hq * D, Hkv * D
    a = "model.layers.0.self_attn."
    case = ctx.case(
        "qkv_proj", "", "the fused q/k/v projection: one weight of [q; k; v] rows with its "
        "bias, output split after",
        {"hidden_size": H, "tokens": T, "q_size": q_size, "kv_size": kv_size,
         "weights": f"w_qkv = cat({a}q_proj.weight, k_proj.weight, v_proj.weight) along "
                    "rows; b_qkv the same of the biases",
         "layout": f"x [T, H]; w_qkv [{q_size} + 2 x {kv_size}, H]; b_qkv [...]; output qkv "
                   f"[T, {q_size + 2 * kv_size}]: q = qkv[:, :{q_size}], k = qkv[:, "
                   f"{q_size}:{q_size + kv_size}], v = the rest",
         "formula": "qkv = round(x w_qkv^T + b_qkv) (float32 accumulation, bias added "
                    "before the one rounding): equal to the three projections"},
        ["linear"], {"default": "k-error", "why": _WHY_K})
    x = ctx.normal("qkv_proj.x", (T, H))
    w = np.concatenate([ctx.weight(a + f"{p}_proj.weight") for p in "qkv"])
    b = (np.concatenate([ctx.weight(a + f"{p}_proj.bias") for p in "qkv"])
         if c.bias else None)
    case.add("x", x, "input")
    case.add("w_qkv", w, "input")
    if b is not None:
        case.add("b_qkv", b, "input")
    qkv = np.concatenate(ops.qkv_proj(x, w, b, q_size, kv_size), axis=-1)
    ref = np.concatenate(ops.qkv_proj(f64(x), f64(w), None if b is None else f64(b), q_size,
                                      kv_size), axis=-1)
    add_output(case, "qkv", qkv, ref, k_error("qkv"),
               {"op": "qkv_proj", "args": ["x", "w_qkv", "b_qkv"]})
    return [case]


def _swiglu_w13_cases(ctx: _Ctx) -> list:
    c, T = ctx.config, ctx.tokens
    if c.layer_is_moe(0):
        prefix, inter = "model.layers.0.mlp.experts.0.", c.moe_intermediate_size
    else:
        prefix, inter = "model.layers.0.mlp.", c.intermediate_size
    case = ctx.case(
        "swiglu_w13", "", "SwiGLU with the fused gate/up weight w13 = cat(gate, up): the "
        "gate_up matmul, the silu-and-mul activation and the down projection",
        {"hidden_size": c.hidden_size, "intermediate_size": inter, "tokens": T,
         "weights": f"w13 = cat({prefix}gate_proj.weight, {prefix}up_proj.weight) along rows; "
                    f"w_down = {prefix}down_proj.weight",
         "layout": f"x [T, H]; w13 [2 x {inter}, H]; w_down [H, {inter}]; gate_up [T, 2 x "
                   f"{inter}]; act [T, {inter}]; y [T, H]",
         "formula": "gate_up = round(x w13^T); g, u = gate_up[:, :I], gate_up[:, I:]; act = "
                    "round(round(silu(g)) * u); y = round(act w_down^T)"},
        ["linear", "swiglu"], {"default": "k-error", "why": _WHY_K})
    x = ctx.normal("swiglu_w13.x", (T, c.hidden_size))
    w13 = np.concatenate([ctx.weight(prefix + "gate_proj.weight"),
                          ctx.weight(prefix + "up_proj.weight")])
    w_down = ctx.weight(prefix + "down_proj.weight")
    for name, a in (("x", x), ("w13", w13), ("w_down", w_down)):
        case.add(name, a, "input")
    gate_up = np.concatenate([ops.linear(x, w13[:inter]), ops.linear(x, w13[inter:])], -1)
    act = ops.silu_and_mul(gate_up[:, :inter], gate_up[:, inter:])
    y = ops.swiglu_w13(x, w13, w_down)
    x64, w64 = f64(x), f64(w13)
    gu64 = np.concatenate([ops.linear(x64, w64[:inter]), ops.linear(x64, w64[inter:])], -1)
    act64 = ops.silu_and_mul(gu64[:, :inter], gu64[:, inter:])
    produced = {"op": "swiglu_w13", "args": ["x", "w13", "w_down"]}
    add_output(case, "gate_up", gate_up, gu64, k_error("gate_up"),
               {"op": "linear", "args": ["x", "w13"]})
    add_output(case, "act", act, act64, k_error("act"),
               {"op": "silu_and_mul", "args": ["gate_up[:, :I]", "gate_up[:, I:]"]})
    add_output(case, "y", y, ops.swiglu_w13(x64, w64, f64(w_down)), k_error("y"), produced)
    return [case]


def stage_expert_ids(ctx: _Ctx) -> np.ndarray:
    """The routed ids of the MoE stage cases: layer 0's router on seeded tokens (the spec's
    selection), with every choice of the most-chosen expert of group 0 moved to another
    expert of its group when no expert is left without tokens, so at least one expert always
    receives zero tokens. # -> int64 [T, G]"""
    c = ctx.config
    x = ctx.normal("moe_stages.x", (ctx.tokens, c.hidden_size))
    logits = ops.linear(x, ctx.weight("model.layers.0.mlp.gate.weight"))
    ids, _ = ops.moge_route(logits, ctx.weight("model.layers.0.mlp.router_scale"),
                            c.num_groups, softmax_dtype=c.router_softmax_dtype)
    counts = np.bincount(ids.ravel(), minlength=c.num_experts)
    if counts.min() > 0:                         # every expert chosen: empty one of group 0
        size = c.experts_per_group
        e = int(np.argmin(counts[:size]))
        ids[ids == e] = (e + 1) % size
    return ids


_STAGES_PARAMS = {
    "slots": "slot(t, k) = k*N + t (row_idx_convention v1, npu_moe_init_routing) or t*K + k "
             "(v2, npu_moe_init_routing_v2)",
    "dispatch": "stable sort of the flattened expert ids (token-major), carrying the slots: "
                "sorted_row_idx[i] = the slot at destination row i; expanded_row_idx[slot] = "
                "its destination row; expanded_x[i] = x[token of sorted_row_idx[i]]",
}


def _moe_dispatch_cases(ctx: _Ctx) -> list:
    c, T = ctx.config, ctx.tokens
    ids = stage_expert_ids(ctx)
    x = ctx.normal("moe_stages.x", (T, c.hidden_size))
    cases = []
    for conv in ("v1", "v2"):
        case = ctx.case(
            "moe_dispatch", conv, f"MoE dispatch (init_routing, {conv}): permute the (token, "
            "choice) slots into expert order and gather the rows",
            {**_STAGES_PARAMS, "row_idx_convention": conv, "tokens": T, "k": c.num_groups,
             "num_experts": c.num_experts,
             "experts_with_no_tokens": [int(e) for e in
                                        np.flatnonzero(np.bincount(ids.ravel(),
                                                                   minlength=c.num_experts) == 0)],
             "outputs": "sorted_expert_ids, sorted_row_idx, expanded_row_idx [N*K] int64; "
                        "expert_counts, expert_cumsum [E] int64; expanded_x [N*K, H]"},
            [], {"default": "exact", "why": _WHY_COPY})
        case.add("expert_ids", ids, "input", note="layer 0's router on seeded tokens")
        case.add("x", x, "input")
        d = ops.moe_dispatch(ids, c.num_experts, conv, x)
        produced = {"op": "moe_dispatch", "args": ["expert_ids", "x"], "convention": conv}
        for name in ("sorted_expert_ids", "sorted_row_idx", "expanded_row_idx",
                     "expert_counts", "expert_cumsum"):
            case.add(name, d[name], "output", criterion=EXACT, produced_by=produced)
        case.add("expanded_x", d["expanded_x"], "output", criterion={"name": "allclose"},
                 tolerance={"rtol": 0.0, "atol": 0.0}, produced_by=produced,
                 note="rows of x: compared with zero tolerance")
        cases.append(case)
    return cases


#: rows of NaN after the valid rows of the grouped matmul case's input
GMM_PADDING_ROWS = 3


def _grouped_matmul_cases(ctx: _Ctx) -> list:
    c, T, dt = ctx.config, ctx.tokens, ctx.dtype
    E, H, I = c.num_experts, c.hidden_size, c.moe_intermediate_size
    ids = stage_expert_ids(ctx)
    x = ctx.normal("moe_stages.x", (T, H))
    d = ops.moe_dispatch(ids, E, "v1", x)
    R = d["expanded_x"].shape[0]
    x_sorted = np.full((R + GMM_PADDING_ROWS, H), np.nan, dt)
    x_sorted[:R] = d["expanded_x"]
    name = "model.layers.0.mlp.experts.{}.gate_proj.weight"
    weights = np.empty((E, I, H), dt)
    for e in range(E):
        weights[e] = ctx.weight(name.format(e))
    case = ctx.case(
        "grouped_matmul", "", "grouped matmul: the dispatched rows of each expert times its "
        "gate_proj weight",
        {"num_experts": E, "rows": R, "padding_rows": GMM_PADDING_ROWS, "in": H, "out": I,
         "layout": f"x_sorted [R + {GMM_PADDING_ROWS}, in] (rows past the last group are NaN "
                   "and must not be read); weights [E, out, in] (layer 0's experts.E.gate_proj"
                   ".weight stacked); group_list int64 [E] as cumulative sums "
                   "(group_list_type cumsum), group_counts int64 [E] the same as counts "
                   "(count): use the one your kernel takes; y [R, out]: only the valid rows "
                   "are compared (a kernel's rows past R are its own)",
         "formula": "y[rows of e] = round(x_sorted[rows of e] weights[e]^T), float32 "
                    "accumulation; experts with no rows read nothing"},
        ["linear"], {"default": "k-error", "why": _WHY_K})
    case.add("x_sorted", x_sorted, "input")
    case.add("weights", weights, "input")
    case.add("group_list", d["expert_cumsum"].astype(np.int64), "input")
    case.add("group_counts", d["expert_counts"].astype(np.int64), "input")
    y = ops.grouped_matmul(x_sorted, weights, d["expert_cumsum"], "cumsum")[:R]
    ref = ops.grouped_matmul(f64(x_sorted), f64(weights), d["expert_cumsum"], "cumsum")[:R]
    add_output(case, "y", y, ref, k_error("y"),
               {"op": "grouped_matmul", "args": ["x_sorted", "weights", "group_list"],
                "then": f"rows 0 .. {R - 1}"})
    return [case]


def _moe_combine_cases(ctx: _Ctx) -> list:
    c, T = ctx.config, ctx.tokens
    E, H, K = c.num_experts, c.hidden_size, c.num_groups
    ids = stage_expert_ids(ctx)
    rows = ctx.normal("moe_combine.rows", (T * K, H))                 # expert outputs
    skip = ctx.normal("moe_combine.skip", (T, H))                     # e.g. the shared expert
    scales = tensor_rng(ctx.seed, "golden.moe_combine.scales").uniform(
        0.05, 1.0, (T, K)).astype(np.float32)
    cases = []
    for conv in ("v1", "v2"):
        d = ops.moe_dispatch(ids, E, conv)
        case = ctx.case(
            "moe_combine", conv, f"MoE combine (finalize_routing, {conv} slots): un-permute "
            "each token's K expert rows, weight them and add the skip",
            {**_STAGES_PARAMS, "row_idx_convention": conv, "tokens": T, "k": K,
             "formula": "out[t] = skip[t] + sum_k scales[t, k] * rows[expanded_row_idx["
                        "slot(t, k)]]; float32 accumulation (skip first, then k = 0 .. K-1), "
                        "one rounding to the rows' dtype",
             "bias": "none (Pangu's experts have no bias)"},
            ["moe block"], {"default": "k-error", "why": _WHY_K})
        for name, a in (("rows", rows), ("scales", scales),
                        ("expanded_row_idx", d["expanded_row_idx"]), ("skip", skip),
                        ("expert_ids", ids)):
            case.add(name, a, "input")
        out = ops.moe_combine(rows, scales, d["expanded_row_idx"], skip=skip, convention=conv)
        ref = ops.moe_combine(f64(rows), f64(scales), d["expanded_row_idx"], skip=f64(skip),
                              convention=conv)
        add_output(case, "out", out, ref, k_error("out"),
                   {"op": "moe_combine", "args": ["rows", "scales", "expanded_row_idx", "skip"],
                    "convention": conv})
        cases.append(case)
    return cases


def _swiglu_cases(ctx: _Ctx) -> list:
    c, T = ctx.config, ctx.tokens
    if c.layer_is_moe(0):
        prefix, inter, which = ("model.layers.0.mlp.experts.0.", c.moe_intermediate_size,
                                "routed expert 0 of layer 0 (moe_intermediate_size)")
    else:
        prefix, inter, which = "model.layers.0.mlp.", c.intermediate_size, "the layer-0 MLP"
    case = ctx.case("swiglu", "", f"SwiGLU MLP y = down(silu(gate(x)) * up(x)), weights of "
                    f"{which}",
                    {"hidden_size": c.hidden_size, "intermediate_size": inter, "tokens": T,
                     "activation": "silu", "bias": False, "weights": prefix + "*",
                     "layout": "weights [out, in] as in the checkpoint",
                     "formula": "g = round(x Wg^T); u = round(x Wu^T); h = round(round(silu(g))"
                                " * u); y = round(h Wd^T)"},
                    ["linear", "swiglu"], {"default": "k-error", "why": _WHY_K})
    x = ctx.normal("swiglu.x", (T, c.hidden_size))           # [T, H]
    ws = [ctx.weight(prefix + f"{p}_proj.weight") for p in ("gate", "up", "down")]
    case.add("x", x, "input")
    for p, w in zip(("gate", "up", "down"), ws):
        case.add(f"{p}_proj.weight", w, "input")
    y = ops.swiglu(x, *ws)                                   # [T, H]
    add_output(case, "y", y, ops.swiglu(f64(x), *map(f64, ws)), k_error("y"),
               {"op": "swiglu", "args": ["x", "gate_proj.weight", "up_proj.weight",
                                         "down_proj.weight"]})
    return [case]


def _moge_params(c: ModelConfig) -> dict:
    return {"num_experts": c.num_experts, "num_groups": c.num_groups,
            "experts_per_group": c.experts_per_group,
            "groups": "contiguous blocks of expert ids: group g = experts g*E/G .. (g+1)*E/G-1",
            "routing": "p = softmax(logits) over all experts (float32); per group e_g = "
                       "argmax of p in the group (ties: lowest id); weight_g = p[e_g] * "
                       "router_scale[e_g]; no renormalisation"}


def _moge_route_cases(ctx: _Ctx) -> list:
    c, T = ctx.config, ctx.tokens
    case = ctx.case("moge_route", "", "MoGE router: global softmax, one expert per group, "
                    "weights times router_scale (not renormalised)",
                    {**_moge_params(c), "tokens": T,
                     "outputs": "expert_ids [T, G] int64 (group order), expert_weights [T, G] "
                                "in the accumulation dtype"},
                    ["linear", "moge_route"], {"default": "exact ids, allclose weights",
                                               "why": _WHY_ALLCLOSE})
    x = ctx.normal("moge_route.x", (T, c.hidden_size))
    logits = ops.linear(x, ctx.weight("model.layers.0.mlp.gate.weight"))   # [T, E]
    scale = ctx.weight("model.layers.0.mlp.router_scale")                 # [1, E]
    case.add("router_logits", logits, "input", note="linear(x, mlp.gate.weight), x ~ N(0, 1)")
    case.add("router_scale", scale, "input")
    ids, weights = ops.moge_route(logits, scale, c.num_groups,
                                  softmax_dtype=c.router_softmax_dtype)
    _, ref_weights = ops.moge_route(f64(logits), f64(scale), c.num_groups, expert_ids=ids,
                                    softmax_dtype=c.router_softmax_dtype)
    produced = {"op": "moge_route", "args": ["router_logits", "router_scale"]}
    case.parameters["routing"] = add_routing(case, "expert_ids", logits, ids, logits,
                                             c.num_groups, True, produced,
                                             softmax_dtype=c.router_softmax_dtype)
    add_output(case, "expert_weights", weights, ref_weights, ALLCLOSE, produced,
               routing="rows")
    return [case]


class _Float64Experts:
    """experts[e] -> its (gate, up, down) weights upcast to float64, made when asked."""

    def __init__(self, stacks):
        self.stacks = stacks

    def __getitem__(self, e):
        return tuple(f64(s[int(e)]) for s in self.stacks)

    def __len__(self):
        return len(self.stacks[0])


def _moe_cases(ctx: _Ctx) -> list:
    c, T = ctx.config, ctx.tokens
    E, H, I = c.num_experts, c.hidden_size, c.moe_intermediate_size
    p = "model.layers.0.mlp."
    case = ctx.case("moe", "", "MoGE block: route, run the selected experts, add their "
                    "weighted outputs and the shared expert",
                    {**_moge_params(c), "tokens": T, "hidden_size": H,
                     "moe_intermediate_size": I,
                     "shared_expert_intermediate_size": c.shared_expert_intermediate_size,
                     "layout": "experts.{gate,up}_proj.weight [E, I, H], experts.down_proj."
                               "weight [E, H, I] (checkpoint tensors stacked by expert id)",
                     "accumulation": "w = round(weights); y = 0; for each selected expert in "
                                     "ascending id: y[tok] = round(y[tok] + round(w * "
                                     "expert(x[tok]))); y = round(y + shared_expert(x))"},
                    ["linear", "swiglu", "moge_route", "moe block"],
                    {"default": "k-error", "why": _WHY_K})
    x = ctx.normal("moe.x", (T, H))                          # [T, H]
    gate = ctx.weight(p + "gate.weight")                     # [E, H]
    scale = ctx.weight(p + "router_scale")                   # [1, E]
    stacks = []                                              # [E, I, H], [E, I, H], [E, H, I]
    for w in ("gate", "up", "down"):
        name = p + "experts.{}." + f"{w}_proj.weight"
        stack = np.empty((E, *weight_shapes_of(c, name.format(0))), ctx.dtype)
        for e in range(E):                                   # one expert at a time in memory
            stack[e] = ctx.weight(name.format(e))
        stacks.append(stack)
    shared = [ctx.weight(p + f"shared_expert.{w}_proj.weight") for w in ("gate", "up", "down")]
    case.add("x", x, "input")
    case.add("gate.weight", gate, "input")
    case.add("router_scale", scale, "input")
    for w, s in zip(("gate", "up", "down"), stacks):
        case.add(f"experts.{w}_proj.weight", s, "input")
    for w, s in zip(("gate", "up", "down"), shared):
        case.add(f"shared_expert.{w}_proj.weight", s, "input")
    got, ref_got = {}, {}
    y = ops.moe_block(x, gate, scale, [tuple(s[e] for s in stacks) for e in range(E)], shared,
                      c.num_groups, record=got.__setitem__,
                      router_softmax_dtype=c.router_softmax_dtype, weight_point=c.moe_weight_point,
                      num_voted_experts=c.voted_experts, stage_taps=True)
    ref = ops.moe_block(f64(x), f64(gate), f64(scale), _Float64Experts(stacks),
                        [f64(s) for s in shared], c.num_groups, record=ref_got.__setitem__,
                        expert_ids=got["expert_ids"],
                        router_softmax_dtype=c.router_softmax_dtype,
                        weight_point=c.moe_weight_point, stage_taps=True)
    produced = {"op": "moe_block", "args": [t.name for t in case.tensors]}
    add_output(case, "y", y, ref, k_error("y"), produced, routing="rows")
    case.parameters["routing"] = add_routing(
        case, "expert_ids", got["router_logits"], got["expert_ids"], ref_got["router_logits"],
        c.num_groups, False, {"op": "moe_block", "then": "the selection it routed by"},
        optional=True, softmax_dtype=c.router_softmax_dtype)
    case.parameters["stages"] = (
        "optional outputs stages.*, the block's serving stages on the selection expert_ids: "
        "moe_dispatch (v1 slots) -> sorted_row_idx, expanded_row_idx, expert_counts, "
        "expert_cumsum, expanded_x; grouped matmul of gate and up -> gate_up [T*G, 2I] (gate "
        "columns then up); SwiGLU -> act" + (
            "; act * routing weight of the row -> act_weighted" if c.moe_weight_point ==
            "before_down" else "") + "; grouped matmul of down -> down [T*G, H]; combine -> "
        "routed [T, H] (before the shared expert); y = round(routed + shared_expert_out). "
        "Feed each stage the golden's previous stage to test it alone")
    for name in _STAGE_TAPS:
        if name not in got:
            continue
        a = got[name]
        crit = EXACT if a.dtype.kind in "iu" else (
            {"name": "allclose"} if name == "stages.expanded_x" else k_error(name))
        extra = {"tolerance": {"rtol": 0.0, "atol": 0.0}} if name == "stages.expanded_x" else {}
        if a.dtype.kind in "iu" or name == "stages.expanded_x":
            case.add(name, a, "output", criterion=crit, routing="selection", optional=True,
                     produced_by={"op": "moe_dispatch", "args": ["expert_ids", "x"]}, **extra)
        else:
            add_output(case, name, a, ref_got[name], crit, {"op": "moe_block", "stage": name},
                       routing="selection", optional=True)
    add_output(case, "shared_expert_out", got["shared_expert_out"], ref_got["shared_expert_out"],
               k_error("shared_expert_out"), {"op": "swiglu", "args": ["x", "shared_expert.*"]},
               optional=True)
    return [case]


_STAGE_TAPS = ("stages.sorted_row_idx", "stages.expanded_row_idx", "stages.expert_counts",
               "stages.expert_cumsum", "stages.expanded_x", "stages.gate_up", "stages.act",
               "stages.act_weighted", "stages.down", "stages.routed")


def _moe_ep_cases(ctx: _Ctx) -> list:
    """Expert parallelism over ep ranks (`--ep-size`, default G: one group each): a case per
    rank (its received rows through its local experts) and a combine case (the sources'
    return trip)."""
    c, T, dt = ctx.config, ctx.tokens, ctx.dtype
    E, H, I, G = c.num_experts, c.hidden_size, c.moe_intermediate_size, c.num_groups
    ep = ctx.ep_size or G
    p = "model.layers.0.mlp."
    x = ctx.normal("moe.x", (T, H))                          # the moe case's tokens
    gate, scale = ctx.weight(p + "gate.weight"), ctx.weight(p + "router_scale")
    names = [p + "experts.{}." + f"{w}_proj.weight" for w in ("gate", "up", "down")]
    experts = _StackedExperts(ctx, names, E)
    shared = [ctx.weight(p + f"shared_expert.{w}_proj.weight") for w in ("gate", "up", "down")]
    _, ids, _ = ops.moe_route_block(x, gate, scale, G, None, c.router_softmax_dtype,
                                    c.voted_experts)
    size = c.experts_per_group
    for g in range(G):               # every group (so every rank of whole groups) gets an idle expert
        col = ids[:, g] - g * size
        counts = np.bincount(col, minlength=size)
        if counts.min() > 0:
            e = int(np.argmin(counts))
            ids[col == e, g] = g * size + (e + 1) % size
    y, plan = ops.moe_block_ep(x, gate, scale, experts, shared, G, ep, expert_ids=ids,
                               router_softmax_dtype=c.router_softmax_dtype,
                               weight_point=c.moe_weight_point,
                               num_voted_experts=c.voted_experts)
    before = c.moe_weight_point == "before_down"
    loads = plan["send_counts"].sum(0)
    common = {"ep_size": ep, "num_experts": E, "experts_per_rank": E // ep, "tokens": T,
              "placement": "expert e on rank e // (E / ep_size); source rank s owns tokens "
                           "token_bounds[s] .. token_bounds[s+1]-1 (np.array_split)",
              "send_counts": plan["send_counts"].tolist(), "rank_loads": loads.tolist(),
              "load_spread": ops.load_spread(loads),
              "weight_point": c.moe_weight_point,
              "selection": "layer 0's router on the moe case's tokens; in each group where "
                           "every expert was chosen, the least chosen one's tokens moved to the "
                           "next expert of the group, so every group has an expert with no rows (every rank, "
                           "when a rank holds whole groups)"}
    cases = []
    per = E // ep
    for r, rank in enumerate(plan["ranks"]):
        order = rank["local_order"]
        n = len(order)
        case = ctx.case(
            "moe_ep", f"rank{r}", f"expert parallelism, rank {r} of {ep}: its received rows "
            f"through its experts {r * per} .. {(r + 1) * per - 1} (one grouped matmul each)",
            {**common, "rank": r, "rows": n, "padding_rows": GMM_PADDING_ROWS,
             "layout": f"x [rows + {GMM_PADDING_ROWS}, H]: the received rows sorted stably by "
                       "local expert (rows past the last group are NaN and must not be read); "
                       "group_list int64 [E_r] cumulative rows per local expert (group_counts "
                       "the counts); experts.*_proj.weight [E_r, out, in] of the rank's experts; "
                       "local_order [rows]: the received row each sorted row is (receive order: "
                       "source 0's rows first); outputs in the sorted order",
             "formula": "gate_up = [gmm(x, W_gate), gmm(x, W_up)]; act = round(round(silu("
                        "gate)) * up)" + ("; act_weighted = round(act * row_weights)" if before
                                          else "") + "; out = gmm(act" + ("_weighted" if before
                                                                          else "") + ", W_down)"},
            ["linear", "swiglu", "moe block"], {"default": "k-error", "why": _WHY_K})
        xs = np.full((n + GMM_PADDING_ROWS, H), np.nan, dt)
        xs[:n] = rank["x"][order]
        w_rows = rank["row_weights"][order]
        case.add("x", xs, "input")
        case.add("group_list", rank["group_list"], "input")
        case.add("group_counts", np.diff(np.r_[0, rank["group_list"]]).astype(np.int64), "input")
        local = [tuple(experts[r * per + j][k] for j in range(per)) for k in range(3)]
        for w, stack in zip(("gate", "up", "down"), local):
            case.add(f"experts.{w}_proj.weight", np.stack(stack), "input")
        if before:
            case.add("row_weights", w_rows, "input", note="each sorted row's routing weight")
        case.add("local_order", order, "input", note="bookkeeping: received row of each row")
        case.add("recv_token_idx", rank["recv_token_idx"][order], "input",
                 note="bookkeeping: the global token of each row")
        got, ref_got = {}, {}
        out = ops.moe_experts(xs[:n], rank["group_list"], _LocalStack(local),
                              w_rows if before else None, got.__setitem__)
        ref = ops.moe_experts(f64(xs[:n]), rank["group_list"], _LocalStack(local, f64),
                              f64(w_rows) if before else None, ref_got.__setitem__)
        produced = {"op": "moe_experts", "args": ["x", "group_list", "experts.*"]}
        for name in ("stages.gate_up", "stages.act", "stages.act_weighted"):
            if name in got:
                add_output(case, name.split(".", 1)[1], got[name], ref_got[name],
                           k_error(name), produced, optional=True)
        np.testing.assert_array_equal(out.view(np.uint8), rank["out"][order].view(np.uint8))
        add_output(case, "out", out, ref, k_error("out"), produced)
        cases.append(case)
    case = ctx.case(
        "moe_ep", "combine", f"expert parallelism, the return trip: {ep} ranks' outputs "
        "combined per source rank, plus the shared expert",
        {**common, "layout": "rank{r}.out [n_r, H]: rank r's outputs in receive order "
                             "(source 0's rows first); send_counts [ep, ep]; token_bounds "
                             "[ep + 1]; expert_weights [T, G] in the storage dtype",
         "formula": "source s: its rows from ranks 0 .. ep-1 concatenated = its dispatch "
                    "buffer (moe_dispatch v1 of its tokens); routed = " + (
                        "finalize with unit scales (float32 sum in choice order, one "
                        "rounding)" if before else "y = 0; per expert ascending: y[tok] = "
                        "round(y[tok] + round(w * row))") +
                    "; y = round(routed + shared_expert_out)"},
        ["moe block"], {"default": "k-error", "why": _WHY_K})
    weights_s = plan["expert_weights"].astype(dt)
    for name, a in (("expert_ids", plan["expert_ids"]), ("expert_weights", weights_s),
                    ("send_counts", plan["send_counts"]), ("token_bounds", plan["token_bounds"]),
                    *((f"rank{r}.out", rank["out"]) for r, rank in enumerate(plan["ranks"]))):
        case.add(name, a, "input")
    shared_out = ops.swiglu(x, *shared)
    case.add("shared_expert_out", shared_out, "input")
    ref = ops.moe_ep_combine([f64(rank["out"]) for rank in plan["ranks"]], plan["expert_ids"],
                             f64(weights_s), plan["send_counts"], plan["token_bounds"],
                             f64(shared_out), E, c.moe_weight_point)
    add_output(case, "y", y, ref, k_error("y"),
               {"op": "moe_ep_combine", "args": ["rank*.out", "expert_ids", "expert_weights",
                                                 "send_counts", "token_bounds",
                                                 "shared_expert_out"]})
    cases.append(case)
    return cases


class _StackedExperts:
    """experts[e] -> layer 0's (gate, up, down) of expert e, made when asked."""

    def __init__(self, ctx, names, n):
        self.ctx, self.names, self.n = ctx, names, n

    @functools.lru_cache(maxsize=None)
    def __getitem__(self, e):
        return tuple(self.ctx.weight(name.format(int(e))) for name in self.names)

    def __len__(self):
        return self.n


class _LocalStack:
    """experts[j] -> (gate, up, down) of local expert j from per-part lists, through `cast`."""

    def __init__(self, parts, cast=lambda a: a):
        self.parts, self.cast = parts, cast

    def __getitem__(self, j):
        return tuple(self.cast(part[int(j)]) for part in self.parts)

    def __len__(self):
        return len(self.parts[0])


# ---------------------------------------------------------------------- model cases
class _StoredWeights(Mapping):
    """name -> the low-precision model's weight in its storage dtype (`model.w`: the mapped
    array itself when the checkpoint stores that dtype)."""

    def __init__(self, model):
        self.model = model

    def __getitem__(self, name):
        return self.model.w(name)

    def __contains__(self, name):
        return name in self.model.weights

    def __iter__(self):
        return iter(self.model.weights)

    def __len__(self):
        return len(self.model.weights)


def reference_model(model):
    """The same model in float64 numerics on the model's rounded weights. The weights stay
    in their storage dtype and each operator upcasts them exactly where they are used
    (`Model(upcast_weights=False)`: linear converts a block of rows at a time, at most
    `refimpl.ops.basic.LINEAR_BLOCK_BYTES`; the embedding only the looked-up rows), so no
    float64 copy of a large weight is made and memory does not grow with the checkpoint."""
    from ..model import Model

    return Model(model.config, _StoredWeights(model), numerics="fp64", lazy=True, check=False,
                 upcast_weights=False, quant=model.quant_description)


def _produced_by(config: ModelConfig, i: int, tap: str) -> dict | None:
    """Which operator made a layer tap, from which tensors (names as in the case)."""
    L, w = f"layers.{i}.", f"model.layers.{i}."
    a = w + "self_attn."

    def lin(src, proj):
        args = [L + src, a + f"{proj}_proj.weight"]
        return {"op": "linear", "args": args + ([a + f"{proj}_proj.bias"] if config.bias
                                                else [])}

    def swiglu(src, prefix):
        return {"op": "swiglu", "args": [src] + [prefix + f"{p}_proj.weight"
                                                 for p in ("gate", "up", "down")]}

    table = {
        "input_norm": {"op": "rms_norm", "args": [L + "input", w + "input_layernorm.weight"]},
        "q": {**lin("input_norm", "q"), "then": "reshape [T, heads, D]"},
        "k": {**lin("input_norm", "k"), "then": "reshape [T, kv_heads, D]"},
        "v": {**lin("input_norm", "v"), "then": "reshape [T, kv_heads, D]"},
        "q_rope": {"op": "apply_rope", "args": [L + "q", "cos", "sin"]},
        "k_rope": {"op": "apply_rope", "args": [L + "k", "cos", "sin"]},
        "attn": {"op": "attention", "args": [L + "q_rope", L + "k_rope", L + "v"],
                 "causal": True, "then": "reshape [T, heads * D]"},
        "attn_out": lin("attn", "o"),
        "resid_mid": {"op": "add", "args": [L + "input", L + "attn_out"]},
        "post_norm": {"op": "rms_norm", "args": [L + "resid_mid",
                                                 w + "post_attention_layernorm.weight"]},
        "router_logits": {"op": "linear", "args": [L + "post_norm", w + "mlp.gate.weight"]},
        "expert_ids": {"op": "moge_route", "args": [L + "router_logits",
                                                    w + "mlp.router_scale"]},
        "expert_weights": {"op": "moge_route", "args": [L + "router_logits",
                                                        w + "mlp.router_scale"]},
        "shared_expert_out": swiglu(L + "post_norm", w + "mlp.shared_expert."),
        "mlp_out": ({"op": "moe_block", "args": [L + "post_norm", w + "mlp.*"]}
                    if config.layer_is_moe(i) else swiglu(L + "post_norm", w + "mlp.")),
        "out": {"op": "add", "args": [L + "resid_mid", L + "mlp_out"]},
    }
    if tap in table:
        return table[tap]
    parts = tap.split(".")
    if parts[0] == "experts" and len(parts) == 3:
        e = parts[1]
        if parts[2] == "token_idx":
            return {"op": "select", "args": [L + "expert_ids"],
                    "then": f"indices of the tokens routed to expert {e}"}
        if parts[2] == "in":
            return {"op": "gather", "args": [L + "post_norm", L + f"experts.{e}.token_idx"]}
        if parts[2] == "out":
            return swiglu(L + f"experts.{e}.in", w + f"mlp.experts.{e}.")
    return None


def _routing_dependence(moe: bool, tap: str) -> str | None:
    """How a layer tap depends on the routing (see add_output)."""
    if not moe:
        return None
    if tap.startswith("experts."):
        return "expert"
    if tap in ("expert_weights", "mlp_out", "out"):
        return "rows"
    return None


_LAYER_CAST_OPS = ["linear", "rms_norm", "rope tables", "apply_rope", "attention", "swiglu",
                   "residual add"]
_MOE_CAST_OPS = ["moge_route", "moe block"]


def _quant_params(model, layer) -> dict:
    """The quantisation of a W8A8 checkpoint's layer (or of the whole model, layer None):
    the scheme of each linear as quant_model_description.json names it, and the KV cache."""
    prefix = "" if layer is None else f"model.layers.{layer}."
    schemes = {name: scheme for name, scheme in sorted(model.quant.items())
               if name.startswith(prefix)}
    if layer is None:
        schemes = {"model_quant_type": model.quant_description.get("model_quant_type"),
                   "counts": {s: list(schemes.values()).count(s)
                              for s in sorted(set(schemes.values()))}}
    return {"format": "msModelSlim (quant_model_description.json)", "linears": schemes,
            "kv_cache": model.kv_cache_type or "float",
            "formula": "x_q = quantize(x); acc = x_q @ weight^T (int32); y = dequantize(acc)"
                       " (see the quantize / quant_matmul cast points); NAME.ref64 is the "
                       "quantised model run in float64: it quantises its own float64 "
                       "activations, so an integer may differ by 1 near a rounding boundary",
            "integer_taps": "int8 *.x_q taps judged by ulp 1 at <= 1% of elements (a float "
                            "tap before them moves by an ulp); int32 *.acc taps stored as "
                            "reference"}


def _quant_summary(model, layer) -> str:
    schemes = sorted({s for n, s in model.quant.items()
                      if layer is None or n.startswith(f"model.layers.{layer}.")})
    kv = f", {model.kv_cache_type} KV cache" if model.kv_cache_type else ""
    return f"quantised checkpoint: {'/'.join(schemes) or 'no'} linears{kv}"


def model_cases(model, token_ids, layers=None, model_name: str = "model",
                source: dict | None = None, command: str = "", seed=None,
                include_weights: bool = True) -> list:
    """One case per selected layer (its input, RoPE tables, weights and every tap) plus a
    model case (token ids -> embed, final_norm, logits), each output with NAME.ref64."""
    return list(iter_model_cases(model, token_ids, layers, model_name, source, command, seed,
                                 include_weights))


def iter_model_cases(model, token_ids, layers=None, model_name: str = "model",
                     source: dict | None = None, command: str = "", seed=None,
                     include_weights: bool = True):
    """`model_cases` one case at a time: a layer case is made (its float64 reference
    computed) only when the previous one has been taken, and its taps are dropped once it
    is, so a caller that writes each case before asking for the next (`golden --model`)
    holds one layer's case at a time, whatever the number of layers. Weights enter the
    cases as the model holds them: the mapped arrays of a streamed checkpoint are written
    from the map, never copied."""
    with single_threaded_blas():
        yield from _model_cases(model, token_ids, layers, model_name, source, command, seed,
                                include_weights)


def _model_cases(model, token_ids, layers, model_name, source, command, seed,
                 include_weights):
    c = model.config
    ids = model.check_token_ids(token_ids)                   # [T]
    T = ids.size
    if T > c.max_position_embeddings:
        raise InputError(f"{T} tokens exceed max_position_embeddings {c.max_position_embeddings}")
    layers = list(range(c.num_hidden_layers)) if layers is None else sorted(set(layers))
    for i in layers:
        if not 0 <= i < c.num_hidden_layers:
            raise InputError(f"--layers: layer {i} is not in [0, {c.num_hidden_layers})")
    dt, mode = model.dtype, model.numerics
    taps = Taps(layers, routing=True)
    model.forward(ids, taps=taps)
    positions = np.arange(T)
    cos, sin = ops.rope_tables(positions, c.head_dim, c.rope_theta, angles=c.rope_angles,
                               dtype=accum_dtype(dt))        # [T, D]
    cos, sin = cos.astype(dt), sin.astype(dt)
    ref = reference_model(model)
    source = dict(source or {}, config=c.to_hf_dict())
    tokens_param = {"token_ids": [int(t) for t in ids], "tokens": T,
                    "positions": f"0..{T - 1} (no cache)"}
    shapes = weight_shapes(c)
    quant_ops = []                       # the cast points of a W8A8 checkpoint's operators
    if model.quant:
        quant_ops = ["quantize", "quant_matmul"]
        if c.is_moge and "W8A8_DYNAMIC" in model.quant.values():
            quant_ops.append("dequant_swiglu_quant")
    for i in layers:
        moe = c.layer_is_moe(i)
        L = f"layers.{i}."
        case = Case(
            name=f"{model_name}-layer{i}-{_profile_tag(c)}{mode}", operator="decoder_layer",
            description=f"decoder layer {i} ({'MoGE' if moe else 'dense'} MLP) of a forward "
                        f"over {T} tokens: its input, RoPE tables and weights, and every "
                        "intermediate (refimpl.Taps) as an output of the operator that made it",
            parameters={"layer": i, **tokens_param, "hidden_size": c.hidden_size,
                        "num_heads": c.num_attention_heads,
                        "num_kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
                        "group": c.kv_group_size, "eps": c.rms_norm_eps,
                        "theta": c.rope_theta, "angle_mode": c.rope_angles, "causal": True,
                        "scale": c.head_dim ** -0.5, "bias": c.bias, "moe": moe,
                        **(_moge_params(c) if moe else {}),
                        "weights_included": include_weights,
                        "formula": "h = x + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)),"
                                   " v_proj(n1))), n1 = rms_norm(x); y = h + mlp(rms_norm(h))",
                        "reference": "NAME.ref64: the layer run in float64 from the same rounded"
                                     " input, RoPE tables and weights"
                                     + (", with this run's expert selection forced" if moe
                                        else "")},
            numerics=numerics_entry(mode, _LAYER_CAST_OPS + (_MOE_CAST_OPS if moe else [])
                                    + quant_ops),
            seed=seed, source=source, command=command,
            criterion={"default": "k-error (exact for integer outputs)", "why": _WHY_K})
        if model.quant:
            case.description += f"; {_quant_summary(model, i)}"
            case.parameters["quantization"] = _quant_params(model, i)
        x = taps[L + "input"]
        case.add(L + "input", x, "input")
        case.add("positions", positions.astype(np.int64), "input")
        case.add("cos", cos, "input", note="rope_tables(positions) rounded to the storage dtype")
        case.add("sin", sin, "input", note="rope_tables(positions) rounded to the storage dtype")
        if include_weights:          # the config's tensors, then a W8A8 model's scales
            names = list(shapes) + [n for n in model.weights if n not in shapes]
            for name in names:
                if name.startswith(f"model.layers.{i}."):
                    case.add(name, model.w(name), "input")
        rtaps = Taps([i])
        ref.layer(i, f64(x), f64(cos), f64(sin), None, rtaps.layer_recorder(i),
                  expert_ids=taps.routing.get(i))
        if moe:
            case.parameters["routing"] = add_routing(
                case, L + "expert_ids", taps[L + "router_logits"], taps[L + "expert_ids"],
                rtaps[L + "router_logits"], c.num_groups, False,
                _produced_by(c, i, "expert_ids"), softmax_dtype=c.router_softmax_dtype)
        for name in taps:
            if not name.startswith(L) or name in (L + "input", L + "expert_ids"):
                continue
            out = taps[name]
            tap = name[len(L):]
            r = rtaps.arrays.get(name)
            if r is None or r.shape != out.shape or not is_float(out.dtype):
                r = None
            if tap.endswith(".acc") or tap.startswith("stages.") and tap.endswith("_acc"):
                case.add(name, out, "reference", note=QUANT_ACC_NOTE)
                continue
            crit = (k_error(name) if r is not None else
                    (ALLCLOSE if is_float(out.dtype) else
                     QUANT_LAYER_X_Q if out.dtype == np.int8 else EXACT))
            add_output(case, name, out, r, crit, _produced_by(c, i, tap),
                       routing=_routing_dependence(moe, tap))
        del rtaps, x
        yield case
        del case
        for name in [n for n in taps.arrays if n.startswith(L)]:
            del taps.arrays[name]                            # this layer is done

    case = Case(
        name=f"{model_name}-model-{_profile_tag(model.config)}{mode}", operator="model",
        description=f"the whole model on {T} token ids: embedding, {c.num_hidden_layers} "
                    "layers, final RMSNorm and LM head",
        parameters={**tokens_param, "num_hidden_layers": c.num_hidden_layers,
                    "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_word_embeddings,
                    "reference": "NAME.ref64: the model run in float64 (weights rounded to the "
                                 "storage dtype, then upcast; RoPE tables in float64)"
                                 + ("; every MoGE layer with this run's expert selection "
                                    "forced (layers.I.expert_ids)" if c.is_moge else "")},
        numerics=numerics_entry(mode, ["embedding"] + _LAYER_CAST_OPS
                                + (_MOE_CAST_OPS if c.is_moge else []) + quant_ops
                                + ["logits"]),
        seed=seed, source=source, command=command,
        criterion={"default": "k-error", "why": _WHY_K})
    if model.quant:
        case.description += f"; {_quant_summary(model, None)}"
        case.parameters["quantization"] = _quant_params(model, None)
    case.add("token_ids", ids, "input")
    for i, chosen in sorted(taps.routing.items()):
        case.add(f"layers.{i}.expert_ids", chosen, "reference",
                 note="the expert selection of this run, forced on the float64 reference")
    rtaps = Taps([])
    ref.forward(ids, taps=rtaps, expert_ids=taps.routing)
    final = f"layers.{c.num_hidden_layers - 1}.out"
    for name, produced in (("embed", {"op": "embedding", "args": ["token_ids",
                                                                  "model.embed_tokens.weight"]}),
                           ("final_norm", {"op": "rms_norm", "args": [final,
                                                                      "model.norm.weight"]}),
                           ("logits", {"op": "linear", "args": [
                               "final_norm", "model.embed_tokens.weight"
                               if c.tie_word_embeddings else "lm_head.weight"]})):
        add_output(case, name, taps[name], rtaps[name], k_error(name), produced)
    yield case


def parse_step(text: str) -> list:
    """--step 'PREFIX/NEW;PREFIX/NEW;...' -> [(prefix ids, new ids), ...]: each entry a
    sequence whose PREFIX (maybe empty) is already cached and whose NEW tokens (at least one)
    this step runs."""
    entries = []
    for part in text.split(";"):
        if part.count("/") != 1:
            raise InputError(f"--step {text!r}: each entry is PREFIX/NEW token ids, e.g. "
                             "'1,5,7/9;/2,3' (a cached prefix 1,5,7 decoding 9; a new prompt 2,3)")
        prefix, new = ([int(t) for t in side.replace(" ", "").split(",") if t]
                       if side.strip() else [] for side in part.split("/"))
        if not new:
            raise InputError(f"--step {text!r}: every entry needs at least one new token")
        entries.append((prefix, new))
    return entries


def step_case(model, entries, block_size: int, layers=None, model_name: str = "model",
              source: dict | None = None, command: str = "", seed: int = 0) -> Case:
    """The packed taps of one `Model.step`: sequences with cached prefixes (run in an earlier
    step) and this step's new tokens, over a paged cache whose blocks are handed out in a
    seeded shuffled order. Inputs: the packed token ids, positions, slot mapping, lengths,
    block tables and each selected layer's caches as the step finds them; outputs: every tap
    of the step (per layer, rows in batch order), each layer's caches after it, the logits;
    references from the same two steps in float64 with this run's expert selection forced."""
    with single_threaded_blas():
        return _step_case(model, entries, block_size, layers, model_name, source, command,
                          seed)


def _step_case(model, entries, block_size, layers, model_name, source, command, seed):
    c = model.config
    layers = list(range(c.num_hidden_layers)) if layers is None else sorted(set(layers))
    for i in layers:
        if not 0 <= i < c.num_hidden_layers:
            raise InputError(f"--layers: layer {i} is not in [0, {c.num_hidden_layers})")
    if not isinstance(block_size, int) or block_size < 1:
        raise InputError(f"--block-size must be a positive integer, got {block_size}")
    mode = model.numerics
    need = sum(-(-(len(p) + len(n)) // block_size) for p, n in entries)
    num_blocks = need + 2
    order = tensor_rng(seed, "golden.step.blocks").permutation(num_blocks)
    ref = reference_model(model)
    caches = [m.new_paged_cache(num_blocks, block_size, order) for m in (model, ref)]
    seqs = [f"s{b}" for b in range(len(entries))]
    prefix = [(s, p) for s, (p, _) in zip(seqs, entries) if p]
    if prefix:                   # the earlier step that cached the prefixes
        ptaps = Taps([], routing=True)
        model.step(prefix, caches[0], taps=ptaps)
        ref.step(prefix, caches[1], expert_ids=ptaps.routing)
    before = {i: (caches[0].key_cache[i].copy(), caches[0].value_cache[i].copy())
              for i in layers}
    batch = [(s, n) for s, (_, n) in zip(seqs, entries)]
    taps = Taps(layers, routing=True)
    model.step(batch, caches[0], taps=taps)
    rtaps = Taps(layers)
    ref.step(batch, caches[1], taps=rtaps, expert_ids=taps.routing)
    q_lens = taps["q_lens"]
    case = Case(
        name=f"{model_name}-step-{_profile_tag(model.config)}{mode}", operator="batched_step",
        description=f"one scheduler step over a paged KV cache: {len(entries)} sequences "
                    f"({int((q_lens == 1).sum())} decoding one token, the others prefilling "
                    f"{', '.join(str(int(n)) for n in q_lens if n > 1) or 'none'} tokens) "
                    "packed along one axis; every tap of the selected layers",
        parameters={"entries": [{"cached_prefix": p, "new_tokens": n} for p, n in entries],
                    "block_size": block_size, "num_blocks": num_blocks, "layers": layers,
                    "layout": "tokens packed in batch order: entry b owns rows cu[b] .. "
                              "cu[b+1]-1 (cu = cumsum of q_lens); key/value caches [num_blocks,"
                              " block_size, kv_heads, D] per layer, NaN where no sequence "
                              "wrote; block_tables int32 [B, max_blocks] padded with -1",
                    "attention": "entries of one new token: paged_attention through their "
                                 "block tables; the others: attention_varlen over their "
                                 "positions 0 .. kv_lens[b]-1 read through their tables",
                    "equals": "each entry's rows are Model.forward of its new tokens with its "
                              "prefix cached, bit for bit (tests/test_step.py)",
                    "reference": "NAME.ref64: the same steps in float64" + (
                        " with this run's expert selection forced" if c.is_moge else ""),
                    **({"routing": "expert_ids per MoGE layer judged with near-ties (compare "
                                   "--routing); a token decided the other way at a near-tie "
                                   "has its rows left out from that layer on, but the later "
                                   "tokens of its sequence read its keys in later layers and "
                                   "may still move: for verdicts robust to near-ties use the "
                                   "layer cases"} if c.is_moge else {})},
        numerics=numerics_entry(mode, ["embedding"] + _LAYER_CAST_OPS
                                + (_MOE_CAST_OPS if c.is_moge else []) + ["logits"]),
        seed=seed, source=dict(source or {}, config=c.to_hf_dict()), command=command,
        criterion={"default": "k-error (exact for integers and cache copies)", "why": _WHY_K})
    case.add("token_ids", np.concatenate([np.asarray(n, np.int64) for _, n in entries]),
             "input")
    for name in ("positions", "slot_mapping", "q_lens", "kv_lens", "block_tables"):
        case.add(name, taps[name].astype(np.int32 if name == "block_tables" else np.int64),
                 "input")
    for i in layers:
        case.add(f"layers.{i}.key_cache", before[i][0], "input",
                 note="the layer's key cache as the step finds it (the prefixes)")
        case.add(f"layers.{i}.value_cache", before[i][1], "input")
    routed = False          # from the first MoGE layer on, rows depend on the selection
    for name in taps:
        if name in ("positions", "slot_mapping", "q_lens", "kv_lens", "block_tables"):
            continue
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        tap = name.split(".", 2)[2] if layer is not None else name
        out, r = taps[name], rtaps.arrays.get(name)
        if tap == "expert_ids":
            routed = True
            add_routing(case, name, taps[f"layers.{layer}.router_logits"], out,
                        rtaps[f"layers.{layer}.router_logits"], c.num_groups, False,
                        _produced_by(c, layer, "expert_ids"),
                        softmax_dtype=c.router_softmax_dtype)
            continue
        if r is None or r.shape != out.shape or not is_float(out.dtype):
            r = None
        crit = k_error(name) if r is not None else (ALLCLOSE if is_float(out.dtype) else EXACT)
        dependence = (_routing_dependence(True, tap) if layer is not None and
                      c.layer_is_moe(layer) else None)
        if routed and dependence is None and is_float(out.dtype):
            dependence = "rows"
        add_output(case, name, out, r, crit, None, routing=dependence)
    for i in layers:
        for part, cache in (("key", caches[0].key_cache[i]), ("value", caches[0].value_cache[i])):
            case.add(f"layers.{i}.{part}_cache_out", cache, "output",
                     criterion={"name": "allclose"}, tolerance={"rtol": 0.0, "atol": 0.0},
                     note="the cache after the step wrote its keys (a copy; NaN elsewhere)")
    return case


def model_command(spec: str, ids, prompt, layers, mode, seed, include_weights, export,
                  tokenizer=None) -> str:
    """The command recorded in a model case's manifest (--out left as DIR; seed None for a
    checkpoint)."""
    parts = ["python -m refimpl golden", f"--model {shlex.quote(spec)}"]
    parts.append(f"--prompt {shlex.quote(prompt)}" if prompt is not None
                 else f"--token-ids {','.join(str(int(t)) for t in ids)}")
    if tokenizer is not None:
        parts.append(f"--tokenizer {shlex.quote(tokenizer)}")
    if layers is not None:
        parts.append(f"--layers {','.join(str(i) for i in layers)}")
    parts.append(f"--numerics {mode}")
    if seed is not None:
        parts.append(f"--seed {seed}")
    if not include_weights:
        parts.append("--no-weights")
    if export:
        parts.append(f"--export {','.join(export)}")
    return " ".join(parts + ["--out DIR"])


def model_name_of(spec: str) -> str:
    """A case-name prefix for --model: the preset name or the directory's base name."""
    return os.path.basename(os.path.normpath(spec)) or "model"


__all__ = ["parse_step", "step_case", "OPERATORS", "MOGE_OPERATORS", "PAGED_OPERATORS", "DEFAULT_BLOCK_SIZE",
           "varlen_lengths", "paged_context_lens", "operator_cases", "model_cases", "iter_model_cases",
           "parse_ops",
           "available_operators", "reference_model", "model_command", "model_name_of",
           "ATTENTION_SCORE_OFFSET"]
