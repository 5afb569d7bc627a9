# %% [markdown]
# # 7. W8A8: int8 weights and activations, the integer path, and where the error comes from
#
# Ascend serves openPangu from msModelSlim **W8A8** checkpoints: every linear's weight is int8
# with one scale per output channel, its input is quantised to int8 too, and the matmul
# accumulates exactly in int32 before one float32 dequantisation. Here we quantise the
# embedded default model with refimpl's own quantiser, look at what it has to squeeze into
# 256 levels, follow one matmul through its integers, and measure which layer and which
# operator the model's error comes from. (Format and formulas: `docs/quantization.md`.)

# %%
%matplotlib inline
import json
import os
import tempfile

import numpy as np
import matplotlib.pyplot as plt

import refimpl
from refimpl import ops
from refimpl.io.checkpoint import DEFAULT_MODEL_DIR, load_model, load_weights
from refimpl.numerics import bfloat16
from refimpl.quant.format import DESCRIPTION_NAME
from refimpl.quant.quantize import (CALIBRATION_TEXT, calibration_sequences,
                                    quantize_checkpoint, weight_quant)
from refimpl.taps import Taps
from refimpl.tokenizer import Tokenizer

plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (8, 3.2), "axes.grid": True,
                     "grid.alpha": 0.3})
np.set_printoptions(precision=4, suppress=True, linewidth=110)

tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
config, float_weights = load_weights(DEFAULT_MODEL_DIR)          # the bf16 checkpoint
calib = calibration_sequences(CALIBRATION_TEXT, tok, config.vocab_size)
work = tempfile.mkdtemp(prefix="nb07-")
for scheme in ("W8A8", "W8A8_DYNAMIC"):
    quantize_checkpoint(config, float_weights, os.path.join(work, scheme), scheme,
                        calib if scheme == "W8A8" else None, tokenizer=DEFAULT_MODEL_DIR)
print(config.num_hidden_layers, "layers, hidden", config.hidden_size, "MLP",
      config.intermediate_size, "| calibrated on", len(calib), "sequences,",
      sum(map(len, calib)), "tokens")
print(sorted(os.listdir(os.path.join(work, "W8A8"))))

# %% [markdown]
# ## What a per-channel and a per-tensor scale keep and lose
#
# Symmetric int8 maps `[-s * 127, s * 127]` onto the integers `-127..127`: `w_q = rint(W / s)`,
# error at most `s / 2` per element. One scale for the whole matrix must cover its largest
# element; one scale **per output channel** (row) covers only that row's largest. Rows whose
# largest weight is small get a finer grid: that is what msModelSlim stores (`weight_scale
# [n, 1]`).

# %%
name = "model.layers.1.mlp.down_proj.weight"
W = float_weights[name].astype(np.float32)                       # [n, k] = [256, 640]
w_q, s_row = weight_quant(W, bfloat16)                           # per channel (the format's)
s_tensor = np.float32(np.abs(W).max() / 127)
err_row = np.abs(w_q.astype(np.float32) * s_row.astype(np.float32) - W)
err_tensor = np.abs(np.clip(np.rint(W / s_tensor), -127, 127) * s_tensor - W)
rel = lambda e: np.linalg.norm(e, axis=1) / np.linalg.norm(W, axis=1)

fig, ax = plt.subplots(1, 2, figsize=(11, 3.2))
ax[0].hist(W.ravel(), bins=120, color="C0", log=True)
ax[0].set(title=f"{name.split('model.')[1]}: weights", xlabel="value", ylabel="count (log)")
order = np.argsort(np.abs(W).max(1))
ax[1].plot(rel(err_tensor)[order], ".", ms=3, label="per-tensor scale", color="C3")
ax[1].plot(rel(err_row)[order], ".", ms=3, label="per-channel scale", color="C0")
ax[1].set(title="relative error of each output channel", xlabel="channel (by its max |w|)",
          yscale="log")
