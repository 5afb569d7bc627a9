# %% [markdown]
# # 5. The golden workflow: catch a kernel bug, fix it, pass
#
# A kernel developer writing RoPE or attention for an accelerator needs two things from a
# reference: **golden data** (inputs and the expected outputs, at the real shapes, in the
# real dtype) and a **judge** that says whether the kernel's outputs are right *to the
# precision that matters*. refimpl provides both:
#
#     python -m refimpl golden --preset embedded-1b --ops rope,attention --numerics bf16 --out GOLD
#     python -m refimpl compare GOLD/CASE CANDIDATE
#
# In this notebook we generate goldens, write two small "kernels" in NumPy with classic bugs
# (the interleaved RoPE convention, an off-by-one causal mask), watch `compare` catch them,
# fix them, and pass. Then we take the metrics and tolerances apart.

# %%
%matplotlib inline
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import matplotlib.pyplot as plt

from refimpl.golden import compare as cmp
from refimpl.golden.format import load_case
from refimpl.numerics import bfloat16

plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (8, 3.2), "axes.grid": True,
                     "grid.alpha": 0.3})
np.set_printoptions(precision=4, suppress=True, linewidth=110)
WORK = tempfile.mkdtemp(prefix="refimpl-golden-nb-")
GOLD, CAND = os.path.join(WORK, "golden"), os.path.join(WORK, "candidate")

def refimpl_cli(*args):
    """Run `python -m refimpl ARGS` and show what it prints; returns the exit status."""
    r = subprocess.run([sys.executable, "-m", "refimpl", *args], capture_output=True, text=True)
    print((r.stdout + r.stderr).strip())
    return r.returncode

# %% [markdown]
# ## 1. Generate goldens
#
# One case per operator at the real embedded-1b shapes (12 query heads, 6 KV heads,
# head_dim 128), 64 tokens, bf16. Every case is a directory with a `manifest.json` (what the
# operator is, its parameters and formula, the cast points, and per tensor: role, dtype,
# shape, sha256, criterion) and a `tensors.safetensors`. The same command always writes the
# same bytes.

# %%
status = refimpl_cli("golden", "--preset", "embedded-1b", "--ops", "rope,attention",
                     "--numerics", "bf16", "--tokens", "64", "--out", GOLD)
assert status == 0
case = load_case(os.path.join(GOLD, "embedded-1b-rope-bf16"))
print("\n" + case.manifest["description"])
print("formula:", case.manifest["parameters"]["formula"])
for e in case.entries():
    print(f"  {e['name']:13s} {e['role']:9s} {e['dtype']:9s} {str(e['shape']):15s} "
          f"{e.get('criterion', {}).get('name', '')}")

# %% [markdown]
# Each output `NAME` comes with `NAME.ref64`: the same operator computed in float64 from the
# *same rounded inputs*. It is the best answer the inputs allow, and it lets a judge ask how
# far a kernel is from the truth compared with how far the spec's own bf16 output is.

# %% [markdown]
# ## 2. A RoPE "kernel" with a classic bug
#
# Our kernel rotates in float32 and rounds once at the end (a fused kernel would do the
# same). Its bug: it rotates **adjacent** pairs $(x_{2i}, x_{2i+1})$, the interleaved
# (GPT-J) convention, instead of openPangu's rotate-half pairs $(x_i, x_{i+d/2})$. Both are
# "RoPE", both pass a unit test written in the same convention.

# %%
def rope_kernel(x, cos, sin, interleaved):
    """x [T, heads, D], cos/sin [T, D] in bf16 (or fp16) -> [T, heads, D] in x's dtype;
    float32 inside."""
    x32, c, s = x.astype(np.float32), cos.astype(np.float32)[:, None], sin.astype(np.float32)[:, None]
    d2 = x.shape[-1] // 2
    if interleaved:                                       # BUG: pairs (2i, 2i+1)
        y = np.empty_like(x32)
        y[..., 0::2] = x32[..., 0::2] * c[..., :d2] - x32[..., 1::2] * s[..., :d2]
        y[..., 1::2] = x32[..., 1::2] * c[..., :d2] + x32[..., 0::2] * s[..., :d2]
    else:                                                 # rotate-half: pairs (i, i + d/2)
        rot = np.concatenate([-x32[..., d2:], x32[..., :d2]], axis=-1)
        y = x32 * c + rot * s
    return y.astype(x.dtype)

