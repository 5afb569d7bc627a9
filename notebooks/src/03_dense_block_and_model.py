# %% [markdown]
# # 3. The dense block and the whole model
#
# One openPangu-Embedded layer is
#
#     h = x + o_proj(attention(rope(q_proj(rmsnorm(x))), rope(k_proj(...)), v_proj(...)))
#     y = h + down_proj(silu(gate_proj(rmsnorm(h))) * up_proj(rmsnorm(h)))
#
# and the model is an embedding, a stack of these layers, a final RMSNorm and the LM head
# (tied to the embedding in the 1B model). Notebooks 1 and 2 took apart the norm, RoPE and
# attention; here we look at the **SwiGLU MLP**, follow the **residual stream** through the
# layers of the embedded default model (a small trained PanguEmbedded model shipped with
# refimpl), turn the last hidden state into **logits**, and **generate** text with the
# tokenizer and the openPangu chat template, greedy and sampled.

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
print(model, "|", tok)

ROLE_LABELS = {"系统": "<system>", "用户": "<user>", "助手": "<assistant>", "：": ":"}
def label(piece):
    """An ASCII-safe label for plots (the default font has no CJK glyphs)."""
    piece = ROLE_LABELS.get(piece, piece).replace("\u2581", "_")          # SentencePiece's space mark
    return piece if piece.isascii() else ascii(piece)[1:-1]

# %% [markdown]
# ## SwiGLU
#
# The MLP has no bias and three matrices. `gate_proj` and `up_proj` both map the hidden
# state up to the intermediate width; the gate goes through SiLU, $\mathrm{silu}(g) = g
# \cdot \sigma(g)$, and multiplies the "up" value elementwise; `down_proj` maps back:
# $y = W_\text{down}\,(\mathrm{silu}(W_\text{gate} x) \odot W_\text{up} x)$.
#
# SiLU is a smooth ReLU that lets small negative values through (minimum about -0.28 at
# $g \approx -1.28$). The product with `up` makes each unit a *bilinear* gate: its output's
# sign comes from `up`, and its magnitude is switched on by the gate.

# %%
g = np.linspace(-6, 6, 601)
fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
ax[0].plot(g, ops.silu(g), label="silu(g) = g * sigmoid(g)")
ax[0].plot(g, np.maximum(g, 0), "--", lw=1, label="relu(g)")
ax[0].set_xlabel("g"), ax[0].legend(fontsize=8), ax[0].set_title("SiLU")
G_, U_ = np.meshgrid(np.linspace(-4, 4, 161), np.linspace(-3, 3, 121))
im = ax[1].contourf(G_, U_, ops.silu(G_) * U_, levels=21, cmap="RdBu_r")
ax[1].set_xlabel("gate pre-activation g"), ax[1].set_ylabel("up value u")
ax[1].set_title("silu(g) * u"), fig.colorbar(im, ax=ax[1])
plt.tight_layout()
i_min = np.argmin(ops.silu(g))
print(f"silu minimum {ops.silu(g)[i_min]:.4f} at g = {g[i_min]:.2f}")

# %% [markdown]
# The same inside the model. We run a prompt with taps, take layer 0's MLP input
# (`post_norm`) and recompute the block step by step from the named weights; the result
# must equal the `mlp_out` tap.

# %%
text = "The json module can serialize Python objects"
ids = np.array(tok.encode(text))
taps = refimpl.Taps()
logits = model.forward(ids, taps=taps)

p = "model.layers.0.mlp."
x0 = taps["layers.0.post_norm"]                                          # [T, H]
gate = ops.linear(x0, model.w(p + "gate_proj.weight"))                   # [T, I]
up = ops.linear(x0, model.w(p + "up_proj.weight"))                       # [T, I]
act = ops.silu(gate) * up                                                # [T, I]
y0 = ops.linear(act, model.w(p + "down_proj.weight"))                   # [T, H]
assert np.allclose(y0, taps["layers.0.mlp_out"], atol=1e-5)
assert np.array_equal(ops.swiglu(x0, *(model.w(p + n) for n in ("gate_proj.weight", "up_proj.weight",
                                                                  "down_proj.weight"))),
                      taps["layers.0.mlp_out"])
