"""Quantise a float checkpoint to msModelSlim-format W8A8 (static or dynamic), optionally C8.

    calibrate   run the float model (fp32 numerics) over calibration sequences and keep, per
                quantised linear, the min and max of its input (per expert for experts: the
                rows routed to it; q/k/v see the same input, as do gate/up)
    quantize    per linear:
      weights   per output channel, symmetric: s_n = max_k |W[n, k]| / 127, rounded to the
                scale dtype first, then w_q = clamp(rint(W / s_n)) (so the stored scale is
                the one the integers were made with)
      W8A8      activation per tensor, asymmetric over [min(lo, 0), max(hi, 0)]:
                s = (hi - lo) / 255 (rounded to the scale dtype), o = clamp(rint(-128 - lo / s));
                experts symmetric instead (s = max|x| / 127, o = 0), because vllm-ascend's
                fused MoE quantises the tokens once before dispatch with the layer's largest
                expert scale and no offset: every expert of a layer stores the layer's
                scale (`expert_input_scale`). deq_scale = s * s_n (float32), quant_bias =
                rint(bias / deq_scale) - o * sum_k w_q[n, k]
      W8A8_DYNAMIC  weights only (activation scales are per token at run time)
      C8        per channel of the key / value projections' outputs: kv_cache_scale =
                max |k| / 127 (float32) over the calibration set
    write       one tensor at a time into DIR.tmp-XXXX, renamed to DIR when complete
                (`refimpl.io.checkpoint.save_checkpoint`), with quant_model_description.json

Everything is deterministic: the same command writes bit-identical files.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from ..errors import InputError
from ..numerics import round_to
from ..ops.quant import INT8_LEVELS, INT8_MAX, INT8_MIN, encode_deq_scale, rint_clamp_int8
from ..taps import Taps
from .format import (DESCRIPTION_NAME, PARTS, check_scheme, description_of, is_expert,
                     is_quantisable, quant_tensor_specs)

#: the default calibration set: text the default model was not trained on
CALIBRATION_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "data", "heldout", "calibration.txt")
#: calibration sequences are cut to at most this many tokens
CALIB_SEQ_LEN = 256
#: asymmetric per-tensor levels: [lo, hi] maps onto [-128, 127]
ASYM_LEVELS = 255.0


# ---------------------------------------------------------------------- calibration data
def calibration_sequences(path, tokenizer, vocab_size: int,
                          seq_len: int = CALIB_SEQ_LEN) -> list:
    """Token sequences of a calibration file: one id list per line when every line is
    comma-separated integers, else text (one sequence per non-empty line, tokenised as
    `Tokenizer.encode` does, bos per the tokenizer's add_bos_token), cut to seq_len tokens."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [ln.strip() for ln in fh if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--calib {path}: cannot read ({exc})") from None
    if not lines:
        raise InputError(f"--calib {path}: the file holds no text or token ids")
    if all(_is_id_line(ln) for ln in lines):
        seqs = [[int(t) for t in ln.replace(" ", "").split(",") if t] for ln in lines]
    else:
        if tokenizer is None:
            raise InputError(f"--calib {path} is text, and the model has no tokenizer; give "
                             "token ids (comma-separated, one sequence per line)")
        seqs = [list(tokenizer.encode(ln)) for ln in lines]
    seqs = [s[:seq_len] for s in seqs if s]
    for s in seqs:
        bad = [t for t in s if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"--calib {path}: token id {bad[0]} is outside the vocabulary "
                             f"[0, {vocab_size})")
    return seqs


def _is_id_line(line: str) -> bool:
    parts = [p for p in line.replace(" ", "").split(",") if p]
    return bool(parts) and all(p.lstrip("-").isdigit() for p in parts)


# ---------------------------------------------------------------------- calibration
class Ranges:
    """Running min / max of each quantised linear's input (and of the K/V channels)."""

    def __init__(self):
        self.lo, self.hi, self.kv = {}, {}, {}

    def see(self, prefix: str, x) -> None:
        x = np.asarray(x, np.float32)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.lo[prefix] = min(lo, self.lo.get(prefix, lo))
        self.hi[prefix] = max(hi, self.hi.get(prefix, hi))

    def see_kv(self, name: str, kv) -> None:
        a = np.abs(np.asarray(kv, np.float32)).reshape(kv.shape[0], -1).max(axis=0)  # [Hkv*D]
        self.kv[name] = np.maximum(a, self.kv[name]) if name in self.kv else a


def calibrate(model, sequences, progress=None) -> Ranges:
    """Input ranges of every quantisable linear of a float `Model` over the sequences."""
    c, ops = model.config, model.ops
    r = Ranges()

    def act(x, prefix):                       # the down projection's input: silu(g) * u
        return ops.silu_and_mul(ops.linear(x, model.w(prefix + "gate_proj.weight")),
                                ops.linear(x, model.w(prefix + "up_proj.weight")))

    def see_mlp(prefix, x):
        for part in ("gate_proj", "up_proj"):
            r.see(prefix + part, x)
        r.see(prefix + "down_proj", act(x, prefix))

    for n, ids in enumerate(sequences):
        taps = Taps()
        model.forward(ids, taps=taps)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            t = lambda name: taps[f"layers.{i}.{name}"]  # noqa: E731
            for proj in "qkv":
                r.see(p + f"self_attn.{proj}_proj", t("input_norm"))
            r.see(p + "self_attn.o_proj", t("attn"))
            r.see_kv(p + "self_attn.k_proj.kv_cache_scale", t("k_rope"))
            r.see_kv(p + "self_attn.v_proj.kv_cache_scale", t("v"))
            if c.layer_is_moe(i):
                see_mlp(p + "mlp.shared_expert.", t("post_norm"))
                for e in range(c.num_experts):
                    name = f"layers.{i}.experts.{e}.in"
                    if name in taps:
                        see_mlp(p + f"mlp.experts.{e}.", taps[name])
            else:
                see_mlp(p + "mlp.", t("post_norm"))
        if progress:
            progress(n + 1, len(sequences))
    return r


# ---------------------------------------------------------------------- quantisation
def weight_quant(w, scale_dtype):
    """Per-output-channel symmetric int8: (w_q int8 [n, k], weight_scale [n, 1])."""
    wa = np.asarray(w).astype(np.float32)                                 # [n, k]
    amax = np.abs(wa).max(axis=1, keepdims=True) if wa.shape[1] else \
        np.zeros((wa.shape[0], 1), np.float32)
    scale = round_to(amax / np.float32(INT8_LEVELS), scale_dtype).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))                  # an all-zero row
    return rint_clamp_int8(wa / scale), scale.astype(scale_dtype)