def run_rope_kernel(case_name, interleaved):
    """Run the kernel on a case's inputs, save its outputs as CANDIDATE/CASE/NAME.npy."""
    case = load_case(os.path.join(GOLD, case_name))
    t = case.tensors
    out = os.path.join(CAND, case_name)
    os.makedirs(out, exist_ok=True)
    for name in ("q", "k"):
        np.save(os.path.join(out, f"{name}_rope.npy"), rope_kernel(t[name], t["cos"], t["sin"], interleaved))
    return out

cand = run_rope_kernel("embedded-1b-rope-bf16", interleaved=True)
status = refimpl_cli("compare", os.path.join(GOLD, "embedded-1b-rope-bf16"), cand)
assert status == 1

# %% [markdown]
# Caught: the cosine similarity of the outputs is far below 1 and almost every element is
# outside tolerance. Now the fix (rotate-half), same inputs:

# %%
cand = run_rope_kernel("embedded-1b-rope-bf16", interleaved=False)
status = refimpl_cli("compare", os.path.join(GOLD, "embedded-1b-rope-bf16"), cand)
assert status == 0

# %% [markdown]
# The fixed kernel is not bit-identical to the golden: the spec rounds `x*cos` and
# `rotate_half(x)*sin` to bf16 before adding them (as the Hugging Face code does); our fused
# kernel rounds once. The **k-error** criterion accepts it because its distance to the
# float64 reference is within k = 2 times the spec's own distance (in fact smaller: it
# rounds less). Note where the bug would have hidden: at position 0 all angles are zero and
# both conventions are the identity, so a test on the first token alone passes.

# %%
t = case.tensors
bad, good = (rope_kernel(t["q"], t["cos"], t["sin"], flag).astype(np.float64) for flag in (True, False))
g = t["q_rope"].astype(np.float64)
row_err = np.abs(bad - g).max(axis=(1, 2))
print("interleaved kernel, max error at position 0:", row_err[0], "| at positions 1..63: >=",
      row_err[1:].min().round(3))
assert row_err[0] == 0 and row_err[1:].min() > 0.01

# %% [markdown]
# ## 3. An attention "kernel" with an off-by-one causal mask
#
# A flash-style kernel: float32 scores, a softmax with max-subtraction, the output rounded
# once. Its bug: the causal mask is written `j <= t + 1`, so every query also sees the
# *next* key. The prefill case (64 queries over their 64 keys) and the decode case (1 query
# against 64 cached keys) both go to `compare`.

