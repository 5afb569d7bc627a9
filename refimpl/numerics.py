"""Numerics modes: which dtype stores values, which dtype accumulates, where rounding happens.

A mode names the *storage* dtype of weights and activations. Every operator takes arrays in
the storage dtype, upcasts to the *accumulation* dtype, computes, and rounds its result back to
the storage dtype. float64 in means float64 math throughout; every other dtype accumulates in
float32 (bf16/fp16 products are exact in float32).

The cast points are data, `CAST_POINTS` below (one entry per operator: the lines of its
rule), rendered as a table by `cast_point_table()` into this docstring, docs/numerics.md and
every golden manifest. "round" means: cast to the storage dtype (round to nearest even),
continue from that value.

In fp32 and fp64 modes every "round" is the identity (the value is already in that dtype).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import ConfigError

#: operator -> its cast points, as the lines of the table (THE place they are written down;
#: they follow Hugging Face eager code)
CAST_POINTS = {
    'embedding': (
        'a row of the table, in storage dtype (no arithmetic)',
    ),
    'linear': (
        'y = round(x @ W^T + b); the product accumulates in float32 and the bias is',
        'added in float32 before the one rounding',
    ),
    'rms_norm': (
        'n = round(x * 1/sqrt(mean(x^2) + eps)) computed in float32 from x;',
        'y = round(weight * n)   (the normalised value is rounded *before* the weight)',
    ),
    'rope tables': (
        'angles in float64 ("exact", default) or float32 (HF recipe); cos, sin are',
        'rounded to the storage dtype before use',
    ),
    'apply_rope': (
        'y = round(round(x * cos) + round(rotate_half(x) * sin))',
    ),
    'attention': (
        's = round(q @ k^T); s = round(s * head_dim**-0.5); causal mask;',
        'p = round(softmax_float32(s)); o = round(p @ v)',
    ),
    'swiglu': (
        'g = linear(x, Wg); u = linear(x, Wu); a = round(silu(g)); h = round(a * u);',
        'y = linear(h, Wd)',
    ),
    'residual add': (
        'round(x + f(x))',
    ),
    'moge_route': (
        'logits = linear(x, W_gate) (storage dtype); p = softmax in float32;',
        'weights = p[e] * router_scale[e] in float32 (returned in float32)',
    ),
    'moe block': (
        'w = round(weights); y = 0 in storage dtype; for each selected expert in',
        'ascending id: y[tok] = round(y[tok] + round(w * expert(x[tok])));',
        'then y = round(y + shared_expert(x))',
    ),
    'logits': (
        'lm_head = linear, in storage dtype',
    ),
    'quantize': (
        'x_q = clamp(rint(float32(x) * r + offset), -128, 127), r = round(1 / input_scale)',
        '(static; the product rounded to float32, then the offset); dynamic: t = max|x|/127',
        'in float32, x_q = clamp(rint(x / t)); rint is round half to even',
    ),
    'quant_matmul': (
        'acc = x_q @ w_q^T exact in int32; y = round(float32(acc + quant_bias) * deq_scale)',
        '(static) or round(float32(acc) * weight_scale * token_scale [+ bias]) (dynamic)',
    ),
    'rejection_sample': (
        'probabilities float32 (float64 in fp64); accept iff q(x) > 0 and p(x) / q(x) >= u',
        '(one division, one comparison); recovered = argmax(max(p - q, 0) / E) in the same',
        'dtype, lowest id on ties; greedy: argmax of the target scores, lowest id on ties',
    ),
    'dequant_swiglu_quant': (
        'v = float32(acc) * weight_scale * activation_scale; h = silu(v_gate) * v_up in',
        'float32 (no rounding); per row scale = max|h| / 127, h_q = clamp(rint(h / scale))',
    ),
}


def cast_point_table() -> str:
    """CAST_POINTS as the fixed-width table of docs/numerics.md."""
    rule = "=" * 14 + "  " + "=" * 78
    out = [rule, f"{'operator':<16}cast points", rule]
    for op, lines in CAST_POINTS.items():
        out.extend(f"{op if i == 0 else '':<16}{line}".rstrip() for i, line in enumerate(lines))
    out.append(rule)
    return "\n".join(out)


def cast_point_text(operator: str) -> str:
    """One operator's rule as a single line (what a golden manifest records)."""
    return " ".join(line.strip() for line in CAST_POINTS[operator])

bfloat16 = np.dtype(ml_dtypes.bfloat16)

#: mode name -> storage dtype of weights and activations
STORAGE_DTYPES = {
    "fp64": np.dtype(np.float64),
    "fp32": np.dtype(np.float32),
    "bf16": bfloat16,
    "fp16": np.dtype(np.float16),
}
MODES = tuple(STORAGE_DTYPES)

_DTYPE_NAMES = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def storage_dtype(mode: str) -> np.dtype:
    """The storage dtype of a numerics mode ('fp64', 'fp32', 'bf16', 'fp16')."""
    if mode not in STORAGE_DTYPES:
        raise ConfigError(f"unknown numerics mode {mode!r}; choose one of {', '.join(MODES)}")
    return STORAGE_DTYPES[mode]


def mode_of(dtype) -> str:
    """The numerics mode whose storage dtype is `dtype`."""
    name = np.dtype(dtype).name
    if name not in _DTYPE_NAMES:
        raise ConfigError(f"dtype {name} is not a numerics storage dtype")
    return _DTYPE_NAMES[name]


def accum_dtype(dtype) -> np.dtype:
    """float64 accumulates in float64; float32, bfloat16 and float16 accumulate in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def to_accum(x: np.ndarray) -> np.ndarray:
    """x upcast to its accumulation dtype (no copy when it already is)."""
    return np.asarray(x).astype(accum_dtype(x.dtype), copy=False)


def round_to(x: np.ndarray, dtype) -> np.ndarray:
    """Round x to `dtype` and return it in the accumulation dtype of `dtype`.

    This is the "round" of the cast-point table: the value continues in the accumulation
    dtype, but equals a representable value of the storage dtype.
    """
    dtype = np.dtype(dtype)
    acc = accum_dtype(dtype)
    if x.dtype == dtype and dtype == acc:
        return x
    return x.astype(dtype).astype(acc)


def to_storage(x: np.ndarray, dtype) -> np.ndarray:
    """Cast to the storage dtype (round to nearest even); no copy when already there."""
    return np.asarray(x).astype(dtype, copy=False)


# the table in the module's help; an assignment, so it is there under python -OO too
__doc__ = (__doc__ or "") + "\n" + cast_point_table() + "\n"
