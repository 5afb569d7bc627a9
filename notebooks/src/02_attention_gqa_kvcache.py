# %% [markdown]
# # 2. Attention: GQA, the KV cache, and the online softmax
#
# openPangu's attention is standard causal scaled dot-product attention with **grouped-query
# attention** (GQA): the 1B model has 12 query heads but only 6 key/value heads, each KV head
# shared by 2 query heads. This notebook
#
# 1. looks at real attention maps of the embedded default model (a small trained
#    PanguEmbedded model shipped with refimpl) on a real prompt, recomputed from its taps;
# 2. counts what GQA saves in the KV cache of the 1B model at its 32k context;
# 3. shows that prefill and token-by-token decoding build the same cache;
# 4. writes the tiled **online softmax** of flash-style kernels in a few lines of NumPy and
#    checks it against the spec's `refimpl.ops.attention`.

# %%
%matplotlib inline
import numpy as np
import matplotlib.pyplot as plt

import refimpl
from refimpl import ops
from refimpl.io.checkpoint import DEFAULT_MODEL_DIR, load_model
from refimpl.tokenizer import Tokenizer

plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (8, 3.2), "axes.grid": True,
                     "grid.alpha": 0.3})
np.set_printoptions(precision=4, suppress=True, linewidth=110)
model = load_model(DEFAULT_MODEL_DIR, numerics="fp32")
tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
cfg = model.config
print(model)
print(f"heads: {cfg.num_attention_heads} query, {cfg.num_key_value_heads} key/value "
      f"(query head h reads KV head h // {cfg.kv_group_size}), head_dim {cfg.head_dim}")

# %% [markdown]
# ## Attention maps on a real prompt
#
# We run a chat prompt through the model with `refimpl.Taps`, which keeps every named
# intermediate. From the rotated queries and keys (`q_rope`, `k_rope`) we recompute each
# head's attention probabilities exactly as the spec does:
# $P = \mathrm{softmax}(q k^\top / \sqrt{d} + \text{causal mask})$, where query head $h$ uses
# KV head $h / \text{group}$. Multiplying by the values must reproduce the `attn` tap.

# %%
messages = [{"role": "user", "content": "What does the json module do?"}]
ids = np.array(tok.encode_chat(messages))
pieces = [tok.id_to_piece(int(i)) for i in ids]
print(repr(tok.apply_chat_template(messages)))
print(len(ids), "tokens:", pieces)

taps = refimpl.Taps()
logits = model.forward(ids, taps=taps)