ax[1].legend()
plt.tight_layout()
plt.show()
print(f"row max |w|: {np.abs(W).max(1).min():.3f} .. {np.abs(W).max(1).max():.3f}")
print(f"relative error of the matrix: per channel {np.linalg.norm(err_row) / np.linalg.norm(W):.4f}, "
      f"per tensor {np.linalg.norm(err_tensor) / np.linalg.norm(W):.4f}")
assert (rel(err_row) <= rel(err_tensor) * 1.05).all()          # no channel is worse off
assert np.linalg.norm(err_row) < np.linalg.norm(err_tensor)
assert np.abs(w_q).max() == 127                                 # every row uses its full range

# %% [markdown]
# ## Activations: one range for every token (static) or one per token (dynamic)
#
# Static W8A8 fixes each linear's input range from a calibration set: `input_scale` and an
# `input_offset` for an asymmetric range `[lo, hi]`. Dynamic W8A8 measures `max|x|` of every
# token at run time. Below, the inputs of two linears over the held-out evaluation text (never
# used for calibration), taken from the float model: the attention projections' input (after
# RMSNorm) and the down projection's input (after SwiGLU), which is heavy-tailed.

# %%
with open(os.path.join(os.path.dirname(CALIBRATION_TEXT), "evaluation.txt")) as fh:
    eval_ids = [np.array(tok.encode(line.strip())) for line in fh if line.strip()]
fp32 = load_model(DEFAULT_MODEL_DIR, numerics="fp32")
L = 1
inputs = {"q/k/v input": [], "down_proj input": []}
for ids in eval_ids:
    t = Taps([L])
    fp32.forward(ids, taps=t)
    inputs["q/k/v input"].append(t[f"layers.{L}.input_norm"])
    pre = t[f"layers.{L}.post_norm"]
    pfx = f"model.layers.{L}.mlp."
    g = ops.linear(pre, fp32.w(pfx + "gate_proj.weight"))
    u = ops.linear(pre, fp32.w(pfx + "up_proj.weight"))
    inputs["down_proj input"].append(ops.silu_and_mul(g, u))
static = load_model(os.path.join(work, "W8A8"), numerics="w8a8")
usage = {}
fig, ax = plt.subplots(1, 2, figsize=(11, 3.2))
for a, (label, xs), proj in zip(ax, inputs.items(), ("self_attn.q_proj", "mlp.down_proj")):
    x = np.concatenate(xs)                                       # [tokens, k]
    q = static.quant_params(f"model.layers.{L}.{proj}")
    s, o = float(q["input_scale"][0]), int(q["input_offset"][0])
    lo, hi = (-128 - o) * s, (127 - o) * s                      # the static int8 range
    a.hist(x.ravel(), bins=150, log=True, color="C0")
    a.axvline(lo, color="C3"); a.axvline(hi, color="C3", label=f"static range (offset {o})")
    a.set(title=f"layer {L} {label}", xlabel="value")
    a.legend(fontsize=8)
    token_max = np.abs(x).max(1)
    clipped = np.mean((x < lo) | (x > hi))
    used = token_max / max(abs(lo), hi)
    usage[label] = np.median(used)
    print(f"{label:16s} static scale {s:.4g}, offset {o:4d}, range [{lo:.2f}, {hi:.2f}]; "
          f"clipped {clipped:.2%} of values; a token's max|x| uses {np.median(used):.0%} of it "
          f"(median)")
plt.tight_layout()
plt.show()
assert usage["down_proj input"] < usage["q/k/v input"]

# %% [markdown]
# The static range is a compromise for all tokens: most tokens use only part of it (fewer
# int8 levels, a coarser grid), and a few values beyond it are clipped. The dynamic scheme
# gives each token its full 127 levels, which is why it is the more accurate of the two below.
#
# ## One matmul through its integers
#
# Layer 0's `q_proj` of the static checkpoint, step by step with the spec's formulas, on the
# bf16 activations the model really feeds it (its `input_norm` tap). Every integer must equal
# what `Model` recorded in its taps.