print(f"hidden {cfg.hidden_size} -> intermediate {cfg.intermediate_size} -> hidden; "
      "step by step == ops.swiglu == the mlp_out tap")
small = np.mean(np.abs(act) < 0.01 * np.abs(act).max())
print(f"fraction of gate pre-activations < 0: {np.mean(gate < 0):.0%}; "
      f"units with |silu(g) * u| below 1% of the largest: {small:.0%}")

fig, ax = plt.subplots(1, 2, figsize=(9, 3))
ax[0].hist(gate.ravel(), bins=80), ax[0].set_title("layer 0 gate pre-activations g")
ax[1].hist(act.ravel(), bins=80, log=True), ax[1].set_title("silu(g) * u (log count)")
plt.tight_layout()

# %% [markdown]
# ## The residual stream
#
# Every layer *adds* its attention and MLP outputs to the residual stream; nothing ever
# replaces it. The taps `layers.{i}.input`, `attn_out`, `mlp_out` and `out` let us follow
# its size (root mean square per token) through the model.

# %%
L = cfg.num_hidden_layers
rms = lambda a: np.sqrt(np.mean(np.asarray(a, np.float64) ** 2, axis=-1))  # [T, H] -> [T]
stream = np.stack([rms(taps["embed"])] + [rms(taps[f"layers.{i}.out"]) for i in range(L)])  # [L+1, T]
attn_upd = np.stack([rms(taps[f"layers.{i}.attn_out"]) for i in range(L)])
mlp_upd = np.stack([rms(taps[f"layers.{i}.mlp_out"]) for i in range(L)])
pieces = [label(tok.id_to_piece(int(i))) for i in ids]

fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
ax[0].plot(stream.mean(1), "o-", label="stream after layer (0 = embedding)")
ax[0].plot(np.arange(1, L + 1), attn_upd.mean(1), "s--", label="attention update")
ax[0].plot(np.arange(1, L + 1), mlp_upd.mean(1), "^--", label="MLP update")
ax[0].set_xlabel("layer"), ax[0].set_ylabel("RMS (mean over tokens)"), ax[0].legend(fontsize=8)
im = ax[1].imshow(stream, aspect="auto", cmap="viridis")
ax[1].set_xticks(range(len(ids)), pieces, rotation=90, fontsize=7)
ax[1].set_ylabel("layer"), ax[1].set_title("stream RMS per token"), ax[1].grid(False)
fig.colorbar(im, ax=ax[1])
plt.tight_layout()
print("stream RMS per layer (mean over tokens):", stream.mean(1))
print("first token (<s>) vs the rest, last layer:", stream[-1, 0].round(2), "vs",
      stream[-1, 1:].mean().round(2))
# the stream is the sum of the embedding and every update, to rounding
total = taps["embed"].astype(np.float64) + sum(
    taps[f"layers.{i}.attn_out"].astype(np.float64) + taps[f"layers.{i}.mlp_out"].astype(np.float64)
    for i in range(L))
assert np.allclose(total, taps[f"layers.{L - 1}.out"], atol=1e-4)

# %% [markdown]
# The stream grows with depth, since every layer adds to it, while after the first layer the
# updates stay about the same size, so each later layer turns the stream less. The heat map's left
# column is the first token, `<s>`: its stream ends up much larger than the others' (see the
# printed ratio), the small-model version of the "massive activations" that large trained
# models keep on the first token and that make it a convenient place for attention to park
# (notebook 2's stripes on `<s>`). Because every RMSNorm divides by the token's own RMS, a
# large stream does not swamp the layers that read it.

# %% [markdown]
# ## From the last hidden state to logits
#
# The final RMSNorm, then the LM head. The embedded model ties the head to the embedding
# table: the logit of token $v$ is the dot product of the normalised hidden state with
# embedding row $v$. The softmax of the last position's logits is the next-token
# distribution.

