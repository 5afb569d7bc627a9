"""Golden cases of the W8A8 operators (`refimpl.ops.quant`) at a preset's real shapes.

    quant_matmul           static W8A8 linear: npu_quantize then npu_quant_matmul
    dynamic_quant_matmul   W8A8_DYNAMIC linear: npu_dynamic_quant then npu_quant_matmul
    quant_grouped_matmul   the experts' int8 grouped matmul (gate/up, w13) and its dequant
    dequant_swiglu_quant   the dynamic MoE path's fused dequant -> SwiGLU -> per-row requant

Integer outputs (x_q, acc) are judged exactly: every input of them is given and their
arithmetic is specified to the bit. The static cases make that bite: in the q-proj variant
the input scale is a power of two, so x * (1 / input_scale) + input_offset is exact in
float32, and one row in four holds values that land exactly half-way between two integers
(round half to even vs half away from zero), plus a few values far outside the range (the
clamp); in the down-proj variant the scale is calibrated, so 1 / input_scale rounded to the
activation dtype (what vllm-ascend multiplies by) is not the exact reciprocal, and a kernel
that divides by input_scale instead gets other integers. Float outputs are
judged in ulps of their dtype (`ulp` criterion): once the integers are exact, what remains
is one or two float32 products and one rounding, so a correct kernel moves at most a last
bit. dequant_swiglu_quant's h_q is exact too, although its SwiGLU takes an exp that kernels
compute differently within an ulp: the case's up accumulators are nudged until no h / scale
lies within DSQ_MARGIN of a rounding boundary, so no correct kernel can move an integer.
"""

from __future__ import annotations

import numpy as np

from .. import ops
from ..ops.moe_stages import group_bounds, slot_token_choice
from ..ops.quant import group_rows_scale, int8_matmul, static_input_reciprocal
from ..quant.quantize import activation_quant, static_params, weight_quant

#: y and other float outputs after exact integers: one rounding of a float32 product
Y_ULP = {"name": "ulp", "max_ulp": 1, "max_fraction": 1.0}
#: dequant_swiglu_quant's cases keep every h / scale this far (in int8 units) from a
#: half-integer, so h_q is exact for every correct kernel
DSQ_MARGIN = 2e-3
#: ... and its per-row scale max|h| / 127: silu (exp within an ulp, a division, a product)
#: then the product with up moves h by up to 3 ulps (torch's silu against NumPy's: 3)
DSQ_SCALE_ULP = {"name": "ulp", "max_ulp": 4, "max_fraction": 1.0}
_WHY_EXACT = ("integers: every input is given and the arithmetic is specified to the bit "
              "(float32 product, then the offset, round half to even, clamp)")
_WHY_ULP = ("exact integers, then one or two float32 products and one rounding: a correct "
            "kernel moves a last bit at most")
#: of every 4 rows, this one holds exact half-way values
TIE_ROW_EVERY = 4
#: values per tie row placed far outside the calibrated range (they must clamp)
OUTLIERS_PER_ROW = 2

QUANT_OPERATORS = ("quant_matmul", "dynamic_quant_matmul", "quant_grouped_matmul",
                   "dequant_swiglu_quant")
#: ... of them, those of the expert path (MoGE presets only)
QUANT_MOGE_OPERATORS = ("quant_grouped_matmul", "dequant_swiglu_quant")


def _deq_dtype(ctx):
    """deq_scale's storage: int64 holding float32 bits for fp16 models, float32 otherwise."""
    return np.int64 if ctx.dtype == np.float16 else np.float32


def _scale_dtype(ctx):
    """weight_scale / input_scale are stored in the model dtype (float32 in fp64 mode)."""
    return np.float32 if ctx.dtype == np.float64 else ctx.dtype


def linear_shapes(ctx) -> list:
    """(variant, weight name, has bias) of the linears of the quant_matmul cases: an
    attention projection (with the model's bias) and the MLP's down projection (the longest
    reduction)."""
    c = ctx.config
    down = ("model.layers.0.mlp.shared_expert.down_proj.weight" if c.layer_is_moe(0)
            else "model.layers.0.mlp.down_proj.weight")
    return [("q-proj", "model.layers.0.self_attn.q_proj.weight", c.bias),
            ("down-proj", down, False)]


