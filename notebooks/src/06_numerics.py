# %% [markdown]
# # 6. Numerics: fp64, fp32, bf16 and fp16 through the model
#
# refimpl runs the same model in four numerics modes. A mode names the **storage dtype** of
# weights and activations; every operator computes in float32 (float64 in `fp64`) and rounds
# its result back to the storage dtype at the cast points written down in
# `refimpl.numerics` (the same points as the Hugging Face eager code). Here we run one set of
# weights through all four modes at the real width of openPangu-Embedded-1B, tap every
# intermediate of every layer, and ask: how large is each mode's error against fp64, where is
# it introduced, and how does it grow through the layers?

# %%
%matplotlib inline
import time
import numpy as np
import matplotlib.pyplot as plt

import refimpl
from refimpl import ops
from refimpl.numerics import bfloat16, storage_dtype

plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (8, 3.2), "axes.grid": True,
                     "grid.alpha": 0.3})
np.set_printoptions(precision=4, suppress=True, linewidth=110)
MODES = ["fp64", "fp32", "bf16", "fp16"]
# unit roundoff u = 2^-(significand bits): the relative error of one rounding is at most u/2
UNIT = {"fp32": 2.0 ** -23, "bf16": 2.0 ** -7, "fp16": 2.0 ** -10}
COLOR = {"fp32": "C0", "bf16": "C3", "fp16": "C2"}

# %% [markdown]
# ## One set of weights, four modes
#
# The real embedded-1b layer shapes (hidden 1536, 12 query / 6 KV heads of 128, MLP 6144) with
# 6 layers instead of 26 and a 16k vocabulary instead of 153k, to stay quick. The weights are
# seeded random values **rounded to bf16 once**, as in a bf16 checkpoint, so every mode
# starts from exactly the same numbers and all the differences below are arithmetic.

# %%
cfg = refimpl.preset("embedded-1b", num_hidden_layers=6, vocab_size=16384, eos_token_id=2)
weights = refimpl.random_weights(cfg, seed=0, dtype=bfloat16)           # a "bf16 checkpoint"
weights = {n: w.astype(np.float32) for n, w in weights.items()}         # same values (exact), and
                                                                        # float32 -> float64 is fast
ids = np.random.default_rng(0).integers(3, cfg.vocab_size, 64)          # 64 tokens

taps, seconds = {}, {}
for mode in MODES:
    start = time.perf_counter()
    model = refimpl.Model(cfg, weights, numerics=mode)                  # converts the weights
    t = refimpl.Taps()
    model.forward(ids, taps=t)
    taps[mode], seconds[mode] = t.arrays, time.perf_counter() - start
    del model
print(cfg.num_hidden_layers, "layers, hidden", cfg.hidden_size, "|",
      ", ".join(f"{m}: {s:.1f} s" for m, s in seconds.items()))
print("every tap in its mode's storage dtype:",
      {m: str(taps[m]["layers.0.q"].dtype) for m in MODES})

# %% [markdown]
# ## Error against fp64, tap by tap
#
# For each tap we measure the relative error $\lVert a - a_{64}\rVert / \lVert a_{64}
# \rVert$ against the fp64 run, in the order the forward pass produces them (13 taps per
# layer). The dotted lines mark each format's unit roundoff $u$ (2^-7 for bf16, 2^-10 for
# fp16, 2^-23 for fp32).

# %%
LAYER_TAPS = ["input", "input_norm", "q", "k", "v", "q_rope", "k_rope", "attn", "attn_out",
              "resid_mid", "post_norm", "mlp_out", "out"]
order = ["embed"] + [f"layers.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in LAYER_TAPS
                     if not (i > 0 and n == "input")] + ["final_norm", "logits"]

def rel_err(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))

errors = {m: np.array([rel_err(taps[m][name], taps["fp64"][name]) for name in order])
          for m in ("fp32", "bf16", "fp16")}
fig, ax = plt.subplots(figsize=(9, 3.6))
for m, e in errors.items():
    ax.semilogy(np.maximum(e, 1e-12), ".-", lw=0.8, ms=3, color=COLOR[m], label=m)
    ax.axhline(UNIT[m], color=COLOR[m], ls=":", lw=1)
starts = [order.index(f"layers.{i}.input_norm") for i in range(cfg.num_hidden_layers)]
ax.set_xticks(starts, [f"L{i}" for i in range(cfg.num_hidden_layers)])
ax.set_ylim(1e-8, 1e-1), ax.set_ylabel("relative error vs fp64")
ax.set_title("every tap of the forward pass (dotted: unit roundoff of each format)")
ax.legend(fontsize=8)
plt.tight_layout()
print("embedding rows: error", {m: f"{errors[m][0]:.1e}" for m in errors})
first = order.index("layers.0.input_norm")
for m in errors:
    print(f"{m}: layer 0 input_norm {errors[m][first]:.1e} ({errors[m][first] / UNIT[m]:.2f} u), "
          f"last layer out {errors[m][order.index(f'layers.{cfg.num_hidden_layers - 1}.out')]:.1e}, "
          f"logits {errors[m][-1]:.1e} ({errors[m][-1] / UNIT[m]:.1f} u)")