# %%
head = model.w("model.embed_tokens.weight") if cfg.tie_word_embeddings else model.w("lm_head.weight")
print("tie_word_embeddings:", cfg.tie_word_embeddings, "| head", head.shape)
recomputed = ops.linear(taps["final_norm"], head)                        # [T, H] -> [T, V]
assert np.array_equal(recomputed, logits)
probs = ops.softmax(logits[-1])                                          # [V]
top = np.argsort(-probs)[:10]
for t in top[:5]:
    print(f"  {probs[t]:6.1%}  {tok.id_to_piece(int(t))!r}")
entropy = -np.sum(ops.softmax(logits, -1) * np.log(ops.softmax(logits, -1) + 1e-30), axis=-1)

fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
ax[0].barh(range(10)[::-1], probs[top])
ax[0].set_yticks(range(10)[::-1], [label(tok.id_to_piece(int(t))) for t in top], fontsize=8)
ax[0].set_title(f"next token after {text[-20:]!r}"), ax[0].set_xlabel("probability")
ax[1].bar(range(len(ids)), entropy / np.log(2))
ax[1].set_xticks(range(len(ids)), pieces, rotation=90, fontsize=7)
ax[1].set_ylabel("bits"), ax[1].set_title("entropy of the next-token distribution")
plt.tight_layout()

# %% [markdown]
# ## Generation: the chat template, greedy and sampled
#
# openPangu's chat format wraps every message as `[unused9]ROLE：CONTENT[unused10]` (ROLE
# 系统 system, 用户 user, 助手 assistant; a full-width colon), starts with an empty system
# turn when none is given, and ends the prompt with `[unused9]助手：` so the model writes the
# assistant's turn. Generation stops at `[unused10]`, the turn end, which is the eos token.

# %%
messages = [{"role": "user", "content": "What does the json module do?"}]
print(repr(tok.apply_chat_template(messages)))
prompt = tok.encode_chat(messages)
print(prompt)
print("eos (turn end):", tok.eos_id, tok.id_to_piece(tok.eos_id), "| config eos:", cfg.eos_token_id)

# %% [markdown]
# `refimpl.generate` prefills the prompt into a KV cache, then feeds one token at a time.
# **Greedy** decoding (temperature 0) takes the most probable token every step, so it is
# deterministic. **Sampling** divides the logits by a temperature, optionally keeps the top-k
# tokens or the smallest set with probability mass top-p, and draws from a seeded generator:
# the same seed gives the same text.
#
# Keep the scale in mind: the default model has 4 layers of width 256 and was trained for
# minutes on the docstrings of Python's standard library and a few chat examples. Its
# replies have the right form (a docstring-like sentence, then the turn end) far more often
# than the right content.

# %%
def reply(temperature=0.0, top_p=1.0, seed=0, max_new_tokens=48):
    out = list(refimpl.generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, eos_id=tok.eos_id))
    return out, tok.decode(out, skip_special_tokens=True)

greedy_ids, greedy_text = reply()
print("greedy           :", repr(greedy_text))
for seed in (0, 1, 2):
    print(f"T=0.8 top_p=0.95 seed {seed}:", repr(reply(0.8, 0.95, seed)[1]))
assert reply(0.8, 0.95, 1)[0] == reply(0.8, 0.95, 1)[0]                # seeded: reproducible

# greedy == argmax of a full forward over prompt + generated tokens, step by step
full = model.forward(np.array(prompt + greedy_ids[:-1]))
assert list(full[len(prompt) - 1:].argmax(-1)) == greedy_ids
print("greedy tokens == argmax of one full forward pass over the same sequence")

# %% [markdown]
# How temperature reshapes the distribution of the first generated token:

# %%
first = model.forward(np.array(prompt), last_only=True)[0].astype(np.float64)
order = np.argsort(-first)[:12]
fig, ax = plt.subplots()
for i, temp in enumerate((0.5, 1.0, 1.5)):
    p_t = ops.softmax(first / temp)
    ax.bar(np.arange(12) + 0.27 * (i - 1), p_t[order], 0.27, label=f"T = {temp}")
ax.set_xticks(range(12), [label(tok.id_to_piece(int(t))) for t in order], rotation=60, fontsize=8)
ax.set_ylabel("probability"), ax.legend(fontsize=8), ax.set_title("first reply token")
plt.tight_layout()