# %%
ids = eval_ids[0]
taps = Taps([0])
logits_q = static.forward(ids, taps=taps)
prefix = "model.layers.0.self_attn.q_proj"
q = static.quant_params(prefix)
x = taps["layers.0.input_norm"]                                  # [T, 256] bf16
r = ops.quant.static_input_reciprocal(q["input_scale"], x.dtype)  # 1/s rounded to bf16
v = x.astype(np.float32) * r.astype(np.float32) + np.float32(q["input_offset"][0])
x_q = np.clip(np.rint(v), -128, 127).astype(np.int8)             # round half to even
acc = ops.int8_matmul(x_q, q["weight"])                          # exact int32
deq = ops.decode_deq_scale(q["deq_scale"])                       # float32 [n]
y = ((acc.astype(np.int64) + q["quant_bias"]).astype(np.float32) * deq).astype(x.dtype)
print("input_scale", q["input_scale"], "-> reciprocal in bf16", r, "(exact 1/s:",
      1 / np.float64(q["input_scale"].astype(np.float32)[0]), ")")
print("input_offset", q["input_offset"], "| x[0, :6]", x[0, :6].astype(np.float32))
print("x_q[0, :6]", x_q[0, :6], "| acc[0, :4]", acc[0, :4], "| quant_bias[:4]",
      q["quant_bias"][:4])
print("deq_scale[:4]", [f"{d:.3e}" for d in deq[:4]], "| y[0, :4]", y[0, :4].astype(np.float32))
assert np.array_equal(x_q, taps["layers.0.self_attn.q_proj.x_q"])
assert np.array_equal(acc, taps["layers.0.self_attn.q_proj.acc"])
T = len(ids)
assert np.array_equal(y.view(np.uint16), taps["layers.0.q"].reshape(T, -1).view(np.uint16))

# quant_bias folds the float bias and the offset: acc + quant_bias = sum (x_q - o) w_q + bias/deq
o = int(q["input_offset"][0])
exact = (x_q.astype(np.int64) - o) @ q["weight"].astype(np.int64).T
bias = static.w(prefix + ".bias").astype(np.float64)
folded = exact + np.rint(bias / deq.astype(np.float64))
assert np.array_equal(acc.astype(np.int64) + q["quant_bias"], folded)
# the integers against the float linear on the same input
y_float = ops.linear(x, float_weights[prefix + ".weight"], float_weights[prefix + ".bias"])
err = np.linalg.norm(y.astype(np.float64) - y_float.astype(np.float64)) / np.linalg.norm(
    y_float.astype(np.float64))
print(f"relative error of this W8A8 linear against the bf16 linear: {err:.4f}")

# %% [markdown]
# ## Where the model's error comes from: per layer
#
# The same evaluation text through the float model in fp32, bf16, and both W8A8 schemes. For
# every layer output, the relative error `||y - y_fp32|| / ||y_fp32||`: bf16's own error is the
# floor, W8A8's is what quantisation adds.

# %%
variants = {"bf16": load_model(DEFAULT_MODEL_DIR, numerics="bf16"), "W8A8": static,
            "W8A8_DYNAMIC": load_model(os.path.join(work, "W8A8_DYNAMIC"), numerics="w8a8")}