assert errors["fp32"][0] == 0 and errors["bf16"][0] == 0 and errors["fp16"][0] < 1e-6
assert errors["fp32"][-1] < errors["fp16"][-1] < errors["bf16"][-1]

# %% [markdown]
# What the plot shows:
#
# * The embedding rows are exact in every mode (the weights are bf16 values; fp16 loses a
#   few bits only on values below its normal range, 6e-5). Error starts with the first
#   rounding, `input_norm`, at about a third of $u$ in the half formats.
# * bf16 and fp16 have the **same curve shifted by 8**, the ratio of their unit roundoffs:
#   the error is rounding error and the format's rounding sets its level.
# * fp32 sits at about 10 $u$, much higher *in units of its own u*. In the half modes the
#   products accumulate in float32, 2^16 times finer than the storage rounding, so only the
#   final rounding of each operator counts. In fp32 mode the long reductions (dot products
#   over 1536 and 6144 terms) run in the storage precision itself and their summation error
#   dominates.
# * The error grows through the layers, but slowly after the first one: every layer adds new
#   roundings to the residual stream, while the stream itself grows (see below), so the
#   relative error rises sub-linearly.
# * Within a layer the attention output (`attn`, `attn_out`) dips *below* the stream around
#   it: attention averages over positions, and that averages rounding errors too.

# %% [markdown]
# ## Where the error is introduced: each operator alone
#
# To separate an operator's *own* error from the error it inherits, feed it the fp64 run's
# input rounded to the mode's dtype, and compare its output with the same operator run in
# fp64 on the same rounded input. Layer 3, in units of each format's $u$:

# %%
L = 3
P = f"model.layers.{L}."
T = ids.size
cos, sin = ops.rope_tables(np.arange(T), cfg.head_dim, cfg.rope_theta)
ref = taps["fp64"]
Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

def steps(dt):
    """name -> (function of arrays in dtype dt, its fp64 inputs from the taps)."""
    w = lambda n: weights[P + n].astype(dt)
    a = lambda n: ref[f"layers.{L}.{n}"]
    return {
        "rms_norm": (lambda x: ops.rms_norm(x, w("input_layernorm.weight"), cfg.rms_norm_eps),
                     [a("input")]),
        "q_proj": (lambda x: ops.linear(x, w("self_attn.q_proj.weight"), w("self_attn.q_proj.bias")),
                   [a("input_norm")]),
        "rope": (lambda q: ops.apply_rope(q, cos, sin), [a("q")]),
        "attention": (lambda q, k, v: ops.attention(q, k, v), [a("q_rope"), a("k_rope"), a("v")]),
        "o_proj": (lambda x: ops.linear(x, w("self_attn.o_proj.weight"), w("self_attn.o_proj.bias")),
                   [a("attn")]),
        "residual add": (lambda x, y: ops.add(x, y), [a("input"), a("attn_out")]),
        "swiglu (MLP)": (lambda x: ops.swiglu(x, w("mlp.gate_proj.weight"), w("mlp.up_proj.weight"),
                                               w("mlp.down_proj.weight")), [a("post_norm")]),
    }

local = {m: {} for m in ("fp32", "bf16", "fp16")}
for m in local:
    dt = storage_dtype(m)
    for name, (fn, inputs) in steps(dt).items():
        rounded = [x.astype(dt) for x in inputs]
        exact = steps(np.float64)[name][0](*[x.astype(np.float64) for x in rounded])
        local[m][name] = rel_err(fn(*rounded), exact) / UNIT[m]
names = list(local["bf16"])
fig, ax = plt.subplots(figsize=(9, 3.2))
for j, m in enumerate(local):
    ax.bar(np.arange(len(names)) + 0.27 * (j - 1), [local[m][n] for n in names], 0.27,
           color=COLOR[m], label=m)
ax.set_xticks(np.arange(len(names)), names, fontsize=8)
ax.set_ylabel("own relative error / u"), ax.legend(fontsize=8)
ax.set_title(f"error each operator adds by itself (layer {L}, inputs rounded to the mode)")
plt.tight_layout()
for m in local:
    print(m.ljust(5), "  ".join(f"{n} {v:.2f}u" for n, v in local[m].items()))
assert max(local["bf16"].values()) < 1 and max(local["fp32"].values()) > 1