def activation_quant(lo: float, hi: float, scale_dtype, symmetric: bool):
    """(input_scale [1] in scale_dtype, input_offset [1] int8) of an input range."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        s = max(-lo, hi) / INT8_LEVELS
    else:
        s = (hi - lo) / ASYM_LEVELS
    s = float(round_to(np.array([s], np.float32), scale_dtype)[0])
    if not s > 0:
        s = 1.0                                                          # input always 0
    off = 0 if symmetric else int(np.clip(np.rint(INT8_MIN - lo / s), INT8_MIN, INT8_MAX))
    return np.array([s], scale_dtype), np.array([off], np.int8)


def static_params(w_q, weight_scale, input_scale, input_offset, bias, deq_dtype):
    """(deq_scale [n], quant_bias int32 [n]) of a static W8A8 linear:
    deq_scale = input_scale * weight_scale (float32), quant_bias = rint(bias / deq_scale)
    - input_offset * sum_k w_q."""
    deq = (np.float32(np.asarray(input_scale, np.float32)[0])
           * np.asarray(weight_scale, np.float32).reshape(-1)).astype(np.float32)   # [n]
    qb = -np.int64(input_offset[0]) * w_q.astype(np.int64).sum(axis=1)                # [n]
    if bias is not None:
        qb = qb + np.rint(np.asarray(bias, np.float32).astype(np.float64)
                          / deq.astype(np.float64)).astype(np.int64)
    if np.abs(qb).max(initial=0) > np.iinfo(np.int32).max:
        raise InputError("quant_bias overflows int32 (a bias far larger than its scale)")
    deq_out = encode_deq_scale(deq) if np.dtype(deq_dtype) == np.int64 else deq
    return deq_out, qb.astype(np.int32)


def expert_input_scale(ranges, config, prefix: str, scale_dtype) -> np.ndarray:
    """The input scale every expert of a layer stores for one projection (gate and up, or
    down): symmetric over the largest |x| any expert of the layer saw in calibration.

    vllm-ascend quantises a MoE layer's tokens once, before dispatch, with one scale: the
    310P path takes the max over the experts' input_scale, the other path expert 0's
    (`w13_input_scale.repeat(1, n)[0:1]` then `.max(0)`, commit 728bed0248). Writing the
    layer's largest scale to every expert makes both readings the same number. # -> [1]
    """
    layer, rest = prefix.split(".mlp.experts.")
    part = rest.split(".", 1)[1]
    peers = [f"{layer}.mlp.experts.{e}.{part}" for e in range(config.num_experts)]
    seen = [p for p in peers if ranges is not None and p in ranges.lo]
    if not seen:
        raise InputError(f"calibration reached no expert of {layer}")
    lo = min(ranges.lo[p] for p in seen)
    hi = max(ranges.hi[p] for p in seen)
    return activation_quant(lo, hi, scale_dtype, symmetric=True)[0]


def quantized_tensors(config, weights, scheme: str, ranges: Ranges | None,
                      kv_cache: str | None = None):
    """(specs, produce, description) of the quantised checkpoint of float weights (as
    stored: their dtype is the model dtype): produce(name) computes one tensor (each
    linear's parts are computed together and kept until its last part is written)."""
    check_scheme(scheme)
    c = config
    model_dtype = np.dtype(weights["model.embed_tokens.weight"].dtype)
    specs = quant_tensor_specs(c, scheme, model_dtype, kv_cache)
    desc = description_of(specs, scheme, kv_cache)
    deq_dtype = np.int64 if model_dtype == np.float16 else np.float32    # vllm-ascend's
    pending: dict = {}

    def linear_parts(p: str) -> dict:
        sdt = specs[p + ".weight_scale"][1]
        w_q, ws = weight_quant(weights[p + ".weight"], sdt)
        parts = {"weight": w_q, "weight_scale": ws, "weight_offset": np.zeros_like(ws)}
        if scheme == "W8A8":
            if is_expert(p):
                xs, xo = expert_input_scale(ranges, c, p, sdt), np.array([0], np.int8)
            elif ranges is None or p not in ranges.lo:
                raise InputError(f"calibration never reached {p} (no calibration tokens?)")
            else:
                xs, xo = activation_quant(ranges.lo[p], ranges.hi[p], sdt, False)
            bias = weights.get(p + ".bias")
            deq, qb = static_params(w_q, ws, xs, xo, bias, deq_dtype)
            parts.update(input_scale=xs, input_offset=xo, deq_scale=deq, quant_bias=qb)
        return parts

    def produce(name: str) -> np.ndarray:
        if name.endswith(".kv_cache_scale"):
            if ranges is None or name not in ranges.kv:
                raise InputError(f"calibration never reached {name}")
            s = ranges.kv[name] / np.float32(INT8_LEVELS)
            return np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
        if name in weights and not (is_quantisable(name) and specs[name][1] == np.int8):
            return np.asarray(weights[name]).astype(specs[name][1], copy=False)
        p, _, part = name.rpartition(".")
        if part == "weight":
            pending[p] = linear_parts(p)
        parts = pending[p]
        out = parts[part]
        if part == PARTS[scheme][-1]:
            pending.pop(p, None)                 # the last part of this linear: drop it
        return out

    return specs, produce, desc


def quantize_checkpoint(config, weights, out_dir, scheme: str, sequences=None, kv_cache=None,
                        tokenizer=None, progress=None, backend: str = "numpy") -> dict:
    """Calibrate (static scheme or C8: a forward of the float model in fp32 numerics per
    sequence) and write the quantised checkpoint of float weights (as stored) to out_dir;
    return save_checkpoint's summary plus the scheme."""
    from ..io.checkpoint import check_new_dir, save_checkpoint
    from ..model import Model

    check_scheme(scheme)
    check_new_dir(out_dir)                      # before the calibration, not after
    model = Model(config, weights, numerics="fp32", backend=backend, lazy=True)
    need_ranges = scheme == "W8A8" or kv_cache is not None
    ranges = None
    if need_ranges:
        if not sequences:
            raise InputError("the W8A8 scheme and C8 need a calibration set (--calib FILE)")
        ranges = calibrate(model, sequences,
                           progress=(lambda i, n: progress("calibrate", i, n)) if progress
                           else None)
    specs, produce, desc = quantized_tensors(config, weights, scheme, ranges, kv_cache)
    written = [0]

    def counted(name):
        written[0] += 1
        if progress:
            progress("write", written[0], len(specs))
        return produce(name)

    summary = save_checkpoint(out_dir, config, counted, specs=specs,
                              extra_json={DESCRIPTION_NAME: desc}, tokenizer=tokenizer)
    summary["scheme"] = scheme
    summary["kv_cache"] = kv_cache
    return summary


def progress_bar(stage: str, i: int, n: int) -> None:
    """A one-line progress bar on stderr (redrawn in place on a terminal)."""
    width = 30
    filled = width * i // max(n, 1)
    line = f"{stage:9s} [{'#' * filled}{'.' * (width - filled)}] {i}/{n}"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line + ("\n" if i == n else ""))
    elif i == n or i % max(1, n // 10) == 0:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