# %%
def attention_kernel(q, k, v, peek):
    """q [T, Hq, D], k/v [S, Hkv, D] bf16 -> [T, Hq, D] bf16; float32 inside, causal."""
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    kvh = np.arange(Hq) // (Hq // Hkv)
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    s = np.einsum("thd,shd->hts", q32, k32[:, kvh]) * np.float32(D ** -0.5)   # [Hq, T, S]
    pos = np.arange(T)[:, None] + (S - T)                                      # query positions
    allowed = np.arange(S)[None, :] <= pos + (1 if peek else 0)               # BUG when peek
    s = np.where(allowed[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v32[:, kvh])
    return o.astype(bfloat16)

def run_attention_kernel(peek):
    for kind in ("prefill", "decode"):
        name = f"embedded-1b-attention-{kind}-bf16"
        t = load_case(os.path.join(GOLD, name)).tensors
        os.makedirs(os.path.join(CAND, name), exist_ok=True)
        np.save(os.path.join(CAND, name, "o.npy"), attention_kernel(t["q"], t["k"], t["v"], peek))

run_attention_kernel(peek=True)
status = refimpl_cli("compare", os.path.join(GOLD, "embedded-1b-attention-prefill-bf16"),
                     os.path.join(CAND, "embedded-1b-attention-prefill-bf16"))
assert status == 1
status = refimpl_cli("compare", os.path.join(GOLD, "embedded-1b-attention-decode-bf16"),
                     os.path.join(CAND, "embedded-1b-attention-decode-bf16"))
assert status == 0

# %% [markdown]
# The prefill case fails; **the decode case passes**. With one query at the last position
# there is no "next key" to peek at, so the bug is invisible. A golden suite needs both
# shapes. The error of the buggy kernel per query position shows the same thing inside the
# prefill case: every row is wrong except the last one.

# %%
t = load_case(os.path.join(GOLD, "embedded-1b-attention-prefill-bf16")).tensors
buggy = attention_kernel(t["q"], t["k"], t["v"], peek=True).astype(np.float64)
fixed = attention_kernel(t["q"], t["k"], t["v"], peek=False).astype(np.float64)
ref64, gold = t["o.ref64"], t["o"].astype(np.float64)
fig, ax = plt.subplots()
ax.semilogy(np.abs(buggy - ref64).max(axis=(1, 2)), ".-", label="off-by-one mask kernel")
ax.semilogy(np.abs(fixed - ref64).max(axis=(1, 2)), ".-", label="fixed kernel")
ax.semilogy(np.abs(gold - ref64).max(axis=(1, 2)), ".-", label="spec's own bf16 output")
ax.set_xlabel("query position"), ax.set_ylabel("max |output - float64 reference|")
ax.set_title("attention prefill, 64 positions"), ax.legend(fontsize=8)
plt.tight_layout()

# %%
run_attention_kernel(peek=False)
run_rope_kernel("embedded-1b-rope-long-bf16", interleaved=False)   # positions 32704..32767
status = refimpl_cli("compare", GOLD, CAND)          # the whole directory: every case
assert status == 0

# %% [markdown]
# ## 4. The metrics, by hand
#
# For every output `compare` reports:
#
# * **max absolute error** $\max |c - g|$ and **max relative error** $\max |c - g| / |g|$;
# * **mismatches**: elements outside $\text{atol} + \text{rtol}\,|g|$
#   (`torch.testing.assert_close` tolerances of the dtype);
# * **cosine similarity** $c \cdot g / (\lVert c\rVert \lVert g\rVert)$ (the first test of
#   Ascend's accuracy checker);
# * **ULP distance**: how many representable values of the dtype lie between $c$ and $g$,
#   counted on the integer bit patterns;
# * the index of the worst element.
#
# We recompute them for the fixed RoPE kernel's `q_rope` and check them against the JSON
# report.

# %%
rope_case = os.path.join(GOLD, "embedded-1b-rope-bf16")
r = subprocess.run([sys.executable, "-m", "refimpl", "compare", "--json", rope_case,
                    os.path.join(CAND, "embedded-1b-rope-bf16")], capture_output=True, text=True)
report = json.loads(r.stdout)
out = next(o for o in report["cases"][0]["outputs"] if o["name"] == "q_rope")
m = out["metrics"]

t = load_case(rope_case).tensors
c = np.load(os.path.join(CAND, "embedded-1b-rope-bf16", "q_rope.npy"), allow_pickle=False).view(bfloat16)
g = t["q_rope"]
c64, g64 = c.astype(np.float64), g.astype(np.float64)
err = np.abs(c64 - g64)
rel = np.where(err == 0, 0, err / np.maximum(np.abs(g64), float(np.finfo(np.float32).tiny)))
cos_sim = float(np.sum(c64 * g64) / (np.linalg.norm(c64) * np.linalg.norm(g64)))

def bf16_ordinal(a):
    """The bf16 bit patterns as a monotonic integer scale (negative values mirrored)."""
    b = a.view(np.uint16).astype(np.int64)
    return np.where(b & 0x8000, -(b & 0x7FFF), b)
ulps = np.abs(bf16_ordinal(c) - bf16_ordinal(g))
by_hand = {"max_abs_err": err.max(), "max_rel_err": rel.max(), "cosine": cos_sim,
           "max_ulp": int(ulps.max())}
for key, value in by_hand.items():
    print(f"{key:12s} by hand {value:<24.6g} report {m[key]:.6g}")
    assert np.isclose(value, m[key], rtol=1e-9, atol=0)
print("worst element", m["worst_index"], "| criterion:", out["criterion"], "|", out["reason"])

# %% [markdown]
# Two of these numbers need care. The **max relative error** and the **max ULP distance**
# are huge, and they come from small outputs. RoPE's rounding error is set by the size of
# its *inputs*: `x*cos` and `rotate_half(x)*sin` are each about as large as `x`, and the spec
# rounds each of them to bf16, an absolute error of up to half an ulp of `x`. Where the two
# terms nearly cancel, the output is small and that same absolute error is many of *its*
# ulps, or an infinite relative error when the golden is exactly 0 (and between a tiny
# negative and a tiny positive value lie thousands of bf16 numbers). That is why Ascend's
# checker judges values below 1e-3 on absolute error, and why neither number is a verdict on
# its own. By output magnitude:

# %%
i = np.unravel_index(np.argmax(ulps), g.shape)
print(f"largest ULP distance at {[int(j) for j in i]}: candidate {c64[i]:.3g}, golden {g64[i]:.3g}")
print(f"max |candidate - golden| = {err.max():.4g} (1 bf16 ulp of values in [2, 4) is {2.0 ** -6})")
print("max ULP distance for |golden| above:", {b: int(ulps[np.abs(g64) > b].max()) for b in (1e-2, 0.1, 0.5, 1.0)},
      f"| bit-identical elements: {np.mean(ulps == 0):.1%}")
assert err.max() <= 2.0 ** -6 and ulps[np.abs(g64) > 1].max() <= 1
fig, ax = plt.subplots(1, 2, figsize=(9, 3))
ag = np.abs(g64).ravel() + 1e-6
ax[0].scatter(ag, err.ravel(), s=2, alpha=0.3)
ax[0].set_xscale("log"), ax[0].set_xlabel("|golden|"), ax[0].set_ylabel("|candidate - golden|")
ax[0].axhline(2.0 ** -6, color="k", ls="--", lw=1)
ax[0].set_title("absolute error: bounded by the inputs' ulp (dashed)")
ax[1].scatter(ag, ulps.ravel(), s=2, alpha=0.3)
ax[1].set_xscale("log"), ax[1].set_yscale("symlog"), ax[1].set_ylim(bottom=0)
ax[1].set_xlabel("|golden|"), ax[1].set_ylabel("ULP distance")
ax[1].set_title("ULP distance: explodes for small outputs")
plt.tight_layout()

# %% [markdown]
# The attention golden needs a different kind of care: it is itself far from the truth. The
# spec follows the Hugging Face eager code, which rounds the scores to bf16 before the
# softmax; scores here are around 12 (keys share a direction, as in trained models), where a
# bf16 ulp is 0.06, so the probabilities are off by several percent. The flash-style kernel
# keeps scores in float32 and is much closer to the float64 reference than the golden is,
# yet it differs from the golden by more than bf16's `allclose` tolerance almost everywhere:

# %%
t = load_case(os.path.join(GOLD, "embedded-1b-attention-prefill-bf16")).tensors
kernel_out = attention_kernel(t["q"], t["k"], t["v"], peek=False).astype(np.float64)
ref64, gold = t["o.ref64"], t["o"].astype(np.float64)
spec_err, kernel_err = np.abs(gold - ref64).max(), np.abs(kernel_out - ref64).max()
print(f"max |golden - ref64| = {spec_err:.3g}   (the spec's own bf16 error)")
print(f"max |kernel - ref64| = {kernel_err:.3g}   ({spec_err / kernel_err:.0f}x closer to the truth)")
outside = np.mean(np.abs(kernel_out - gold) > 1e-5 + 1.6e-2 * np.abs(gold))
print(f"kernel vs golden outside allclose(bf16): {outside:.0%} of elements")
assert kernel_err < spec_err / 4

# %% [markdown]
# ## 5. Tolerances and criteria
#
# Which rule should judge an output? `compare` knows four (`--criterion` overrides the one
# the manifest names):
#
# * **allclose**: $|c - g| \le \text{atol} + \text{rtol}\,|g|$ everywhere, with
#   `torch.testing.assert_close`'s defaults for the dtype (bf16: rtol 1.6e-2, atol 1e-5).
#   Right for elementwise operators whose error is one or two roundings.
# * **double-thousandth** (Ascend's rule for float16): fail only if more than 0.1% of the
#   elements exceed *both* an absolute and a relative error of 1e-3 (relative to
#   $\max(|c|, |g|)$); 0.01% for float32.
# * **ascend** (MindStudio's accuracy checker, against the float64 reference): cosine >
#   0.99; then max absolute error < 1e-3 passes outright; otherwise the fractions of elements
#   with relative error above 1%, 0.1%, 0.01% must each stay below that fraction.
# * **k-error** (FlashAttention's rule): $\max|c - r_{64}| \le k \cdot \max|g - r_{64}| +
#   \text{atol}$: the kernel may be at most $k$ (default 2) times as far from the float64
#   truth as the spec's own low-precision output. This is the right judge for long
#   reductions (attention, matmul, MoE), where any fixed atol is too loose for small
#   outputs and too tight for large ones.
#
# The constants, as `refimpl.golden.compare` holds them:

# %%
from refimpl.golden.format import DEFAULT_K, DEFAULT_TOLERANCES
print("allclose (rtol, atol) by dtype:", DEFAULT_TOLERANCES)
print("double-thousandth: threshold", cmp.DT_THRESHOLD, "| allowed fraction", cmp.DT_FRACTION)
print("ascend: cosine >", cmp.ASCEND_COSINE, "| max abs <", cmp.ASCEND_MAX_ABS,
      "| levels", cmp.ASCEND_LEVELS, "| ULP thresholds (reported)", cmp.ULP_THRESHOLDS)
print("k-error: default k =", DEFAULT_K)

# %% [markdown]
# Every criterion on every kernel of this notebook. The interesting cells: a *correct*
# kernel can fail a rule that is too strict for its operator, and a *buggy* kernel can pass
# a rule that is too loose (or a case that cannot see the bug).

# %%
def verdicts(case_name, make_candidate):
    """criterion -> verdict for one candidate output written by make_candidate(dir)."""
    d = os.path.join(WORK, "trial", case_name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    make_candidate(d)
    res = {}
    for crit in cmp.CRITERIA:
        rep = cmp.compare_paths(os.path.join(GOLD, case_name), d, cmp.Options(criterion=crit))
        res[crit] = rep["verdict"]
    return res

def attn_candidate(case_name, peek):
    t = load_case(os.path.join(GOLD, case_name)).tensors
    return lambda d: np.save(os.path.join(d, "o.npy"), attention_kernel(t["q"], t["k"], t["v"], peek))

def rope_candidate(interleaved, mode="bf16"):
    t = load_case(os.path.join(GOLD, f"embedded-1b-rope-{mode}")).tensors
    def write(d):
        for n in ("q", "k"):
            np.save(os.path.join(d, f"{n}_rope.npy"), rope_kernel(t[n], t["cos"], t["sin"], interleaved))
    return write

status = refimpl_cli("golden", "--preset", "embedded-1b", "--ops", "rope", "--numerics", "fp16",
                     "--tokens", "64", "--out", GOLD)
rows = {
    "rope fp16, rotate-half (correct)": verdicts("embedded-1b-rope-fp16", rope_candidate(False, "fp16")),
    "rope, rotate-half (correct)": verdicts("embedded-1b-rope-bf16", rope_candidate(False)),
    "rope, interleaved (bug)": verdicts("embedded-1b-rope-bf16", rope_candidate(True)),
    "attention prefill (correct)": verdicts("embedded-1b-attention-prefill-bf16",
                                            attn_candidate("embedded-1b-attention-prefill-bf16", False)),
    "attention prefill, mask +1 (bug)": verdicts("embedded-1b-attention-prefill-bf16",
                                                 attn_candidate("embedded-1b-attention-prefill-bf16", True)),
    "attention decode, mask +1 (bug)": verdicts("embedded-1b-attention-decode-bf16",
                                                attn_candidate("embedded-1b-attention-decode-bf16", True)),
}
print(f"{'kernel':34s}" + "".join(f"{c:>19s}" for c in cmp.CRITERIA))
for name, res in rows.items():
    print(f"{name:34s}" + "".join(f"{res[c]:>19s}" for c in cmp.CRITERIA))
assert all(v == "fail" for v in rows["rope, interleaved (bug)"].values())
assert rows["attention prefill, mask +1 (bug)"]["k-error"] == "fail"
assert rows["attention prefill (correct)"]["k-error"] == "pass"
assert rows["rope fp16, rotate-half (correct)"]["double-thousandth"] == "pass"
assert rows["rope, rotate-half (correct)"]["double-thousandth"] == "fail"

# %% [markdown]
# Reading the table:
#
# * **k-error** is the only rule that passes both correct kernels and fails both bugs it
#   can see. It compares like with like: the kernel's distance to the truth against the
#   spec's distance to the truth, in the same format.
# * **allclose** against the golden fails the correct kernels. For RoPE, the spec rounds
#   `x*cos` and `rotate_half(x)*sin` before adding them and the kernel does not; where the
#   two terms nearly cancel, one ulp of a term is many ulps of the small result. For
#   attention, the golden itself carries the larger error.
# * **double-thousandth** is a float16 rule: it passes the correct RoPE kernel in fp16, but
#   in bf16 a single rounding (up to 2^-8, 0.4% relative) already exceeds its 1e-3
#   thresholds on every element above 1e-3 / 0.004 = 0.25 in magnitude.
# * **ascend**'s relative-error levels go down to 0.01%, below one rounding of any 16-bit
#   format, so for half-precision outputs of ordinary magnitude it can only pass through its
#   "max abs error < 1e-3" clause.
# * **Nothing** catches the mask bug in the decode case: the data cannot show it. A golden
#   suite must contain the shapes where a bug would show (prefill with T > 1, positions
#   beyond 0, long positions for RoPE angles).

# %%
shutil.rmtree(WORK)
