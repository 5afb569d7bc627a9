# %% [markdown]
# # 4. MoGE routing: the formula, step by step, and the load balance it buys
#
# Pangu Pro MoE replaces the dense MLP with a **Mixture of Grouped Experts**: 64 routed
# experts in 8 contiguous groups of 8, and every token activates **exactly one expert per
# group**. This notebook runs the router at its real width (hidden 5120, 64 experts, 8
# groups) with seeded random router weights of the scale refimpl's initialiser uses, on a few
# hundred tokens of synthetic hidden states shaped like real ones, then measures what the
# grouping does to the load of 8 devices that each hold one group, against plain global
# top-8 routing over the same router logits.

# %%
%matplotlib inline
import numpy as np
import matplotlib.pyplot as plt

import refimpl
from refimpl import ops
from refimpl.random_init import random_tensor

plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (8, 3.2), "axes.grid": True,
                     "grid.alpha": 0.3})
np.set_printoptions(precision=4, suppress=True, linewidth=110)
cfg = refimpl.preset("pro-moe-72b")
H, E, G = cfg.hidden_size, cfg.num_experts, cfg.num_groups
S = cfg.experts_per_group
print(f"pro-moe-72b: hidden {H}, {E} experts in {G} groups of {S}, "
      f"{cfg.num_experts_per_tok} active per token, expert width {cfg.moe_intermediate_size}")

# %% [markdown]
# ## Router weights and hidden states
#
# The router is one matrix `mlp.gate.weight` `[64, 5120]` (no bias) and a learned per-expert
# `mlp.router_scale` `[1, 64]`. We take them from `refimpl.random_init.random_tensor`, which
# draws each tensor from its own seeded generator (N(0, 0.02) for the router, U(0.5, 1.5) for
# the scale), so these are exactly the tensors `refimpl.init_model("pro-moe-72b")` would hold
# in layer 0.
#
# The router sees the output of `post_attention_layernorm`, so each token's hidden state has
# unit RMS times the norm weight. Hidden states of trained models are not isotropic: they
# share a large common direction (with a few "massive" channels). `hidden_states(T, common)`
# builds tokens as a random part plus `common` x (a shared direction with 4 massive
# channels), then applies refimpl's `rms_norm` with the layer's norm weight. `common = 0` is
# isotropic noise; we use `common = 0.4` as the default realistic case.

# %%
W_gate = random_tensor(cfg, "model.layers.0.mlp.gate.weight", (E, H), seed=0, dtype=np.float32)
router_scale = random_tensor(cfg, "model.layers.0.mlp.router_scale", (1, E), seed=0, dtype=np.float32)
norm_w = random_tensor(cfg, "model.layers.0.post_attention_layernorm.weight", (H,), 0, np.float32)

_rng = np.random.default_rng(42)
shared = _rng.standard_normal(H).astype(np.float32)
shared[_rng.choice(H, 4, replace=False)] = 12.0 * np.sqrt(H / 4)        # massive channels
shared /= np.sqrt(np.mean(shared ** 2))                                  # unit RMS

def hidden_states(T, common=0.4, seed=0):
    """[T, H] float32: rms_norm(noise + common * U(0.5, 1.5) * shared direction)."""
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((T, H)).astype(np.float32)
    raw += np.float32(common) * rng.uniform(0.5, 1.5, (T, 1)).astype(np.float32) * shared
    return ops.rms_norm(raw, norm_w, cfg.rms_norm_eps)

T = 256
x = hidden_states(T)                                                     # [256, 5120]
print("router weight std", W_gate.std().round(4), "| router_scale range",
      router_scale.min().round(3), "..", router_scale.max().round(3))
print("hidden state RMS per token:", np.sqrt((x ** 2).mean(-1))[:4], "...")