def attention_probs(q, k, group):
    """Per-head causal attention probabilities. # q [T, Hq, D], k [S, Hkv, D] -> [Hq, T, S]"""
    T, Hq, D = q.shape
    kv = k[:, np.arange(Hq) // group, :]                                  # [S, Hq, D]
    s = np.einsum("thd,shd->hts", q, kv) * D ** -0.5                     # [Hq, T, S]
    s = np.where(ops.causal_mask(T, k.shape[0])[None], s, -np.inf)
    return ops.softmax(s, axis=-1)

L = cfg.num_hidden_layers
probs = [attention_probs(taps[f"layers.{i}.q_rope"], taps[f"layers.{i}.k_rope"], cfg.kv_group_size)
         for i in range(L)]                                               # L x [Hq, T, T]
for i in range(L):
    v = taps[f"layers.{i}.v"][:, np.arange(cfg.num_attention_heads) // cfg.kv_group_size, :]
    out = np.einsum("hts,shd->thd", probs[i], v).reshape(len(ids), -1)  # [T, Hq*D]
    assert np.allclose(out, taps[f"layers.{i}.attn"], atol=1e-5), i
print("probabilities @ values reproduce the attn tap in every layer")

# %%
Hq = cfg.num_attention_heads
fig, axes = plt.subplots(L, Hq, figsize=(2.1 * Hq, 2.1 * L))
for i in range(L):
    for h in range(Hq):
        a = axes[i, h]
        a.imshow(probs[i][h], cmap="Blues", vmin=0, vmax=1)
        a.set_xticks([]), a.set_yticks([]), a.grid(False)
        if i == 0:
            a.set_title(f"head {h} (KV {h // cfg.kv_group_size})", fontsize=9)
        if h == 0:
            a.set_ylabel(f"layer {i}", fontsize=9)
fig.suptitle("attention probabilities (rows: queries, columns: keys)", fontsize=10)
plt.tight_layout()

# %% [markdown]
# Heads 0 and 1 read the same keys and values (KV head 0), yet their maps differ: GQA shares
# keys and values between query heads, not queries. Even this small model shows the usual
# kinds of heads: **positional** heads whose weight
# sits on the diagonal (the token itself) or just below it (the previous token), and
# **content** heads that draw vertical stripes: many later queries read the same few keys,
# often the `<s>` token or the markers of the chat template. We measure, per head, the mean
# weight on the token itself, on the previous token, and on the single most-read key (over
# queries from position 2 on, where there is a choice), then plot the most positional and
# the most stripe-like head with their tokens.

# %%
ROLE_LABELS = {"系统": "<system>", "用户": "<user>", "助手": "<assistant>", "：": ":"}
def label(piece):
    """An ASCII-safe label for plots (the default font has no CJK glyphs)."""
    piece = ROLE_LABELS.get(piece, piece).replace("\u2581", "_")          # SentencePiece's space mark
    return piece if piece.isascii() else ascii(piece)[1:-1]

T = len(ids)
stats = {}
for i in range(L):
    for h in range(Hq):
        P = probs[i][h][2:]                                              # queries 2.. [T-2, T]
        self_w = np.mean([P[r, r + 2] for r in range(T - 2)])
        prev_w = np.mean([P[r, r + 1] for r in range(T - 2)])
        stripe_key = int(np.argmax(P.mean(0)))
        stats[i, h] = (self_w, prev_w, float(P.mean(0)[stripe_key]), stripe_key)
print("layer head  self  prev  top-key (which)")
for (i, h), (sw, pw, kw, key) in stats.items():
    print(f"{i:5d} {h:4d}  {sw:.2f}  {pw:.2f}  {kw:.2f}  ({label(pieces[key])})")
positional = max(stats, key=lambda ih: max(stats[ih][0], stats[ih][1]))
content = max(stats, key=lambda ih: stats[ih][2])

labels = [label(p) for p in pieces]
fig, ax = plt.subplots(1, 2, figsize=(11, 5.6))
for a, (i, h), what in [(ax[0], positional, "most positional"), (ax[1], content, "most stripe-like")]:
    a.imshow(probs[i][h], cmap="Blues", vmin=0, vmax=1)
    a.set_xticks(range(T), labels, rotation=90, fontsize=7)
    a.set_yticks(range(T), labels, fontsize=7)
    a.set_title(f"layer {i}, head {h}: {what}", fontsize=10), a.grid(False)
plt.tight_layout()

# %% [markdown]
# ## GQA and the KV cache
#
# Decoding keeps every past key and value, per layer, so each new token attends to them
# without recomputation. The cache holds `2 (K and V) x layers x KV heads x head_dim` values
# per token. GQA divides it by the group size compared with giving every query head its own
# KV head (multi-head attention, MHA); multi-query attention (MQA) keeps a single KV head.
# For openPangu-Embedded-1B at its full 32k context, in bf16:

# %%
def kv_cache_bytes(config, tokens, kv_heads=None, bytes_per_value=2):
    """2 x layers x kv_heads x head_dim x tokens x bytes."""
    kv_heads = config.num_key_value_heads if kv_heads is None else kv_heads
    return 2 * config.num_hidden_layers * kv_heads * config.head_dim * tokens * bytes_per_value

c1b = refimpl.preset("embedded-1b")
ctx = c1b.max_position_embeddings
variants = {"MHA (12 KV heads)": c1b.num_attention_heads, "GQA (6, openPangu)": c1b.num_key_value_heads,
            "MQA (1 KV head)": 1}
sizes = {name: kv_cache_bytes(c1b, ctx, kv) for name, kv in variants.items()}
for name, b in sizes.items():
    print(f"{name:20s}: {b / 2**30:5.2f} GiB at {ctx} tokens "
          f"({kv_cache_bytes(c1b, 1, variants[name]) / 1024:.0f} KiB per token)")
weights_gib = refimpl.parameter_count(c1b) * 2 / 2**30
print(f"for scale: the 1B model's bf16 weights are {weights_gib:.2f} GiB")
for name in ("embedded-7b", "pro-moe-72b"):
    c = refimpl.preset(name)
    print(f"{name}: {c.num_key_value_heads} KV heads x {c.num_hidden_layers} layers -> "
          f"{kv_cache_bytes(c, c.max_position_embeddings) / 2**30:.1f} GiB at "
          f"{c.max_position_embeddings} tokens (MHA would be {c.kv_group_size}x that)")

fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(list(sizes), [b / 2**30 for b in sizes.values()], color=["C7", "C0", "C7"])
ax.axhline(weights_gib, color="k", ls="--", lw=1)
ax.text(1.6, weights_gib + 0.1, "1B weights (bf16)", fontsize=8)
ax.set_ylabel("GiB"), ax.set_title("embedded-1b KV cache at 32k tokens, bf16")
plt.tight_layout()

# %% [markdown]
# The formula must agree with what refimpl's `KVCache` actually holds. The default model's
# cache after our prompt, in fp32 (4 bytes per value):

# %%
cache = model.new_cache()
model.forward(ids, cache)
assert cache.nbytes() == kv_cache_bytes(cfg, len(ids), bytes_per_value=4)
print(f"KVCache.nbytes() = {cache.nbytes()} = formula for {len(ids)} tokens")

# %% [markdown]
# ## Prefill and decode build the same cache
#
# *Prefill* runs the whole prompt in one forward pass (matrix-matrix products, every query
# at once under the causal mask). *Decode* then feeds one token at a time; its single query
# attends to the cached keys and values. Running the prompt token by token from the start
# must produce the same cache and the same logits as the prefill. In fp64 the two agree to
# the last few bits: the only difference is the order in which BLAS sums a matrix-matrix
# versus a matrix-vector product.

# %%
def cached_kv(cache, layer):
    """All keys and values the cache holds for a layer, [length, Hkv, D] each (appending
    zero new positions returns them)."""
    empty = np.empty((0, cfg.num_key_value_heads, cfg.head_dim))
    return cache.append(layer, empty, empty)

m64 = load_model(DEFAULT_MODEL_DIR, numerics="fp64")
prefill = m64.new_cache()
logits_prefill = m64.forward(ids, prefill)                               # [T, V]
decode = m64.new_cache(capacity=4)                                       # grows as it goes
logits_decode = np.concatenate([m64.forward(ids[t:t + 1], decode) for t in range(len(ids))])
print("cache lengths:", prefill.length, decode.length)
for layer in range(L):
    (kp, vp), (kd, vd) = cached_kv(prefill, layer), cached_kv(decode, layer)
    print(f"layer {layer}: max |K prefill - K decode| = {np.abs(kp - kd).max():.1e}, "
          f"|V ...| = {np.abs(vp - vd).max():.1e}")
    assert np.allclose(kp, kd, rtol=0, atol=1e-12) and np.allclose(vp, vd, rtol=0, atol=1e-12)
print(f"logits: max |prefill - decode| = {np.abs(logits_prefill - logits_decode).max():.1e}")
assert np.abs(logits_prefill - logits_decode).max() < 1e-10

# %% [markdown]
# ## The online softmax of flash-style kernels
#
# The spec computes the full score matrix `[heads, T, S]`, then the softmax, then the
# product with V. A fused kernel never materialises the scores: it walks over **blocks of
# keys**, keeping for each query row a running maximum $m$, a running denominator $\ell$
# and an unnormalised output $a$. When a new block raises the maximum, what was
# accumulated so far is rescaled by $e^{m_\text{old} - m_\text{new}}$:
#
# $$m' = \max(m, \max_j s_j),\quad \ell' = \ell\,e^{m - m'} + \sum_j e^{s_j - m'},\quad
#   a' = a\,e^{m - m'} + \sum_j e^{s_j - m'} v_j,\quad o = a / \ell.$$
#
# The result is the softmax exactly (in exact arithmetic); only the order of the sums
# changes. In NumPy, at the real embedded-1b head shapes (12 query heads, 6 KV heads, 128):

# %%
def attention_online(q, k, v, block=64):
    """Causal GQA attention by key blocks with an online softmax.
    # q [T, Hq, D], k/v [S, Hkv, D] -> [T, Hq, D], computed in float64"""
    T, Hq, D = q.shape
    S = k.shape[0]
    kv_head = np.arange(Hq) // (Hq // k.shape[1])
    qh = q.transpose(1, 0, 2).astype(np.float64) * D ** -0.5            # [Hq, T, D]
    m = np.full((Hq, T, 1), -np.inf)                                     # running max
    l = np.zeros((Hq, T, 1))                                             # running denominator
    acc = np.zeros((Hq, T, D))                                           # unnormalised output
    allowed = ops.causal_mask(T, S)                                      # [T, S]
    for j0 in range(0, S, block):
        kb = k[j0:j0 + block, kv_head].transpose(1, 2, 0)                # [Hq, D, B]
        vb = v[j0:j0 + block, kv_head].transpose(1, 0, 2)                # [Hq, B, D]
        s = np.where(allowed[None, :, j0:j0 + block], qh @ kb, -np.inf)  # [Hq, T, B]
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        alpha = np.exp(m - m_new)                                        # rescale what we had
        p = np.exp(s - m_new)
        l = l * alpha + p.sum(axis=-1, keepdims=True)
        acc = acc * alpha + p @ vb
        m = m_new
    return (acc / l).transpose(1, 0, 2)

rng = np.random.default_rng(0)
T_, Hq_, Hkv_, D_ = 256, c1b.num_attention_heads, c1b.num_key_value_heads, c1b.head_dim
q = rng.standard_normal((T_, Hq_, D_)) * 2
k = rng.standard_normal((T_, Hkv_, D_)) * 2
v = rng.standard_normal((T_, Hkv_, D_))
spec = ops.attention(q, k, v, causal=True)                                # float64 spec
for block in (16, 64, 256):
    err = np.abs(attention_online(q, k, v, block) - spec).max()
    print(f"block {block:3d}: max |online - spec| = {err:.1e}")
    assert err < 1e-12
# decode: one query (the last position) against all 256 cached keys
err = np.abs(attention_online(q[-1:], k, v, 64) - ops.attention(q[-1:], k, v)).max()
print(f"decode (T=1, S=256): {err:.1e}")

# %% [markdown]
# What the rescaling does for one query row: the running maximum only ever rises, and each
# time it does, everything accumulated so far is multiplied by $e^{m_\text{old} -
# m_\text{new}} < 1$. Without this the exponentials of large scores would overflow (or, with
# a fixed shift, underflow) long before the row ends.

# %%
row, head, block = 200, 0, 16
s_row = (q[row, head] @ k[: row + 1, head // 2].T) * D_ ** -0.5          # causal: keys 0..200
blocks = [s_row[j:j + block] for j in range(0, row + 1, block)]
running = np.maximum.accumulate([b.max() for b in blocks])
alpha = np.exp(np.concatenate([[running[0]], running[:-1]]) - running)
fig, ax = plt.subplots(1, 2, figsize=(9, 3))
ax[0].plot(s_row, ".", ms=3, label="scores s_j")
ax[0].step(np.arange(len(blocks)) * block + block, running, where="pre", color="C3", label="running max m")
ax[0].set_xlabel("key position"), ax[0].legend(fontsize=8), ax[0].set_title(f"query {row}, head {head}")
ax[1].bar(range(1, len(blocks)), alpha[1:])                             # block 0 starts the row
ax[1].set_xlabel("key block"), ax[1].set_ylabel("rescale factor exp(m_old - m_new)")
ax[1].set_title("1 = max unchanged")
plt.tight_layout()

# %% [markdown]
# ### The Numba kernel
#
# `refimpl.kernels` (the Numba backend, `Model(..., backend="numba")`) exposes the same
# operator names as `refimpl.ops`. By default its `attention` follows the spec's cast points
# (a decode kernel for one query, a blocked prefill kernel that computes a block of queries'
# scores, then rounds the probabilities as the spec does). `flash=True` selects a **flash
# kernel**: one task per (head, block of `BLOCK_Q` queries), keys in blocks of `BLOCK_K`,
# exactly the running max / running sum / rescaled accumulator above. It rounds the scores
# as the spec does, but keeps the probabilities in float32 and divides once at the end, so in
# bf16 it skips the spec's rounding of every probability to 8 bits. In float64 the only
# difference from the spec is summation order. In bf16 it is judged against the float64
# reference (notebook 5's k-error rule); here both round the same bf16 scores (of size ~4,
# where a bf16 ulp is 0.03), which dominates both errors:

# %%
from refimpl import kernels
from refimpl.kernels.attention import BLOCK_K, BLOCK_Q
from refimpl.numerics import bfloat16
print(f"flash tiles: {BLOCK_Q} queries x {BLOCK_K} keys")
err64 = np.abs(kernels.attention(q, k, v, flash=True) - spec).max()
print(f"float64: kernel vs spec {err64:.1e}, kernel vs the NumPy online softmax "
      f"{np.abs(kernels.attention(q, k, v, flash=True) - attention_online(q, k, v, BLOCK_K)).max():.1e}")
assert err64 < 1e-12
qb, kb, vb = (a.astype(bfloat16) for a in (q, k, v))
ref = ops.attention(*(a.astype(np.float64) for a in (qb, kb, vb)))      # float64, same rounded inputs
spec_err = np.abs(ops.attention(qb, kb, vb).astype(np.float64) - ref).max()
kern_err = np.abs(kernels.attention(qb, kb, vb, flash=True).astype(np.float64) - ref).max()
print(f"bf16: max error vs float64 reference: spec {spec_err:.2e}, flash kernel {kern_err:.2e}")
assert kern_err <= 2 * spec_err