nL = config.num_hidden_layers
names = [f"layers.{i}.out" for i in range(nL)] + ["logits"]
errors = {v: np.zeros(len(names)) for v in variants}
nll = {v: 0.0 for v in ["fp32", *variants]}
agree = {v: 0 for v in variants}
count = 0
for ids in eval_ids:
    ref = Taps(range(nL))
    ref_logits = fp32.forward(ids, taps=ref).astype(np.float64)
    for v, m in variants.items():
        t = Taps(range(nL))
        lg = m.forward(ids, taps=t).astype(np.float64)
        for j, n in enumerate(names):
            a, b = t[n].astype(np.float64), ref[n].astype(np.float64)
            errors[v][j] += np.linalg.norm(a - b) / np.linalg.norm(b) / len(eval_ids)
        agree[v] += int((lg.argmax(1) == ref_logits.argmax(1)).sum())
        lp = lg[:-1] - lg[:-1].max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        nll[v] -= lp[np.arange(len(ids) - 1), ids[1:]].sum()
    lp = ref_logits[:-1] - ref_logits[:-1].max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    nll["fp32"] -= lp[np.arange(len(ids) - 1), ids[1:]].sum()
    count += len(ids)
predicted = count - len(eval_ids)
ppl = {v: np.exp(s / predicted) for v, s in nll.items()}

plt.figure(figsize=(8, 3.2))
for v, c in zip(variants, ("C2", "C3", "C0")):
    plt.plot(errors[v], "o-", color=c, label=v)
plt.xticks(range(len(names)), [n.replace("layers.", "L").replace(".out", "") for n in names])
plt.yscale("log")
plt.ylabel("relative error vs fp32")
plt.title("error of each layer's output (evaluation text)")
plt.legend()
plt.show()
for v in variants:
    print(f"{v:13s} perplexity {ppl[v]:.3f} ({100 * (ppl[v] / ppl['bf16'] - 1):+.2f}% vs bf16), "
          f"top-1 = fp32 {agree[v] / count:.1%}, logits error {errors[v][-1]:.4f}")
print(f"fp32          perplexity {ppl['fp32']:.3f}")
assert errors["bf16"][-1] < errors["W8A8_DYNAMIC"][-1] < errors["W8A8"][-1]
assert abs(ppl["W8A8"] / ppl["bf16"] - 1) < 0.01 and abs(ppl["W8A8_DYNAMIC"] / ppl["bf16"] - 1) < 0.01

# %% [markdown]
# ## ... and per operator
#
# Two views. **Local**: each quantised linear on the fp32 model's own input, W8A8 against the
# bf16 linear, so nothing upstream is mixed in. **Global**: the logits error of a checkpoint
# in which only one kind of linear is quantised and the others are left as the float weights
# (the description marks them `FLOAT`), which shows how each kind's error propagates.

# %%
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
def linear_inputs(taps, i):
    """The input of each linear of layer i, from the fp32 model's taps."""
    pfx = f"model.layers.{i}.mlp."
    pre = taps[f"layers.{i}.post_norm"]
    act = ops.silu_and_mul(ops.linear(pre, fp32.w(pfx + "gate_proj.weight")),
                           ops.linear(pre, fp32.w(pfx + "up_proj.weight")))
    n1 = taps[f"layers.{i}.input_norm"]
    return {"q_proj": n1, "k_proj": n1, "v_proj": n1, "o_proj": taps[f"layers.{i}.attn"],
            "gate_proj": pre, "up_proj": pre, "down_proj": act}

def prefix_of(i, kind):
    return f"model.layers.{i}.{'self_attn' if kind[0] in 'qkvo' else 'mlp'}.{kind}"

local = {s: np.zeros((nL, len(KINDS))) for s in ("W8A8", "W8A8_DYNAMIC")}
ids = np.concatenate(eval_ids[:4])
ref = Taps(range(nL))
fp32.forward(ids, taps=ref)
for i in range(nL):
    xs = linear_inputs(ref, i)
    for j, kind in enumerate(KINDS):
        p = prefix_of(i, kind)
        x = xs[kind].astype(bfloat16)                                    # what bf16 feeds it
        y_ref = ops.linear(x, float_weights[p + ".weight"], float_weights.get(p + ".bias"))
        for s, m in (("W8A8", static), ("W8A8_DYNAMIC", variants["W8A8_DYNAMIC"])):
            y = ops.w8a8_linear(x, m.quant_params(p)).astype(np.float64)
            yr = y_ref.astype(np.float64)
            local[s][i, j] = np.linalg.norm(y - yr) / np.linalg.norm(yr)