# %% [markdown]
# ## The routing formula, one line at a time
#
# ```
# logits = x @ W_gate^T                       # [T, 64]
# p      = softmax(logits)                    # global, over all 64 experts, float32
# e_g    = 8g + argmax(p[:, 8g : 8g+8])       # one expert per group, ties -> lowest id
# w_g    = p[:, e_g] * router_scale[e_g]      # no renormalisation
# y      = sum_g w_g * Expert_{e_g}(x) + SharedExpert(x)
# ```

# %%
logits = ops.linear(x, W_gate)                                           # [T, H] -> [T, 64]
p = ops.softmax(logits, axis=-1)                                         # [T, 64], float32
local = np.argmax(p.reshape(T, G, S), axis=-1)                           # [T, 8], index inside group
ids = local + S * np.arange(G)                                           # [T, 8], global expert id
weights = np.take_along_axis(p, ids, axis=1) * router_scale[0, ids]     # [T, 8]

spec_ids, spec_weights = ops.moge_route(logits, router_scale, G)
assert np.array_equal(ids, spec_ids) and np.array_equal(weights, spec_weights)
print("by hand == refimpl.ops.moge_route: ids and weights identical")
print("logits: std over experts per token", logits.std(-1).mean().round(3))
print("token 0 experts:", ids[0], "\ntoken 0 weights:", weights[0])

# %% [markdown]
# Token 0's 64 probabilities as the 8 x 8 grid of groups: MoGE takes the largest entry of
# every row (crosses); global top-8 takes the 8 largest entries of the whole grid (circles),
# which may crowd several into one row and leave other rows empty.

# %%
def top8(probs):
    """Plain global top-k routing: the 8 most probable experts of each token. # [T, 64] -> [T, 8]"""
    return np.argsort(-probs, axis=-1, kind="stable")[:, :G]