def tie_activations(ctx, tag: str, T: int, k: int, scale: float, offset: int):
    """Activations where one row in TIE_ROW_EVERY holds exact half-way values h * scale
    (h a half-integer of at most 8 significant bits, so exact in bf16/fp16) and
    OUTLIERS_PER_ROW values far outside the range. # -> [T, k] storage dtype"""
    from ..random_init import tensor_rng

    rng = tensor_rng(ctx.seed, f"golden.{tag}.ties")
    x = ctx.normal(tag, (T, k)).astype(np.float64)
    for t in range(0, T, TIE_ROW_EVERY):
        h = rng.integers(-100, 100, k) + 0.5                   # x*r + o = h + o: a tie
        x[t] = (h - offset) * scale
        cols = rng.choice(k, OUTLIERS_PER_ROW, replace=False)
        x[t, cols] = np.array([300.0, -300.0])[:OUTLIERS_PER_ROW] * scale
    return x.astype(ctx.dtype)


def _quant_matmul_cases(ctx) -> list:
    T, dt = ctx.tokens, ctx.dtype
    sdt = _scale_dtype(ctx)
    cases = []
    for variant, wname, has_bias in linear_shapes(ctx):
        w = ctx.weight(wname)
        n, k = w.shape
        w_q, w_scale = weight_quant(w, sdt)                          # [n, k], [n, 1]
        probe = ctx.normal(f"quant_matmul.{variant}.x", (T, k))
        lo, hi = float(np.min(probe.astype(np.float32))), float(np.max(probe.astype(np.float32)))
        input_scale, input_offset = activation_quant(lo, hi, sdt, False)
        ties = variant == "q-proj"
        if ties:                 # a power of two: x * r + o exact, half-way values placed
            s = 2.0 ** np.ceil(np.log2((max(hi, 0) - min(lo, 0)) / 255.0))
            input_scale = np.array([s], sdt)
            x = tie_activations(ctx, f"quant_matmul.{variant}.x", T, k, s,
                                int(input_offset[0]))
        else:                    # calibrated: 1 / input_scale is not exact in the x dtype
            x = probe
        bias = ctx.weight(wname[:-len("weight")] + "bias") if has_bias else None
        deq_scale, quant_bias = static_params(w_q, w_scale, input_scale, input_offset, bias,
                                              _deq_dtype(ctx))
        case = ctx.case(
            "quant_matmul", variant, "static W8A8 linear (msModelSlim W8A8, vllm-ascend's "
            "AscendW8A8LinearMethod): per-tensor activation quantisation, int8 matmul with "
            "an int32 accumulator, dequantisation with deq_scale and quant_bias",
            {"tokens": T, "in": k, "out": n, "weight": wname,
             "layout": f"x [T, {k}]; input_scale [1] ({np.dtype(sdt).name}); input_offset "
                       f"[1] int8; weight [{n}, {k}] int8; deq_scale [{n}] "
                       f"({np.dtype(_deq_dtype(ctx)).name}"
                       + (": float32 bits in the low 32 bits, sign-extended"
                          if _deq_dtype(ctx) == np.int64 else "")
                       + f"); quant_bias [{n}] int32; x_q [T, {k}] int8; acc [T, {n}] int32; "
                       f"y [T, {n}]",
             "formula": "r = round_to_x_dtype(1 / input_scale); x_q = clamp(rint(float32(x) "
                        "* float32(r) + input_offset), -128, 127) (product rounded to float32, "
                        "then the offset added, round half to even); acc = x_q @ weight^T "
                        "(exact int32); y = round(float32(acc + quant_bias) * deq_scale)",
             "quantisation": "weight per output channel symmetric (weight_scale = max|W| / "
                             "127 in the model dtype); deq_scale = input_scale * "
                             "weight_scale (float32); quant_bias = rint(bias / deq_scale) - "
                             "input_offset * sum_k weight" + ("" if has_bias else
                                                              " (this linear has no bias)"),
             "input_scale": (f"a power of two so x * r + input_offset is exact; rows 0, "
                             f"{TIE_ROW_EVERY}, {2 * TIE_ROW_EVERY}, ... hold exact half-way "
                             f"values and {OUTLIERS_PER_ROW} values far outside the range"
                             if ties else "calibrated on x's own range ((max - min) / 255 "
                             "in the model dtype): r = 1 / input_scale rounded to the x dtype "
                             "differs from the exact reciprocal, and x_q follows r (vllm-"
                             "ascend's aclnn_input_scale_reciprocal), not x / input_scale")},
            ["quantize", "quant_matmul"], {"default": "exact", "why": _WHY_EXACT})
        for name, a in (("x", x), ("input_scale", input_scale), ("input_offset", input_offset),
                        ("weight", w_q), ("deq_scale", deq_scale), ("quant_bias", quant_bias)):
            case.add(name, a, "input")
        r = static_input_reciprocal(input_scale, dt)
        x_q = ops.quantize(x, r, input_offset.astype(np.float64), div_mode=False)
        acc = int8_matmul(x_q, w_q)
        y = ops.dequantize(acc, ops.decode_deq_scale(deq_scale), dt, quant_bias)
        produced = {"op": "w8a8_linear", "args": ["x", "input_scale", "input_offset", "weight",
                                                  "deq_scale", "quant_bias"]}
        case.add("x_q", x_q, "output", produced_by={"op": "static_quantize",
                                                   "args": ["x", "input_scale", "input_offset"]})
        case.add("acc", acc, "output", produced_by={"op": "int8_matmul", "args": ["x_q", "weight"]},
                 note="int32 accumulator, before quant_bias and dequantisation")
        case.add("y", y, "output", criterion=Y_ULP, produced_by=produced, note=_WHY_ULP)
        cases.append(case)
    return cases


