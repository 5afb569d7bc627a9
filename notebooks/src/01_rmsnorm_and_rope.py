# %% [markdown]
# # 1. RMSNorm and RoPE, from the inside
#
# Two small operators sit in every openPangu layer before the big matrix products:
# **RMSNorm** (before attention and before the MLP) and **rotary position embedding (RoPE)**
# (on the queries and keys). This notebook computes both with refimpl's own spec operators
# (`refimpl.ops`) at the real openPangu-Embedded-1B shapes, and looks at the two places where
# implementations most often disagree: the RoPE *convention* (rotate-half vs interleaved) and
# the *precision of the RoPE angles* at long positions.

# %%
%matplotlib inline
import numpy as np
import matplotlib.pyplot as plt

import refimpl
from refimpl import ops
from refimpl.numerics import bfloat16
from refimpl.random_init import random_tensor

plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (8, 3.2), "axes.grid": True,
                     "grid.alpha": 0.3})
np.set_printoptions(precision=4, suppress=True, linewidth=110)
cfg = refimpl.preset("embedded-1b")
H, D, eps = cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps
print(f"embedded-1b: hidden {H}, head_dim {D}, rms_norm_eps {eps}, rope_theta {cfg.rope_theta:g}")

# %% [markdown]
# ## RMSNorm
#
# $$y = w \odot \frac{x}{\sqrt{\operatorname{mean}(x^2) + \varepsilon}}$$
#
# computed over the hidden dimension of each token. Unlike LayerNorm there is no mean
# subtraction and no bias: it only rescales each token's vector to unit root-mean-square,
# then applies a learned per-channel gain `w`. Below: four tokens whose scales differ by 20x
# come out at the same scale.

# %%
rng = np.random.default_rng(0)
scales = np.array([0.5, 1.0, 3.0, 10.0], dtype=np.float32)[:, None]
x = (rng.standard_normal((4, H)).astype(np.float32) * scales)            # [4, H]
w = random_tensor(cfg, "model.layers.0.input_layernorm.weight", (H,), 0, np.float32)
y = ops.rms_norm(x, w, eps)                                              # [4, H]

direct = w * x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + eps)
print("max |spec - direct formula| :", np.abs(y - direct).max())
print("RMS of x per token          :", np.sqrt((x ** 2).mean(-1)))
print("RMS of y per token          :", np.sqrt((y ** 2).mean(-1)), "(close to the RMS of w,",
      np.sqrt((w ** 2).mean()).round(4), ")")
assert np.abs(y - direct).max() < 1e-5

fig, ax = plt.subplots(1, 2)
for row, s in zip(range(4), scales[:, 0]):
    ax[0].hist(x[row], bins=80, histtype="step", label=f"scale {s:g}")
    ax[1].hist(y[row], bins=80, histtype="step")
ax[0].set_title("x (4 tokens)"), ax[1].set_title("rms_norm(x): one scale")
ax[0].legend(fontsize=8)
plt.tight_layout()

# %% [markdown]
# `rms_norm` is scale-invariant, `rms_norm(c * x) == rms_norm(x)`, except where `eps`
# matters: for a token whose mean square is comparable to `eps = 1e-5` the output shrinks.

# %%
for c in (1e3, 1.0, 1e-2, 3e-3, 1e-3):
    ratio = np.sqrt((ops.rms_norm(x[1:2] * np.float32(c), w, eps) ** 2).mean() /
                    (ops.rms_norm(x[1:2], w, eps) ** 2).mean())
    print(f"scale {c:8g}: mean(x^2) = {c * c:8.1e}, output RMS relative to scale 1: {ratio:.4f}")

# %% [markdown]
# ### A cast point that matters in bf16
#
# The Hugging Face code (and therefore the spec) normalises in float32, **rounds the
# normalised value to bf16, then multiplies by the weight** and rounds again. A kernel that
# fuses the multiply before the single rounding is *more* accurate, but it is not the same
# function: a good fraction of outputs differ by one bf16 ulp.

# %%
xb, wb = x.astype(bfloat16), w.astype(bfloat16)
spec = ops.rms_norm(xb, wb, eps).astype(np.float32)                     # two roundings
xf = xb.astype(np.float32)
fused = (wb.astype(np.float32) * xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + eps))
fused = fused.astype(bfloat16).astype(np.float32)                        # one rounding
differ = spec != fused
ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(fused), 1e-30))) - 7)  # bf16: 8-bit significand
print(f"elements that differ: {differ.mean():.1%}; largest difference "
      f"{(np.abs(spec - fused) / ulp).max():.0f} bf16 ulp")
assert 0 < differ.mean() < 0.5