t0 = top8(p[:1])[0]
fig, ax = plt.subplots(figsize=(5, 4))
im = ax.imshow(p[0].reshape(G, S), cmap="viridis")
ax.scatter(ids[0] % S, ids[0] // S, marker="x", color="red", s=60, label="MoGE (one per group)")
ax.scatter(t0 % S, t0 // S, marker="o", facecolors="none", edgecolors="deepskyblue", s=140,
           linewidths=2,
           label="global top-8")
ax.set_xlabel("expert within group"), ax.set_ylabel("group = device"), ax.grid(False)
ax.set_title("token 0: router probabilities"), fig.colorbar(im, ax=ax)
ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, -0.35))
plt.tight_layout()
print("global top-8 experts of token 0:", np.sort(t0), "-> devices", np.bincount(t0 // S, minlength=G))

# %% [markdown]
# The constraint has a price: global top-8 maximises the probability mass of the 8 chosen
# experts; MoGE keeps the best expert of each group, which can only keep less. And because
# the weights are **not renormalised**, their sum (before `router_scale`) is just that kept
# mass, well below 1 with 64 experts.

# %%
mass_moge = np.take_along_axis(p, ids, 1).sum(-1)
mass_top8 = np.take_along_axis(p, top8(p), 1).sum(-1)
print(f"kept probability mass, mean over tokens: MoGE {mass_moge.mean():.3f}, "
      f"global top-8 {mass_top8.mean():.3f}")
assert np.all(mass_moge <= mass_top8 + 1e-6)
fig, ax = plt.subplots()
ax.hist(mass_top8, bins=40, alpha=0.6, label="global top-8")
ax.hist(mass_moge, bins=40, alpha=0.6, label="MoGE")
ax.set_xlabel("sum of the 8 selected probabilities"), ax.legend(), ax.set_title(f"{T} tokens")
plt.tight_layout()

# %% [markdown]
# Ties inside a group go to the lowest expert id (as `argmax` does), a rule the spec fixes
# and the tests check:

# %%
tie = np.zeros((1, E), np.float32)
tie[0, [3, 5, 12, 13]] = 2.0                       # group 0: experts 3 and 5 tie; group 1: 12 and 13
print("tied logits ->", ops.moge_route(tie, np.ones((1, E), np.float32), G)[0][0, :2])

# %% [markdown]
# ## Load balance on 8 devices
#
# Expert parallelism places group $g$ (experts $8g \dots 8g+7$) on device $g$. The load of a
# device in one step is the number of (token, expert) activations it must compute. With T
# tokens there are 8T activations, so the ideal is T per device.

# %%
def device_loads(expert_ids):
    """Activations per device, device = expert_id // 8. # [T, k] -> [8]"""
    return np.bincount((np.asarray(expert_ids) // S).ravel(), minlength=G)

def spread(load):
    """Standard deviation of the loads relative to their mean, in %, and busiest / mean."""
    return 100 * load.std() / load.mean(), load.max() / load.mean()

load_moge, load_top8 = device_loads(ids), device_loads(top8(p))
for name, load in [("MoGE", load_moge), ("global top-8", load_top8)]:
    sd, busiest = spread(load)
    print(f"{name:12s} loads {load}  spread {sd:5.1f}%  busiest device {busiest:.2f} x mean")
assert np.all(load_moge == T)

fig, ax = plt.subplots()
ax.bar(np.arange(G) - 0.2, load_top8, 0.4, label="global top-8")
ax.bar(np.arange(G) + 0.2, load_moge, 0.4, label="MoGE")
ax.axhline(T, color="k", lw=1, ls="--")
ax.set_xlabel("device (= expert group)"), ax.set_ylabel("activations"), ax.legend(fontsize=8)
ax.set_title(f"{T} tokens, same router logits")
plt.tight_layout()

# %% [markdown]
# MoGE's balance is exact **per token**, not only on average: every token sends one
# activation to each device. Under top-8 a single token often sends 2, 3 or more of its 8
# activations to the same device, and in a synchronous expert-parallel step the busiest
# device sets the pace.

# %%
per_token_max = np.array([np.bincount(r // S, minlength=G).max() for r in top8(p)])
counts = np.bincount(per_token_max, minlength=G + 1)
print("top-8, activations on the busiest device of each token:",
      {k: int(v) for k, v in enumerate(counts) if v}, f"(mean {per_token_max.mean():.2f}; MoGE: 1)")
assert all(np.bincount(r // S, minlength=G).max() == 1 for r in ids)

# %% [markdown]
# ## Random routers and skewed routers
#
# How unbalanced top-8 is depends on the router and on the hidden states, not on the
# formula. Two regimes, over batch sizes from 8 to 2048 tokens:
#
# * **Unbiased**: isotropic hidden states (`common = 0`) with a random router. No expert is
#   preferred on average, so each device's load is a sum of independent per-token counts and
#   the spread shrinks like $1/\sqrt{T}$.
# * **Skewed**: when hidden states share a direction, even a random router prefers some
#   experts for *every* token (the "per-expert offset" below is the standard deviation over
#   experts of the mean logit); trained routers develop popular experts the same way. Then
#   top-8's spread stops shrinking with the batch. MoGE stays at exactly 0%.

# %%
batch_sizes = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
shared_unit = shared / np.linalg.norm(shared)
# a router "trained" to prefer some experts: rows tilted towards the shared direction, by
# amounts chosen to add a per-expert logit offset of standard deviation 1 on these states
along = float(np.mean(hidden_states(256, 0.4) @ shared_unit))          # mean projection
W_skewed = W_gate + np.outer(np.random.default_rng(5).standard_normal(E) / along,
                             shared_unit).astype(np.float32)
cases = [("random router, common 0.0", W_gate, 0.0), ("random router, common 0.4", W_gate, 0.4),
         ("random router, common 0.8", W_gate, 0.8), ("skewed router, common 0.4", W_skewed, 0.4)]
fig, ax = plt.subplots(figsize=(8, 3.6))
plateau = {}
for name, W, common in cases:
    sds, offsets = [], []
    for Tb in batch_sizes:
        lg = ops.linear(hidden_states(Tb, common, seed=Tb), W)
        pb = ops.softmax(lg, axis=-1)
        sds.append(spread(device_loads(top8(pb)))[0])
        offsets.append(lg.mean(0).std())
        assert spread(device_loads(ops.moge_route(lg, router_scale, G)[0]))[0] == 0.0
    plateau[name] = (offsets[-1], sds[-1])
    ax.loglog(batch_sizes, sds, "o-", ms=3, label=f"{name} (per-expert offset {offsets[-1]:.2f})")
    print(f"{name}: per-expert logit offset {offsets[-1]:.2f}; top-8 device spread " +
          ", ".join(f"T={Tb}: {s:.1f}%" for Tb, s in zip(batch_sizes, sds)))
# unbiased: small at large batches; any systematic preference: a plateau well above that
assert plateau["random router, common 0.0"][1] < 5
assert all(sd > 10 for name, (off, sd) in plateau.items() if "common 0.0" not in name)
ax.loglog(batch_sizes, 100 / np.sqrt(np.array(batch_sizes)), "k:", lw=1, label="~ 1/sqrt(T)")
ax.axhline(28, color="gray", ls="--", lw=1), ax.text(1500, 30, "28% (published, top-K)", fontsize=8)
for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
    axis(plt.matplotlib.ticker.FormatStrFormatter("%g"))
ax.set_xlabel("tokens per step"), ax.set_ylabel("device load spread (std/mean, %)")
ax.set_title("global top-8 on 8 devices (MoGE: exactly 0% in every case)")
ax.legend(fontsize=7, loc="lower left")
plt.tight_layout()

# %% [markdown]
# ### What MoGE does not balance
#
# MoGE fixes the load *per device*. Inside a device, the 8 experts of a group still receive
# uneven numbers of tokens: the grouped matrix multiply on the device must handle experts of
# different sizes. Per-expert counts for the skewed case:

# %%
xs = hidden_states(1024, 0.8, seed=7)
lg = ops.linear(xs, W_gate)
ids_s = ops.moge_route(lg, router_scale, G)[0]
per_expert = np.bincount(ids_s.ravel(), minlength=E).reshape(G, S)
print("MoGE device loads:", per_expert.sum(1))
print(f"MoGE per-expert spread within groups: {100 * per_expert.std(1).mean() / per_expert.mean():.0f}% "
      f"(mean over groups); largest expert {per_expert.max()} vs mean {per_expert.mean():.0f}")
fig, ax = plt.subplots(figsize=(5, 3.4))
im = ax.imshow(per_expert, cmap="magma")
ax.set_xlabel("expert within group"), ax.set_ylabel("device"), ax.grid(False)
ax.set_title("tokens per expert, MoGE, 1024 tokens"), fig.colorbar(im, ax=ax)
plt.tight_layout()

# %% [markdown]
# ## The published claim, and what refimpl measures
#
# The Pangu Pro MoE report states that device load spread (standard deviation) falls from
# **28%** (conventional top-K routing) to **4.7%** with MoGE. Our measurements:
#
# * Counted as activations per device, MoGE's spread is **exactly 0%** for any router, any
#   batch and any hidden states: one activation per token per device is a property of the
#   formula, which refimpl's `moge_route` implements and the assertions above check.
# * Global top-8's spread depends entirely on the router and the states it sees. For an
#   unbiased random router on isotropic states it falls like $1/\sqrt{T}$ (about 30% for 8
#   tokens, 1.4% for 2048). Once the router systematically prefers some experts (a
#   per-expert logit offset of 0.5 to 1, from a shared direction in the hidden states or from
#   tilted router rows), it plateaus at 20 to 60% however large the batch (printed above). A
#   top-K baseline of 28% is what a moderately skewed router gives.
# * A non-zero figure for MoGE (4.7%) cannot come from activation counts. It must measure
#   something the formula does not fix, for example the uneven per-expert work inside each
#   device shown above, a different placement of groups on devices, or measured time rather
#   than counts. The published material does not say, and without the trained router
#   weights and the hardware refimpl cannot reproduce either number; it reproduces the part
#   that is mathematics.

# %% [markdown]
# ## Epilogue: the whole MoGE block at real width, lazily
#
# `ops.moe_block` reads `experts[e]` only for experts some token selected. With 2 tokens at
# most 16 of the 64 experts run, so we can generate just those at the real shape
# (`[1344, 5120]` per projection) and check the block against the formula
# $y = \sum_g w_g \cdot \mathrm{Expert}_{e_g}(x) + \mathrm{Shared}(x)$ in float64.

# %%
class LazyExperts:
    """experts[e] -> (w_gate, w_up, w_down) of layer 0, generated on first use."""
    def __init__(self):
        self.made = {}
    def __getitem__(self, e):
        if e not in self.made:
            p = f"model.layers.0.mlp.experts.{e}."
            I = cfg.moe_intermediate_size
            self.made[e] = tuple(random_tensor(cfg, p + n, s, 0, np.float32) for n, s in
                                 [("gate_proj.weight", (I, H)), ("up_proj.weight", (I, H)),
                                  ("down_proj.weight", (H, I))])
        return self.made[e]
    def __len__(self):
        return E

I_sh = cfg.shared_expert_intermediate_size
shared_expert = tuple(random_tensor(cfg, f"model.layers.0.mlp.shared_expert.{n}", s, 0, np.float32)
                      for n, s in [("gate_proj.weight", (I_sh, H)), ("up_proj.weight", (I_sh, H)),
                                   ("down_proj.weight", (H, I_sh))])
experts = LazyExperts()
x2 = x[:2]                                                               # [2, 5120]
y = ops.moe_block(x2, W_gate, router_scale, experts, shared_expert, G)   # [2, 5120]
print(f"experts generated: {len(experts.made)} of {E}: {sorted(experts.made)}")

f64 = lambda a: np.asarray(a, np.float64)
def swiglu64(h, wg, wu, wd):
    g, u = h @ f64(wg).T, h @ f64(wu).T
    return (g / (1 + np.exp(-g)) * u) @ f64(wd).T
e_ids, w = ops.moge_route(ops.linear(x2, W_gate), router_scale, G)
ref = swiglu64(f64(x2), *shared_expert)
for t in range(2):
    for g in range(G):
        ref[t] += w[t, g] * swiglu64(f64(x2[t:t + 1]), *experts[int(e_ids[t, g])])[0]
err = np.abs(y - ref).max() / np.abs(ref).max()
print(f"moe_block vs the formula in float64: max relative error {err:.1e}")
assert err < 1e-5

# %% [markdown]
# ## Serving the block: two numerics profiles, the voted router, expert parallelism
#
# Deployments do not run the block the way Hugging Face eager does (docs/conventions.md,
# docs/moe_serving.md). Three things change what a kernel developer's golden must say.
#
# **1. Where the router's softmax is rounded.** vllm-ascend takes the softmax in bf16 and
# picks each group's argmax among the *rounded* probabilities (ties to the lowest id). On the
# same bf16 logits the two profiles choose differently for a small fraction of the choices,
# more when the router's logits are narrow (probabilities closer together):

# %%
import ml_dtypes
bf16 = np.dtype(ml_dtypes.bfloat16)
ones = np.ones((1, E), bf16)
spreads = [0.05, 0.1, 0.3, 1.0, 2.0]
differ = []
for sd in spreads:
    logits = (np.random.default_rng(7).standard_normal((4096, E)) * sd).astype(bf16)
    hf_ids, _ = ops.moge_route(logits, ones, G)                                 # float32 softmax
    va_ids, _ = ops.moge_route(logits, ones, G, softmax_dtype="activation")     # bf16 softmax
    differ.append((hf_ids != va_ids).mean())
    ties = ops.near_ties(logits, va_ids, G, 0, 1, softmax_dtype="activation")
    assert ties[hf_ids != va_ids].all()      # every differing choice is a bf16 near-tie
    print(f"logit std {sd:4}: {100 * differ[-1]:5.2f}% of {hf_ids.size} choices differ")
fig, ax = plt.subplots()
ax.semilogx(spreads, [100 * d for d in differ], "o-")
ax.set_xlabel("router logit standard deviation"); ax.set_ylabel("% choices differing")
ax.set_title("float32 vs bf16 router softmax, same bf16 logits")
plt.show()
assert differ[0] > differ[-1] > 0

# %% [markdown]
# Every differing choice is a near-tie: the two probabilities round to the same bf16 value or
# to neighbours. That is why a golden's expert ids must carry the rule that says which choices
# a correct kernel may decide either way (`expert_ids.near_tie`), and why a golden made under
# one profile records it (`parameters.conventions`).
#
# **2. The voted router of the 300I Duo deployment.** Per group only the 5 experts the batch
# chose most stay eligible; outvoted tokens move to their best eligible expert. Its result
# depends on the batch: the same token alone keeps its own choice.

# %%
batch_sizes = [1, 4, 16, 64, 256, 1024]
moved = []
for T_b in batch_sizes:
    xb = hidden_states(T_b, seed=3)
    lg = ops.linear(xb, W_gate)
    plain, _ = ops.moge_route(lg, router_scale, G)
    voted, _ = ops.moge_route(lg, router_scale, G, num_voted_experts=5)
    moved.append((plain != voted).mean())
    print(f"batch of {T_b:5d} tokens: {100 * moved[-1]:5.1f}% of choices moved by the vote")
fig, ax = plt.subplots()
ax.semilogx(batch_sizes, [100 * m for m in moved], "o-")
ax.set_xlabel("tokens in the batch"); ax.set_ylabel("% choices moved")
ax.set_title("voted router (num_voted_experts = 5) against plain MoGE")
plt.show()
assert moved[0] == 0.0                     # one token: its own vote is the only one

# %% [markdown]
# On these states the vote moves almost a fifth of the choices once the batch holds more
# than a few tokens: a golden of this router is a golden of its batch, and it says so.
#
# **3. Expert parallelism.** With the 8 groups on 8 ranks (`ops.moe_block_ep`), each token
# sends exactly one row to every rank: the send-count matrix of the all-to-all has equal
# column sums. Global top-8 on the same logits does not. The EP computation itself changes no
# bit of the result: every expert multiplies the same rows in the same order.

# %%
T_ep = 512
xe = hidden_states(T_ep, seed=5)
lg = ops.linear(xe, W_gate)
moge_ids, _ = ops.moge_route(lg, router_scale, G)
top_ids = ops.global_topk_ids(lg, G)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, (name, ids_) in zip(axes, [("MoGE", moge_ids), ("global top-8", top_ids)]):
    loads = ops.rank_loads(ids_, E, 8)
    ax.bar(range(8), loads)
    ax.set_title(f"{name}: rows per rank, spread {100 * ops.load_spread(loads):.1f}%")
    ax.set_xlabel("rank")
plt.show()
assert (ops.rank_loads(moge_ids, E, 8) == T_ep).all()

# a small block at real width for the bit-for-bit check: 24 tokens, experts narrowed to 64
I_small = 64
rng_ep = np.random.default_rng(1)
ex_small = [tuple((rng_ep.standard_normal(s) * 0.05).astype(np.float32) for s in
                  ((I_small, H), (I_small, H), (H, I_small))) for _ in range(E)]
sh_small = tuple((rng_ep.standard_normal(s) * 0.05).astype(np.float32) for s in
                 ((I_small, H), (I_small, H), (H, I_small)))
x24 = xe[:24]
one = ops.moe_block(x24, W_gate, router_scale, ex_small, sh_small, G)
for ep in (2, 4, 8, 16):
    y_ep, plan = ops.moe_block_ep(x24, W_gate, router_scale, ex_small, sh_small, G, ep)
    assert np.array_equal(y_ep.view(np.uint32), one.view(np.uint32))
print("send counts for ep = 8 (rows source rank s sends to rank r):")
print(ops.moe_block_ep(x24, W_gate, router_scale, ex_small, sh_small, G, 8)[1]["send_counts"])
print("moe_block_ep equals moe_block bit for bit for ep = 2, 4, 8, 16")