def _dynamic_quant_matmul_cases(ctx) -> list:
    T, dt = ctx.tokens, ctx.dtype
    sdt = _scale_dtype(ctx)
    cases = []
    for variant, wname, has_bias in linear_shapes(ctx):
        w = ctx.weight(wname)
        n, k = w.shape
        w_q, w_scale = weight_quant(w, sdt)
        x = ctx.normal(f"dynamic_quant_matmul.{variant}.x", (T, k))
        x[T // 2] = 0                                                 # a row of zeros
        bias = ctx.weight(wname[:-len("weight")] + "bias") if has_bias else None
        case = ctx.case(
            "dynamic_quant_matmul", variant, "dynamic W8A8 linear (msModelSlim W8A8_DYNAMIC, "
            "vllm-ascend's AscendW8A8DynamicLinearMethod): per-token symmetric quantisation "
            "(npu_dynamic_quant), int8 matmul, dequantisation with weight_scale x "
            "token_scale (npu_quant_matmul with pertoken_scale)",
            {"tokens": T, "in": k, "out": n, "weight": wname,
             "layout": f"x [T, {k}]; weight [{n}, {k}] int8; weight_scale [{n}, 1] "
                       f"({np.dtype(sdt).name})" + (f"; bias [{n}]" if has_bias else "")
                       + f"; x_q [T, {k}] int8; token_scale [T] float32; acc [T, {n}] int32; "
                         f"y [T, {n}]",
             "formula": "token_scale = max_k |x| / 127 (float32); x_q = clamp(rint(x / "
                        "token_scale)) (a zero row: scale 0, x_q 0); acc = x_q @ weight^T "
                        "(exact int32); y = round(float32(acc) * weight_scale * token_scale"
                        + (" + bias" if has_bias else "") + ")",
             "zero_row": T // 2},
            ["quantize", "quant_matmul"], {"default": "exact", "why": _WHY_EXACT})
        for name, a in (("x", x), ("weight", w_q), ("weight_scale", w_scale)):
            case.add(name, a, "input")
        if bias is not None:
            case.add("bias", bias, "input")
        x_q, t_scale = ops.dynamic_quantize(x)
        acc = int8_matmul(x_q, w_q)
        y = ops.dequantize(acc, np.asarray(w_scale, np.float32).reshape(-1), dt,
                           pertoken_scale=t_scale, bias=bias)
        case.add("x_q", x_q, "output", produced_by={"op": "dynamic_quantize", "args": ["x"]})
        case.add("token_scale", t_scale.astype(np.float32), "output", criterion=Y_ULP,
                 produced_by={"op": "dynamic_quantize", "args": ["x"]},
                 note="max|x| / 127: a kernel multiplying by 1/127 moves a last bit")
        case.add("acc", acc, "output", produced_by={"op": "int8_matmul", "args": ["x_q", "weight"]})
        case.add("y", y, "output", criterion=Y_ULP, note=_WHY_ULP,
                 produced_by={"op": "w8a8_linear", "scheme": "W8A8_DYNAMIC",
                              "args": ["x", "weight", "weight_scale"]
                              + (["bias"] if has_bias else [])})
        cases.append(case)
    return cases


def _expert_w13(ctx, e: int):
    """(w13 int8 [2I, H], w13_scale float32 [2I]) of layer 0's expert e: gate rows then up
    rows, quantised per channel (experts' scales are float32)."""
    p = f"model.layers.0.mlp.experts.{e}."
    g, gs = weight_quant(ctx.weight(p + "gate_proj.weight"), np.float32)
    u, us = weight_quant(ctx.weight(p + "up_proj.weight"), np.float32)
    return np.concatenate([g, u]), np.concatenate([gs, us]).reshape(-1)


def _expert_stage(ctx):
    """What both expert cases start from: the dispatch dict, tokens x [T, H], the token of
    each dispatched row, and every expert's (w13 [2I, H] list, w13_scale [E, 2I])."""
    from .cases import stage_expert_ids

    c = ctx.config
    ids = stage_expert_ids(ctx)
    x = ctx.normal("moe_stages.x", (ctx.tokens, c.hidden_size))
    d = ops.moe_dispatch(ids, c.num_experts, "v1")
    token = slot_token_choice(d["sorted_row_idx"], ctx.tokens, ids.shape[1])[0]
    experts = [_expert_w13(ctx, e) for e in range(c.num_experts)]
    return d, x, token, [w for w, _ in experts], np.stack([s for _, s in experts])


def _quant_grouped_matmul_cases(ctx) -> list:
    c, dt = ctx.config, ctx.dtype
    E, H, I = c.num_experts, c.hidden_size, c.moe_intermediate_size
    d, x, token, w13, w13_scale = _expert_stage(ctx)                   # w13_scale [E, 2I]
    w13 = np.stack(w13)                                                      # [E, 2I, H]
    x_scale = activation_quant(float(x.astype(np.float32).min()),
                               float(x.astype(np.float32).max()), np.float32, True)[0]
    x_q = ops.quantize(x, x_scale, None, div_mode=True)[token]              # [R, H]
    R = x_q.shape[0]
    case = ctx.case(
        "quant_grouped_matmul", "", "the experts' int8 grouped matmul (npu_grouped_matmul on "
        "int8 rows, vllm-ascend's static W8A8 fused MoE): each expert's dispatched rows times "
        "its w13 = [gate; up], int32 accumulation, then the dequantisation with "
        "w13_scale x x_scale",
        {"num_experts": E, "rows": R, "in": H, "out": 2 * I,
         "layout": f"x_q [R, {H}] int8 (dispatched rows of x quantised per tensor, div_mode, "
                   f"no offset); weights [E, {2 * I}, {H}] int8 (layer 0's experts' gate_proj "
                   f"then up_proj rows); weight_scale [E, {2 * I}] float32; x_scale [1] "
                   f"float32; group_list int64 [E] cumulative (group_counts the counts); "
                   f"acc [R, {2 * I}] int32; y [R, {2 * I}]",
         "formula": "acc[rows of e] = x_q[rows of e] @ weights[e]^T (exact int32; an expert "
                    "with no rows reads nothing); y[rows of e] = round(float32(acc) * "
                    "float32(weight_scale[e] * x_scale))"},
        ["quant_matmul"], {"default": "exact", "why": _WHY_EXACT})
    case.add("x_q", x_q, "input")
    case.add("weights", w13, "input")
    case.add("weight_scale", w13_scale, "input")
    case.add("x_scale", x_scale.astype(np.float32), "input")
    case.add("group_list", d["expert_cumsum"].astype(np.int64), "input")
    case.add("group_counts", d["expert_counts"].astype(np.int64), "input")
    acc = ops.quant_grouped_matmul(x_q, w13, d["expert_cumsum"])
    y = ops.group_dequantize(acc, w13_scale * np.float32(x_scale[0]), d["expert_cumsum"], dt)
    case.add("acc", acc, "output",
             produced_by={"op": "quant_grouped_matmul", "args": ["x_q", "weights", "group_list"]})
    case.add("y", y, "output", criterion=Y_ULP, note=_WHY_ULP,
             produced_by={"op": "group_dequantize", "args": ["acc", "weight_scale * x_scale",
                                                             "group_list"]})
    return [case]


def _away_from_rounding_boundaries(acc, weight_scale, act_scale, group_list):
    """acc with its up columns nudged until no h / scale of
    dequant_swiglu_quant lies within DSQ_MARGIN of a half-integer, computed in float64, so
    the int8 output is the same for every correct kernel (an exp or a product within a few
    float32 ulps moves h / scale by at most ~127 * 4 * 2^-24, far below the margin)."""
    acc = acc.copy()
    R, two_i = acc.shape
    I = two_i // 2
    bounds = group_bounds(group_list, weight_scale.shape[0], R)
    valid = int(bounds[-1])
    row_ws = group_rows_scale(bounds, np.asarray(weight_scale, np.float32),
                              valid).astype(np.float64)
    a = np.asarray(act_scale, np.float64)[:valid, None]
    for _ in range(100):
        v = acc[:valid].astype(np.float64) * row_ws * a
        g, u = v[:, :I], v[:, I:]
        h = g / (1 + np.exp(-g)) * u
        amax = np.abs(h).max(1, keepdims=True)
        q = np.abs(h) / np.where(amax > 0, amax, 1) * 127
        near = np.abs(q - np.floor(q) - 0.5) < DSQ_MARGIN
        if not near.any():
            return acc
        rows, cols = np.nonzero(near)        # q is proportional to the up accumulator:
        up = acc[rows, I + cols].astype(np.float64)  # move it by ~3 margins of q
        step = np.maximum(1, np.ceil(3 * DSQ_MARGIN * np.abs(up) / np.maximum(q[rows, cols],
                                                                            1e-9)))
        acc[rows, I + cols] += (np.where(up < 0, -1, 1) * step).astype(np.int32)
    raise RuntimeError("dequant_swiglu_quant golden: could not leave the rounding boundaries")


def _dequant_swiglu_quant_cases(ctx) -> list:
    c = ctx.config
    E, I = c.num_experts, c.moe_intermediate_size
    d, x, token, w13, w13_scale = _expert_stage(ctx)                   # w13_scale [E, 2I]
    x_q, t_scale = ops.dynamic_quantize(x)
    acc = ops.quant_grouped_matmul(x_q[token], w13, d["expert_cumsum"])      # [R, 2I]
    act_scale = t_scale[token].astype(np.float32)                             # [R]
    acc = _away_from_rounding_boundaries(acc, w13_scale, act_scale, d["expert_cumsum"])
    case = ctx.case(
        "dequant_swiglu_quant", "", "the dynamic W8A8 MoE path's fused activation "
        "(npu_dequant_swiglu_quant, activate_left, quant_mode dynamic): dequantise the "
        "gate/up accumulators, SwiGLU, requantise per row",
        {"num_experts": E, "rows": int(acc.shape[0]), "intermediate": I,
         "layout": f"acc [R, {2 * I}] int32 (gate columns then up, from the gate/up grouped "
                   f"matmul of per-token quantised rows); weight_scale [E, {2 * I}] float32; "
                   f"activation_scale [R] float32 (each row's token scale); group_list int64 "
                   f"[E] cumulative; h_q [R, {I}] int8; scale [R] float32",
         "formula": "v = float32(acc) * weight_scale[e of row] * activation_scale[row]; h = "
                    "silu(v[:, :I]) * v[:, I:] (float32, no rounding between); scale = "
                    "max|h| / 127 per row; h_q = clamp(rint(h / scale))"},
        ["dequant_swiglu_quant"], {"default": "exact", "why": _WHY_EXACT})
    case.add("acc", acc, "input")
    case.add("weight_scale", w13_scale, "input")
    case.add("activation_scale", act_scale, "input")
    case.add("group_list", d["expert_cumsum"].astype(np.int64), "input")
    h_q, scale = ops.dequant_swiglu_quant(acc, w13_scale, act_scale, d["expert_cumsum"])
    produced = {"op": "dequant_swiglu_quant",
                "args": ["acc", "weight_scale", "activation_scale", "group_list"]}
    case.add("h_q", h_q, "output", produced_by=produced,
             note="exact: no h / scale lies within 0.002 of a rounding boundary (the up "
                  "accumulators were nudged), so an exp or product within a few ulps cannot "
                  "move an integer")
    case.add("scale", scale, "output", criterion=DSQ_SCALE_ULP, produced_by=produced,
             note="max|h| / 127: h moves by up to 3 ulps between correct silu kernels")
    return [case]


BUILDERS = {"quant_matmul": _quant_matmul_cases,
            "dynamic_quant_matmul": _dynamic_quant_matmul_cases,
            "quant_grouped_matmul": _quant_grouped_matmul_cases,
            "dequant_swiglu_quant": _dequant_swiglu_quant_cases}