# %% [markdown]
# ## RoPE: a rotation of pairs of dimensions
#
# For position $p$ and pair $i < d/2$ the angle is $p \cdot \theta^{-2i/d}$. Each *pair* of
# dimensions of a query or key is rotated by its angle, so the dot product $q_m \cdot k_n$
# depends only on the *distance* $m - n$. Which dimensions form a pair is a convention:
#
# * **rotate-half** (GPT-NeoX, Hugging Face Llama layout, and openPangu): pair $i$ is
#   $(x_i, x_{i+d/2})$; `x' = x * cos + rotate_half(x) * sin`, `rotate_half(x) = cat(-x2, x1)`.
# * **interleaved** (GPT-J, Meta's original Llama code): pair $i$ is $(x_{2i}, x_{2i+1})$.
#
# Picture: the linear map each convention applies at one position, drawn for a small
# head_dim of 16 so the pattern is visible (each non-zero 2x2 pattern is one rotation).

# %%
def rope_matrix(apply, d, position, theta):
    """The [d, d] matrix M with apply(x) = M @ x at one position (columns = images of e_j)."""
    cos, sin = ops.rope_tables(np.full(d, position), d, theta)            # one row per basis vector
    return apply(np.eye(d)[:, None, :], cos, sin)[:, 0, :].T               # [d, d]

d_small = 16
fig, ax = plt.subplots(1, 2, figsize=(8, 3.6))
for a, (name, fn) in zip(ax, [("rotate-half (openPangu)", ops.apply_rope),
                              ("interleaved (GPT-J)", ops.apply_rope_interleaved)]):
    M = rope_matrix(fn, d_small, position=3, theta=100.0)
    a.imshow(M, cmap="RdBu", vmin=-1, vmax=1)
    a.set_title(name), a.set_xlabel("input dim"), a.set_ylabel("output dim")
    a.grid(False)
plt.tight_layout()

# %% [markdown]
# The two conventions are the same rotation applied to **permuted dimensions**: if the
# interleaved function receives the vector re-ordered as $(x_0, x_{d/2}, x_1, x_{d/2+1},
# \dots)$, it produces the rotate-half result in that same order. So a checkpoint's q/k
# weight rows *imply* one convention; running it with the other scrambles every head's
# positional signal. Checked at the real head_dim 128 and theta 4e6:

# %%
T = 64
cos, sin = ops.rope_tables(np.arange(T), D, cfg.rope_theta)              # [T, D] each
q = rng.standard_normal((T, cfg.num_attention_heads, D))                  # [T, Hq, D] float64
perm = np.stack([np.arange(D // 2), np.arange(D // 2) + D // 2], axis=1).reshape(-1)
same = np.abs(ops.apply_rope_interleaved(q[..., perm], cos, sin) - ops.apply_rope(q, cos, sin)[..., perm]).max()
wrong = np.abs(ops.apply_rope_interleaved(q, cos, sin) - ops.apply_rope(q, cos, sin)).max()
print("interleaved(permuted q) vs permuted rotate-half(q):", same)
print("interleaved(q) vs rotate-half(q)                  :", wrong.round(3))
assert same < 1e-12 and wrong > 0.1

# %% [markdown]
# The defining property, with refimpl's tables: the score between a query at position $m$
# and a key at position $n$ is the same for every $(m, n)$ with the same distance.

# %%
qv, kv = rng.standard_normal((1, 1, D)), rng.standard_normal((1, 1, D))
def score(m, n):
    cq, sq = ops.rope_tables([m], D, cfg.rope_theta)
    ck, sk = ops.rope_tables([n], D, cfg.rope_theta)
    return float(np.sum(ops.apply_rope(qv, cq, sq) * ops.apply_rope(kv, ck, sk)))
for m, n in [(7, 2), (1007, 1002), (30007, 30002), (7, 6)]:
    print(f"q at {m:5d}, k at {n:5d} (distance {m - n}): score {score(m, n):+.12f}")
assert abs(score(7, 2) - score(30007, 30002)) < 1e-9

# %% [markdown]
# ## The frequency spectrum: theta 4e6 (1B) vs 1.6e7 (7B, Pro-MoE)
#
# Pair $i$ turns by $\theta^{-2i/d}$ radians per position, so its **wavelength** is
# $2\pi\,\theta^{2i/d}$ positions. Pair 0 turns by one radian per token (wavelength $2\pi$);
# the last pairs turn so slowly that they do not complete a single turn inside the context
# window and act almost as position-free channels. A larger theta stretches the spectrum:
# more pairs become slower than the context. We read the frequencies back from refimpl's
# own table (the angle at position 1).

# %%
fig, ax = plt.subplots()
pairs = np.arange(D // 2)
for theta, label in [(1e4, "1e4 (original RoPE)"), (4e6, "4e6 (Embedded-1B)"),
                     (1.6e7, "1.6e7 (Embedded-7B, Pro-MoE)")]:
    c1, s1 = ops.rope_tables([1], D, theta)
    inv_freq = np.arctan2(s1[0, : D // 2], c1[0, : D // 2])              # radians per position
    wavelength = 2 * np.pi / inv_freq
    ax.semilogy(pairs, wavelength, label=f"theta {label}")
    slow = int((wavelength > 32768).sum())
    print(f"theta {theta:8.2g}: longest wavelength {wavelength[-1]:12.4g} positions; "
          f"{slow:2d} of {D // 2} pairs do not complete one turn in 32k positions")
ax.axhline(32768, color="k", ls="--", lw=1), ax.text(1, 40000, "32k context", fontsize=8)
ax.axhline(131072, color="gray", ls=":", lw=1), ax.text(1, 160000, "128k context", fontsize=8)
ax.set_xlabel("pair index i"), ax.set_ylabel("wavelength (positions)")
ax.set_title("RoPE wavelength per dimension pair, head_dim 128"), ax.legend(fontsize=8)
plt.tight_layout()

# %% [markdown]
# ## Float32 angles drift at long positions
#
# refimpl's default (`angles="exact"`) computes `position * inv_freq` in float64 and rounds
# cos/sin once. The Hugging Face recipe (`angles="float32"`) computes `inv_freq` and the
# product in float32: the product of a position near 30000 has a float32 ulp of about 2e-3,
# and `inv_freq` itself carries a relative rounding error that the position multiplies. We
# recover the angle error from the two tables as
# $\delta = \operatorname{atan2}(\sin_f\cos_e - \cos_f\sin_e,\; \cos_f\cos_e + \sin_f\sin_e)$
# for every pair and every position up to 32k.

# %%
positions = np.arange(32768)
ce, se = ops.rope_tables(positions, D, cfg.rope_theta, angles="exact")    # [32768, 128]
cf, sf = ops.rope_tables(positions, D, cfg.rope_theta, angles="float32")
delta = np.arctan2(sf * ce - cf * se, cf * ce + sf * se)[:, : D // 2]     # [32768, 64] radians
worst = np.abs(delta).max(axis=1)

block = 256                                                              # envelope per block
centers = positions.reshape(-1, block).mean(axis=1)
fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
ax[0].plot(centers, worst.reshape(-1, block).max(axis=1), lw=1.5, label="max over pairs")
for i in (1, 4, 16):
    ax[0].plot(centers, np.abs(delta[:, i]).reshape(-1, block).max(axis=1), lw=0.8,
               label=f"pair {i}")
ax[0].plot(positions, positions * 2.0 ** -24, "k--", lw=1, label="position x 2^-24")
ax[0].set_xlabel("position"), ax[0].set_ylabel("|angle error| (rad)"), ax[0].legend(fontsize=7)
ax[0].set_title("float32 vs exact RoPE angle")
ax[1].plot(pairs, np.abs(delta).max(axis=0), "o", ms=3)
ax[1].set_xlabel("pair index i"), ax[1].set_ylabel("max |error| over 32k positions")
ax[1].set_yscale("log"), ax[1].set_title("which pairs drift")
plt.tight_layout()
print(f"max angle error: {worst.max():.2e} rad; at position 30000: {worst[30000]:.2e} rad; "
      f"at position 1000: {worst[1000]:.2e} rad")
print("pair 0 (inv_freq = 1 exactly, integer positions exact in float32):",
      np.abs(delta[:, 0]).max())
assert 5e-4 < worst[30000] < 5e-3

# %% [markdown]
# What does a 2e-3 rad error do? A rotated pair of norm $r$ moves by about $r\delta$, so a
# query-key score of size $|q||k|$ moves by up to $|q||k|\delta$. In the score units of a real
# head (`q.k / sqrt(128)` of order 1 to 10) that is 1e-3 to 1e-2: well below bf16's own
# rounding of the scores (2^-8 relative), but far above float32's. This is why a golden
# computed with exact angles and a kernel computing float32 angles agree in bf16 yet disagree
# in float32 tests at long positions, and why refimpl makes the choice a config switch
# (`rope_angles`, `"exact"` by default, `"float32"` to reproduce Hugging Face bit for bit).

# %%
k_vec = rng.standard_normal((1, 1, D))
q_vec = rng.standard_normal((1, 1, D))
pos = np.array([30000])
for mode in ("exact", "float32"):
    c_, s_ = ops.rope_tables(pos, D, cfg.rope_theta, angles=mode)
    print(f"{mode:8s}: score of one query at 30000 with a key at 0 = "
          f"{float(np.sum(ops.apply_rope(q_vec, c_, s_) * k_vec)) / np.sqrt(D):+.6f}")