# %% [markdown]
# In bf16 and fp16 every operator adds a few tenths of $u$ on its own, the same in both
# formats when measured in $u$: that is the cost of its final rounding (a rounded value is
# off by at most $u/2$ relative and about $u/\sqrt{12}$ on average). SwiGLU costs more
# because it rounds five times in a row. In fp32 the matrix products add 3 to 5 $u$: their
# float32 accumulation over 1536 or 6144 terms is now as coarse as the storage format.
#
# None of them is pathological. The end-to-end error of bf16 comes from having only 8
# significant bits and from **many** operators in sequence, not from one bad one. That is
# also the yardstick for a kernel: a kernel whose own error at some operator is many times
# the spec's own error in the same format is where to look (notebook 5: the "k x the
# low-precision reference's error" rule).

# %% [markdown]
# ## The residual stream keeps every rounding
#
# Each layer adds its attention and MLP outputs to the residual stream and rounds the sum.
# The stream grows layer by layer while the updates stay about the same size, so the
# rounding of each sum costs an ever larger absolute error relative to the update it is
# adding:

# %%
n_layers = cfg.num_hidden_layers
rms = lambda a: float(np.sqrt(np.mean(np.asarray(a, np.float64) ** 2)))
stream = [rms(ref[f"layers.{i}.out"]) for i in range(n_layers)]
update = [rms(ref[f"layers.{i}.mlp_out"]) for i in range(n_layers)]
out_err = {m: [rel_err(taps[m][f"layers.{i}.out"], ref[f"layers.{i}.out"]) for i in range(n_layers)]
           for m in errors}
fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
ax[0].plot(stream, "o-", label="residual stream (layer out)")
ax[0].plot(update, "s-", label="MLP update")
ax[0].set_xlabel("layer"), ax[0].set_ylabel("RMS"), ax[0].legend(fontsize=8)
for m in out_err:
    ax[1].semilogy(np.array(out_err[m]) / UNIT[m], "o-", color=COLOR[m], label=m)
ax[1].set_xlabel("layer"), ax[1].set_ylabel("relative error of layer out / u")
ax[1].legend(fontsize=8), ax[1].set_title("accumulated error, in units of u")
plt.tight_layout()
growth = {m: out_err[m][-1] / out_err[m][0] for m in out_err}
print("error growth from layer 0 to layer", n_layers - 1, ":",
      {m: round(g, 1) for m, g in growth.items()})
assert all(g > 1 for g in growth.values())

# %% [markdown]
# ## What it does to the logits and the next token
#
# The logits carry the accumulated error. What matters for generation is whether the
# ranking changes: bf16 keeps most top-1 choices of this random model but not all of them,
# because the top two logits of some positions are closer than bf16's error.

# %%
L64 = ref["logits"].astype(np.float64)
top1 = L64.argmax(-1)
sorted_l = np.sort(L64, axis=-1)
margin = sorted_l[:, -1] - sorted_l[:, -2]                               # top-1 - top-2 logit
fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
for m in ("fp32", "bf16", "fp16"):
    lm = taps[m]["logits"].astype(np.float64)
    agree = (lm.argmax(-1) == top1)
    abs_err = np.abs(lm - L64).max(-1)
    ax[1].scatter(margin, abs_err, s=8, color=COLOR[m], label=m)
    print(f"{m}: top-1 agrees with fp64 at {agree.mean():.1%} of positions; "
          f"max |logit error| {abs_err.max():.2e}")
ax[1].plot([1e-4, 1], [1e-4, 1], "k--", lw=1)
ax[1].set_xscale("log"), ax[1].set_yscale("log")
ax[1].set_xlabel("fp64 top-1 minus top-2 logit"), ax[1].set_ylabel("max |logit error| of the row")
ax[1].set_title("a flip needs error > margin"), ax[1].legend(fontsize=8)
lb = taps["bf16"]["logits"].astype(np.float64)[-1]
ax[0].scatter(L64[-1], lb - L64[-1], s=2, color=COLOR["bf16"])
ax[0].set_xlabel("fp64 logit (last position)"), ax[0].set_ylabel("bf16 - fp64")
ax[0].set_title("bf16 logit error, one row")
plt.tight_layout()

# %% [markdown]
# ## fp16's other limit: range
#
# fp16 has 3 more significand bits than bf16 (hence 8x smaller errors above) but only 5
# exponent bits: its largest finite value is 65504, where bf16 reaches 3.4e38. With these
# random weights the largest activation is far below that, so fp16 is simply the more
# accurate half format here. Trained models are different: some have "massive activations"
# of thousands in a few channels of the residual stream, and their squares in `rms_norm` are
# computed in float32 precisely so that `mean(x^2)` does not overflow.

# %%
largest = {name: float(np.abs(np.asarray(ref[name], np.float64)).max()) for name in order}
worst = max(largest, key=largest.get)
print(f"largest |activation| in the fp64 run: {largest[worst]:.3g} at {worst}; "
      f"fp16 max {np.finfo(np.float16).max:.0f}; "
      f"its square {largest[worst] ** 2:.3g} (fp16 would overflow above 65504)")
