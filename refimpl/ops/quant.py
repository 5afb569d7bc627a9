"""W8A8 quantisation as Ascend serves it (msModelSlim checkpoints on vllm-ascend / torch_npu;
DEPLOYMENT.md section 4): quantise, int8 matmul with an exact int32 accumulator, dequantise,
the MoE path's fused dequant-SwiGLU-requant and quantised grouped matmul, and the C8 KV cache.

Integers are exact by construction: an int8 x int8 product is at most 2^14 in magnitude, so a
dot product of k < 2^38 terms is an integer below 2^53 and float64 arithmetic (BLAS, any
summation order) computes it exactly; `int8_matmul` uses that and returns int32 (the Ascend
accumulator). Everything after the accumulator is float32, rounded once to the output dtype.

Schemes (per linear, named in quant_model_description.json):

  W8A8 (static)   weight int8 [n, k] symmetric per output channel (weight_scale [n, 1]);
                  activation per tensor, asymmetric: input_scale s, input_offset o ([1]);
                  deq_scale[n] = s * weight_scale[n] (float32); quant_bias[n] (int32)
                  = rint(bias[n] / deq_scale[n]) - o * sum_k w_q[n, k].
                  x_q = clamp(rint(x * r + o)), r = 1 / s rounded to the activation dtype
                  (vllm-ascend's aclnn_input_scale_reciprocal; npu_quantize, div_mode=False);
                  y = (x_q @ w_q^T + quant_bias) * deq_scale        (npu_quant_matmul)
  W8A8_DYNAMIC    weight as above, offset 0; per token, symmetric: t = max|x_row| / 127,
                  x_q = clamp(rint(x / t));  y = x_q @ w_q^T * weight_scale * t
                                                         (npu_dynamic_quant, npu_quant_matmul)

rint is round half to even; clamp is to [-128, 127].
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..numerics import accum_dtype, round_to, to_accum
from .basic import silu
from .moe_stages import group_bounds, grouped_matmul

INT8_MIN, INT8_MAX = -128, 127
#: symmetric int8 range used by every per-channel / per-token scale: max|x| maps to 127
INT8_LEVELS = 127.0


#: the longest reduction whose int32 accumulator cannot overflow: k * 128 * 128 < 2^31
MAX_INT8_REDUCTION = 2**31 // (128 * 128) - 1


def rint_clamp_int8(t: np.ndarray) -> np.ndarray:
    """clamp(round_half_even(t), -128, 127) as int8 (NaN is refused). # [...] -> int8 [...]"""
    t = np.asarray(t)
    if np.isnan(t).any():
        raise InputError("quantize: NaN in the values to quantise")
    return np.clip(np.rint(t), INT8_MIN, INT8_MAX).astype(np.int8)


def quantize(x: np.ndarray, scale, offset=None, div_mode: bool = True) -> np.ndarray:
    """x_q = clamp(rint(x / scale + offset)) (div_mode) or clamp(rint(x * scale + offset)).

    # x [..., k], scale and offset broadcast along the last axis ([1] per tensor, [k] per
    # channel) -> int8 [..., k]
    npu_quantize's arithmetic: x, scale and offset upcast to float32 (float64 for float64
    x), one division or multiplication, the offset added, then round half to even and
    clamp to [-128, 127]. offset None means 0.
    """
    xa = to_accum(np.asarray(x))
    s = np.asarray(scale).astype(xa.dtype)
    t = xa / s if div_mode else xa * s
    if offset is not None:
        t = t + np.asarray(offset).astype(xa.dtype)
    return rint_clamp_int8(t)


def static_input_reciprocal(input_scale, dtype) -> np.ndarray:
    """r = 1 / input_scale, rounded to the activation dtype: what vllm-ascend's W8A8 linear
    multiplies by (AscendW8A8LinearMethod.process_weights_after_loading). # [1] -> [1]"""
    s = to_accum(np.asarray(input_scale).astype(dtype))
    return round_to(np.asarray(1.0, s.dtype) / s, dtype)