def only(kinds):
    """A W8A8 model with only the linears of `kinds` quantised (the rest FLOAT)."""
    qdir = os.path.join(work, "W8A8")
    with open(os.path.join(qdir, DESCRIPTION_NAME)) as fh:
        desc = json.load(fh)
    _, qweights = load_weights(qdir)
    keep = {prefix_of(i, k) for i in range(nL) for k in kinds}
    weights, new_desc = {}, {}
    for n, kind in desc.items():
        p = n.rsplit(".", 1)[0]
        if n in qweights and kind != "FLOAT" and p not in keep:
            if n.endswith(".weight") or n.endswith(".bias"):             # back to float
                weights[n], new_desc[n] = float_weights[n], "FLOAT"
        else:
            new_desc[n] = kind
            if n in qweights:
                weights[n] = qweights[n]
    return refimpl.Model(config, weights, numerics="bf16", quant=new_desc)

groups = {"q/k/v": ["q_proj", "k_proj", "v_proj"], "o": ["o_proj"],
          "gate/up": ["gate_proj", "up_proj"], "down": ["down_proj"], "all": KINDS}
glob = {}
ref_logits = fp32.forward(ids).astype(np.float64)
for g, kinds in groups.items():
    lg = only(kinds).forward(ids).astype(np.float64)
    glob[g] = np.linalg.norm(lg - ref_logits) / np.linalg.norm(ref_logits)
bf16_floor = np.linalg.norm(variants["bf16"].forward(ids).astype(np.float64) - ref_logits) \
    / np.linalg.norm(ref_logits)

fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
for s, off, c in (("W8A8", -0.2, "C3"), ("W8A8_DYNAMIC", 0.2, "C0")):
    ax[0].bar(np.arange(len(KINDS)) + off, local[s].mean(0), width=0.4, color=c, label=s)
ax[0].set_xticks(range(len(KINDS)), KINDS, rotation=30)
ax[0].set(title="local error of each linear (mean over layers)", ylabel="rel. error")
ax[0].legend()
ax[1].bar(list(glob), list(glob.values()), color="C3")
ax[1].axhline(bf16_floor, color="C2", ls="--", label="bf16 model")
ax[1].set(title="logits error, only these linears W8A8 (static)", ylabel="rel. error vs fp32")
ax[1].legend()
plt.tight_layout()
plt.show()
print("local error, static, layer x linear:\n", local["W8A8"])
print({g: round(float(e), 4) for g, e in glob.items()}, "| bf16 model", round(float(bf16_floor), 4))
assert (local["W8A8_DYNAMIC"].mean(0) < local["W8A8"].mean(0)).all()
assert local["W8A8"].mean(0).argmax() == KINDS.index("down_proj")
assert glob["down"] > 0.8 * glob["all"] > glob["q/k/v"] + glob["o"] + glob["gate/up"]

# %% [markdown]
# Reading the plots: static W8A8's local error is largest, 5-8x the others, at the down
# projection, whose input after SwiGLU is heavy-tailed: one calibrated range must hold its
# rare large values, so a typical token uses under a third of it (fewer levels, a coarser
# grid). Quantising the down projections alone gives almost all of the model's logits error;
# every other kind alone stays near bf16's own error. The dynamic scheme's per-token scale
# removes most of it. The whole-model perplexity moves by a few tenths of a percent on this
# model. This is why quantisation recipes can leave `down_proj` in higher precision or smooth its
# input first (msModelSlim's anti-outlier options); a checkpoint that leaves some linears
# `FLOAT` runs here as it is stored. A 3.8M model has no
# outlier channels of the kind large trained models develop, so this is the easy case;
# `docs/quantization.md` says what that does and does not tell about the 72B claim.

# %%
import shutil
shutil.rmtree(work)