def static_quantize(x: np.ndarray, input_scale, input_offset) -> np.ndarray:
    """The W8A8 (static) activation quantisation: clamp(rint(x * r + o)), r =
    `static_input_reciprocal`. # [..., k] -> int8 [..., k]"""
    r = static_input_reciprocal(input_scale, x.dtype)
    return quantize(x, r, np.asarray(input_offset).astype(np.float64), div_mode=False)


def dynamic_quantize(x: np.ndarray):
    """Per-row symmetric quantisation (npu_dynamic_quant).

    # x [R, k] -> (x_q int8 [R, k], scale float32 [R])
    scale = max_k |x| / 127 in float32 (float64 for float64 x); x_q = clamp(rint(x / scale)).
    A row of zeros gets scale 0 and x_q 0 (its product is 0 whatever the scale).
    """
    xa = to_accum(np.asarray(x))
    amax = np.max(np.abs(xa), axis=-1) if xa.shape[-1] else np.zeros(xa.shape[:-1], xa.dtype)
    scale = (amax / xa.dtype.type(INT8_LEVELS)).astype(xa.dtype)            # [R]
    safe = np.where(scale > 0, scale, xa.dtype.type(1.0))
    return rint_clamp_int8(xa / safe[..., None]), scale


def check_int8(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.int8:
        raise InputError(f"{name} must be int8, got {a.dtype}")
    return a


def check_int8_shapes(x_q: np.ndarray, w_q: np.ndarray) -> None:
    """InputError unless x_q [T, k] and w_q [n, k] agree and k keeps int32 exact."""
    if x_q.ndim != 2 or w_q.ndim != 2 or x_q.shape[1] != w_q.shape[1]:
        raise InputError(f"int8 matmul: x_q {list(x_q.shape)} and weight {list(w_q.shape)} "
                         "must be [T, k] and [n, k]")
    if x_q.shape[1] > MAX_INT8_REDUCTION:
        raise InputError(f"int8 matmul: k = {x_q.shape[1]} could overflow the int32 "
                         f"accumulator (at most {MAX_INT8_REDUCTION})")


def int8_matmul(x_q: np.ndarray, w_q: np.ndarray) -> np.ndarray:
    """acc = x_q @ w_q^T, exact, as int32 (the Ascend accumulator).

    # x_q int8 [T, k], w_q int8 [n, k] -> int32 [T, n]
    Computed in float64, where every partial sum of int8 products is an exact integer (see
    the module docstring), so any summation order gives the same integers.
    """
    x_q, w_q = check_int8("x_q", x_q), check_int8("weight", w_q)
    check_int8_shapes(x_q, w_q)
    return (x_q.astype(np.float64) @ w_q.astype(np.float64).T).astype(np.int32)


def decode_deq_scale(deq_scale) -> np.ndarray:
    """deq_scale as float32: float32 as is; int64 holding float32 bits (fp16 models,
    vllm-ascend's scale_from_float_to_int64) decoded from its low 32 bits. # [n] -> f32 [n]"""
    d = np.asarray(deq_scale)
    if d.dtype == np.int64:
        return (d & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    if d.dtype != np.float32:
        raise InputError(f"deq_scale must be float32 or int64 (float32 bits), got {d.dtype}")
    return d


def encode_deq_scale(deq_scale: np.ndarray) -> np.ndarray:
    """float32 deq_scale -> int64 holding its bits, sign-extended from int32 (as vllm-ascend's
    scale_from_float_to_int64). # f32 [n] -> int64 [n]"""
    return np.asarray(deq_scale, np.float32).view(np.int32).astype(np.int64)


def dequantize(acc: np.ndarray, scale, dtype, quant_bias=None, pertoken_scale=None,
               bias=None) -> np.ndarray:
    """y = round((acc + quant_bias) * scale [* pertoken_scale] [+ bias]) in `dtype`.

    # acc int32 [T, n], scale [n] (deq_scale, or weight_scale for the dynamic scheme),
    # quant_bias int32 [n] or None, pertoken_scale [T] or None, bias [n] or None
    # -> dtype [T, n]
    acc + quant_bias is exact int32; it is converted to float32 (float64 when dtype is
    float64), multiplied by scale then by pertoken_scale, the float bias (the dynamic
    scheme's) added, and rounded once.
    """
    acc = np.asarray(acc)
    if acc.dtype != np.int32:
        raise InputError(f"the accumulator must be int32, got {acc.dtype}")
    if quant_bias is not None:
        qb = np.asarray(quant_bias)
        if qb.dtype != np.int32:
            raise InputError(f"quant_bias must be int32, got {qb.dtype}")
        acc = (acc.astype(np.int64) + qb).astype(np.int32)
    ad = accum_dtype(dtype)
    y = acc.astype(ad) * np.asarray(scale).astype(ad)
    if pertoken_scale is not None:
        y = y * np.asarray(pertoken_scale).astype(ad)[:, None]
    if bias is not None:
        y = y + to_accum(np.asarray(bias)).astype(ad)
    return y.astype(dtype)


def quant_matmul(x_q: np.ndarray, w_q: np.ndarray, deq_scale, dtype, quant_bias=None,
                 pertoken_scale=None, matmul=None) -> np.ndarray:
    """npu_quant_matmul: `dequantize(int8_matmul(x_q, w_q), scale_vector(deq_scale), ...)`;
    deq_scale is the static scheme's deq_scale or the dynamic scheme's weight_scale.
    # x_q int8 [T, k], w_q int8 [n, k] -> dtype [T, n]
    `matmul` replaces `int8_matmul` (the kernels pass their Numba one; the integers are
    the same by construction)."""
    acc = (matmul or int8_matmul)(x_q, w_q)                               # int32 [T, n]
    return dequantize(acc, scale_vector(deq_scale), dtype, quant_bias, pertoken_scale)


def scale_vector(scale) -> np.ndarray:
    """A per-channel scale as a float vector: deq_scale (float32, or int64 float32 bits) or
    weight_scale ([n, 1] in the model dtype, upcast exactly). # -> [n]"""
    s = np.asarray(scale)
    if s.dtype == np.int64:
        return decode_deq_scale(s.reshape(-1))
    return to_accum(s.reshape(-1))


def w8a8_linear(x: np.ndarray, q: dict, record=None, matmul=None) -> np.ndarray:
    """A quantised linear on activations x in their storage dtype.

    # x [T, k] -> [T, n];  q: the linear's tensors (weight int8 [n, k], weight_scale [n, 1],
    # and for the static scheme input_scale, input_offset, deq_scale, quant_bias), plus
    # q["scheme"] "W8A8" | "W8A8_DYNAMIC" and q.get("bias") (the float bias: folded into
    # quant_bias by the static scheme, so only the dynamic scheme adds it)
    `record(name, array)` receives x_q, acc (int32, before bias and dequantisation) and
    (dynamic) token_scale. `matmul` replaces `int8_matmul` (as in `quant_matmul`).
    """
    dt, matmul = x.dtype, matmul or int8_matmul
    if q["scheme"] == "W8A8":
        x_q = static_quantize(x, q["input_scale"], q["input_offset"])       # [T, k]
        acc = matmul(x_q, q["weight"])                                       # [T, n]
        y = dequantize(acc, decode_deq_scale(q["deq_scale"]), dt, q["quant_bias"])
    elif q["scheme"] == "W8A8_DYNAMIC":
        x_q, token_scale = dynamic_quantize(x)                               # [T, k], [T]
        acc = matmul(x_q, q["weight"])
        y = dequantize(acc, to_accum(np.asarray(q["weight_scale"]).reshape(-1)), dt,
                       pertoken_scale=token_scale, bias=q.get("bias"))
        if record:
            record("token_scale", token_scale)
    else:
        raise InputError(f"unknown quantisation scheme {q['scheme']!r}")
    if record:
        record("x_q", x_q)
        record("acc", acc)
    return y


# ---------------------------------------------------------------------- the MoE path
def quant_grouped_matmul(x_q: np.ndarray, weights, group_list,
                         group_list_type: str = "cumsum", matmul=None) -> np.ndarray:
    """Grouped int8 matmul to int32 (npu_grouped_matmul with output_dtype int32): rows of
    group e times weights[e]^T, exact.

    # x_q int8 [R, k], weights int8 [E, n, k] (or a sequence), group_list [E] -> int32 [R, n]
    Rows past the last group are not read and come back 0; an empty group reads nothing.
    `matmul` replaces `int8_matmul` (as in `quant_matmul`).
    """
    return grouped_matmul(check_int8("x_q", x_q), weights, group_list, group_list_type,
                          product=matmul or int8_matmul, out_dtype=np.int32)


def group_rows_scale(row_bounds, per_group, R: int) -> np.ndarray:
    """Each row's entry of a per-group table: row r in group e gets per_group[e].
    # row_bounds [E + 1], per_group [E, ...] -> [R, ...] (rows past the groups: zeros)"""
    per_group = np.asarray(per_group)
    out = np.zeros((R,) + per_group.shape[1:], per_group.dtype)
    for e in range(len(row_bounds) - 1):
        out[row_bounds[e]:row_bounds[e + 1]] = per_group[e]
    return out


def dequant_swiglu_quant(acc: np.ndarray, weight_scale, activation_scale, group_list,
                         group_list_type: str = "cumsum"):
    """The MoE path's fused activation (npu_dequant_swiglu_quant, activate_left, dynamic).

    # acc int32 [R, 2I] (gate columns then up), weight_scale [E, 2I] float32,
    # activation_scale [R] float32 (the rows' token scales), group_list [E]
    # -> (h_q int8 [R, I], scale float32 [R])
    v = acc * weight_scale[e of row] * activation_scale[row]    (float32)
    h = silu(v[:, :I]) * v[:, I:]                               (float32, no rounding)
    (h_q, scale) = dynamic_quantize(h)                          (per row)
    Rows past the last group are not read and come back 0 with scale 0.
    """
    acc = np.asarray(acc)
    if acc.dtype != np.int32:
        raise InputError(f"dequant_swiglu_quant: acc must be int32, got {acc.dtype}")
    R, two_i = acc.shape
    if two_i % 2:
        raise InputError(f"dequant_swiglu_quant: acc has {two_i} columns (gate and up: even)")
    ws = np.asarray(weight_scale, np.float32)
    E = ws.shape[0]
    bounds = group_bounds(group_list, E, R, group_list_type)
    valid = int(bounds[-1])
    row_ws = group_rows_scale(bounds, ws, valid)                              # [valid, 2I]
    v = acc[:valid].astype(np.float32) * row_ws \
        * np.asarray(activation_scale, np.float32)[:valid, None]             # [valid, 2I]
    I = two_i // 2
    h = silu(v[:, :I]) * v[:, I:]                                             # [valid, I]
    h_q = np.zeros((R, I), np.int8)
    scale = np.zeros(R, np.float32)
    h_q[:valid], scale[:valid] = dynamic_quantize(h)
    return h_q, scale


def group_dequantize(acc: np.ndarray, weight_scale, group_list, dtype, pertoken_scale=None,
                     group_list_type: str = "cumsum") -> np.ndarray:
    """The dequantisation of a grouped matmul's int32 rows: row r of group e gives
    round(acc[r] * weight_scale[e] [* pertoken_scale[r]]) in dtype (float32 arithmetic).
    # acc int32 [R, n], weight_scale [E, n] -> dtype [R, n] (rows past the groups: 0)"""
    ws = np.asarray(weight_scale, np.float32)
    bounds = group_bounds(group_list, ws.shape[0], acc.shape[0], group_list_type)
    valid = int(bounds[-1])
    out = np.zeros(acc.shape, dtype)
    ad = accum_dtype(dtype)
    y = acc[:valid].astype(ad) * group_rows_scale(bounds, ws, valid).astype(ad)
    if pertoken_scale is not None:
        y = y * np.asarray(pertoken_scale).astype(ad)[:valid, None]
    out[:valid] = y.astype(dtype)
    return out


def _expert_table(chosen: dict, index: int, E: int) -> np.ndarray:
    """[E, n] float32 table of one per-channel scale of the chosen experts (zeros for the
    others, whose groups are empty)."""
    n = np.asarray(next(iter(chosen.values()))[index]).size
    table = np.zeros((E, n), np.float32)
    for e, parts in chosen.items():
        table[e] = np.asarray(parts[index], np.float32).reshape(-1)
    return table


def quant_moe_block(x: np.ndarray, gate_weight: np.ndarray, router_scale: np.ndarray,
                    experts, shared_expert, num_groups: int, scheme: str, record=None,
                    expert_ids=None, router_softmax_dtype: str = "float32",
                    num_voted_experts=None, matmul=None) -> np.ndarray:
    """The W8A8 MoGE block as vllm-ascend's fused MoE runs it (DEPLOYMENT.md section 4).

    # x [T, H], gate_weight [E, H] (FLOAT), router_scale [1, E] -> [T, H]
    `experts[e]` gives expert e's (w13 int8 [2I, H] (gate rows then up rows), w13_scale
    float32 [2I], w2 int8 [H, I], w2_scale float32 [H]), read only for selected experts;
    `experts.input_scales` the layer's (s13, s2) (W8A8: one per-tensor scale for all
    experts, the max of their input_scale); `shared_expert(x, record)` the quantised
    shared expert. Routing is the float model's (`moe_route_block`), then:

    W8A8:          x_q = quantize(x, s13, div_mode)   once, before dispatch, no offset
                   gate_up = round(gmm(x_q[rows]) * (w13_scale[e] * s13))     (float32)
                   act = silu_and_mul(gate, up);  a_q = quantize(act, s2, div_mode)
                   down = round(gmm(a_q) * (w2_scale[e] * s2))
    W8A8_DYNAMIC:  (x_q, t) = dynamic_quantize(x)     once, before dispatch
                   (a_q, t2) = dequant_swiglu_quant(gmm(x_q[rows]), w13_scale, t[rows])
                   down = round(gmm(a_q) * w2_scale[e] * t2)
    routed = moe_combine(down, round(weights), expanded_row_idx) (the finalize: weights
    applied in float32, one rounding); y = round(routed + shared).
    gmm is `quant_grouped_matmul` (exact int32). `record` receives the router's taps and
    stages.{x_q, token_scale (dynamic), gate_up_acc, act_q, act_scale (dynamic), down_acc,
    down, routed} plus shared_expert_out.
    """
    from .mlp import silu_and_mul
    from .moe import moe_route_block
    from .moe_stages import moe_combine, moe_dispatch, slot_token_choice

    dt, T = x.dtype, x.shape[0]
    rec = record or (lambda name, array: None)
    router_logits, ids, weights = moe_route_block(
        x, gate_weight, router_scale, num_groups, expert_ids, router_softmax_dtype,
        num_voted_experts)
    E, G = router_logits.shape[1], ids.shape[1]
    rec("router_logits", router_logits), rec("expert_ids", ids), rec("expert_weights", weights)
    d = moe_dispatch(ids, E, "v1")
    token = slot_token_choice(d["sorted_row_idx"], T, G)[0]                 # [R] row -> token
    group_list = d["expert_cumsum"]
    chosen = {int(e): experts[int(e)] for e in np.flatnonzero(d["expert_counts"])}
    w13 = [chosen.get(e, (None,))[0] for e in range(E)]
    w2 = [chosen[e][2] if e in chosen else None for e in range(E)]
    w13_scale, w2_scale = _expert_table(chosen, 1, E), _expert_table(chosen, 3, E)
    if scheme == "W8A8":
        s13, s2 = (np.float32(s) for s in experts.input_scales)
        x_q = quantize(x, s13, None, div_mode=True)                          # [T, H]
        acc13 = quant_grouped_matmul(x_q[token], w13, group_list, matmul=matmul)  # [R, 2I]
        gate_up = group_dequantize(acc13, w13_scale * s13, group_list, dt)  # [R, 2I]
        I = gate_up.shape[1] // 2
        act_q = quantize(silu_and_mul(gate_up[:, :I], gate_up[:, I:]), s2, None,
                         div_mode=True)                                      # [R, I]
        acc2 = quant_grouped_matmul(act_q, w2, group_list, matmul=matmul)    # [R, H]
        down = group_dequantize(acc2, w2_scale * s2, group_list, dt)
    elif scheme == "W8A8_DYNAMIC":
        x_q, t_scale = dynamic_quantize(x)                                   # [T, H], [T]
        rec("stages.token_scale", t_scale)
        acc13 = quant_grouped_matmul(x_q[token], w13, group_list, matmul=matmul)
        act_q, act_scale = dequant_swiglu_quant(acc13, w13_scale, t_scale[token], group_list)
        rec("stages.act_scale", act_scale)
        acc2 = quant_grouped_matmul(act_q, w2, group_list, matmul=matmul)
        down = group_dequantize(acc2, w2_scale, group_list, dt, pertoken_scale=act_scale)
    else:
        raise InputError(f"unknown quantisation scheme {scheme!r}")
    routed = moe_combine(down, weights.astype(dt), d["expanded_row_idx"])   # [T, H]
    for name, a in (("x_q", x_q), ("gate_up_acc", acc13), ("act_q", act_q),
                    ("down_acc", acc2), ("down", down), ("routed", routed)):
        rec(f"stages.{name}", a)
    shared = shared_expert(x, record)                                        # [T, H]
    rec("shared_expert_out", shared)
    return round_to(to_accum(routed) + to_accum(shared), dt).astype(dt)


# ---------------------------------------------------------------------- C8 KV cache
def kv_quantize(kv: np.ndarray, scale) -> np.ndarray:
    """C8: per-channel symmetric int8 keys or values, kv_q = clamp(rint(kv / scale)).
    # kv [T, Hkv, D], scale [Hkv*D] -> int8 [T, Hkv, D]"""
    T, Hkv, D = kv.shape
    return quantize(kv.reshape(T, Hkv * D), scale, None, div_mode=True).reshape(T, Hkv, D)


def kv_dequantize(kv_q: np.ndarray, scale, dtype) -> np.ndarray:
    """kv = round(kv_q * scale) in dtype (float32 product). # int8 [S, Hkv, D] -> [S, Hkv, D]"""
    S, Hkv, D = kv_q.shape
    ad = accum_dtype(dtype)
    y = kv_q.reshape(S, Hkv * D).astype(ad) * np.asarray(scale).astype(ad)
    return y.astype(dtype).reshape(S, Hkv, D)


__all__ = ["INT8_MIN", "INT8_MAX", "quantize", "static_quantize", "static_input_reciprocal",
           "dynamic_quantize", "int8_matmul", "dequantize", "quant_matmul", "w8a8_linear",
           "decode_deq_scale", "encode_deq_scale", "quant_grouped_matmul",
           "dequant_swiglu_quant", "group_dequantize", "quant_moe_block", "kv_quantize",
           "kv_dequantize",
           "rint_clamp_int8"]
