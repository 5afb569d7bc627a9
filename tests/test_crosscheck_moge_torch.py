"""Cross-check: the Pangu Pro MoE v1 (MoGE) block and model against a PyTorch transcription.

The PyTorch code below is written from the formula of MODEL-SPEC section 2, not from refimpl:

    logits = x @ W_gate^T; p = softmax(logits) over all experts (float32)
    view p as [T, groups, group_size]; per group: max and argmax (first max wins)
    e_g = g * group_size + argmax_g;  w_g = p[e_g] * router_scale[e_g]  (no renormalisation)
    y = sum_g w_g * SwiGLU_{e_g}(x) + SharedSwiGLU(x)

evaluated token by token and group by group. It is compared with `refimpl.ops.moge_route` /
`refimpl.ops.moe_block` at a tiny shape, at one real-width layer (hidden 5120, 64 experts of
1344, shared 5376) whose experts are generated lazily (only selected experts exist), and for
the whole `tiny-moge` model against a PyTorch transcription of the full forward pass.

torch is a hard requirement (the project's ``test`` extra): a missing import fails, it does not
skip. Measured figures print as ``crosscheck | ...`` lines with ``-s``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import refimpl
from refimpl import ops
from refimpl.config import preset
from refimpl.numerics import bfloat16

from .conftest import rel_err

# relative to the max |value| of the reference; bf16: 4 bf16 ulps of the scale for one block
# (the transcription sums the experts token by token, refimpl in Hugging Face's index_add
# order), twice that for the 3-layer model
#: measured (docs/crosschecks.md): fp32 block 3.4e-7 (tiny), 8.1e-7 (real width), model
#: logits 3.1e-7; fp64 <= 6.6e-16; bf16 block 4.5e-3 (~1 ulp), model 1.4e-2 (~4 ulps)
TOL = {"fp32": 1.5e-6, "fp64": 1e-15, "bf16": 2 * 2.0 ** -8}
TORCH_DTYPE = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
NP_DTYPE = {"fp32": np.float32, "fp64": np.float64, "bf16": bfloat16}


def report(name: str, **figures) -> None:
    body = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in figures.items())
    print(f"\ncrosscheck | {name} | {body}")


def to_torch(a) -> torch.Tensor:
    """NumPy -> torch, bfloat16 (ml_dtypes) included (torch.from_numpy does not take it)."""
    a = np.asarray(a)
    if a.dtype == bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(a)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


# ---------------------------------------------------------------------- the transcription
def torch_swiglu(x, w_gate, w_up, w_down):
    """down(silu(gate(x)) * up(x)); weights [out, in]."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def torch_moge_route(logits, router_scale, groups):
    """(expert ids [T, G], weights [T, G]) of MODEL-SPEC's MoGE routing."""
    T, E = logits.shape
    size = E // groups
    p = torch.softmax(logits.to(torch.float32 if logits.dtype != torch.float64
                                else torch.float64), dim=-1)        # global softmax [T, E]
    p_max, local = p.view(T, groups, size).max(dim=-1)              # [T, G], first max wins
    ids = local + torch.arange(groups) * size                       # group offsets
    return ids, p_max * router_scale.reshape(-1)[ids].to(p.dtype)   # no renormalisation


def torch_moge_block(x, gate_w, router_scale, experts, shared, groups):
    """y[t] = sum_g w[t, g] * Expert_{e[t, g]}(x[t]) + Shared(x[t]); experts[e] -> 3 tensors.

    # x [T, H] -> [T, H], plus the routing (ids, weights)
    """
    ids, w = torch_moge_route(x @ gate_w.T, router_scale, groups)
    y = torch_swiglu(x, *shared)                                     # [T, H]
    for t in range(x.shape[0]):
        for g in range(groups):
            expert = experts[int(ids[t, g])]
            y[t] += w[t, g].to(x.dtype) * torch_swiglu(x[t:t + 1], *expert)[0]
    return y, ids, w


# ---------------------------------------------------------------------- lazy experts
def random_matrix(rng, shape, dtype):
    """Uniform values of standard deviation 1/sqrt(fan_in) for an [out, in] weight (uniform,
    not normal: 3x faster to draw at the real width)."""
    w = rng.random(shape, dtype=np.float32)
    w -= np.float32(0.5)
    w *= np.float32(np.sqrt(12.0 / shape[1]))
    return w.astype(dtype, copy=False)


class LazyExperts:
    """experts[e] -> (w_gate [I, H], w_up [I, H], w_down [H, I]) drawn from a generator seeded
    by (seed, e), made on first use and kept; `made` records which experts were asked for."""

    def __init__(self, num_experts, hidden, inter, seed, dtype=np.float32):
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.seed, self.dtype = seed, dtype
        self.made: dict = {}

    def __len__(self):
        return self.num_experts

    def __getitem__(self, e):
        e = int(e)
        if not 0 <= e < self.num_experts:
            raise IndexError(e)
        if e not in self.made:
            rng = np.random.default_rng([self.seed, e])
            H, I = self.hidden, self.inter
            self.made[e] = tuple(random_matrix(rng, shape, self.dtype)
                                 for shape in ((I, H), (I, H), (H, I)))
        return self.made[e]


class TorchView:
    """experts[e] as torch tensors (no copy) of a LazyExperts."""

    def __init__(self, experts):
        self.experts = experts

    def __getitem__(self, e):
        return tuple(to_torch(w) for w in self.experts[e])


def block_case(T, H, E, G, inter, shared_inter, seed, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(dtype)                        # [T, H]
    gate_w = (2.0 * rng.standard_normal((E, H)) / np.sqrt(H)).astype(dtype)
    router_scale = rng.uniform(0.5, 1.5, size=(1, E)).astype(dtype)
    shared = tuple(random_matrix(rng, s, dtype)
                   for s in ((shared_inter, H), (shared_inter, H), (H, shared_inter)))
    experts = LazyExperts(E, H, inter, seed, dtype)
    return x, gate_w, router_scale, experts, shared


def compare_block(name, mode, T, H, E, G, inter, shared_inter, seed):
    dtype = NP_DTYPE[mode]
    x, gate_w, router_scale, experts, shared = block_case(T, H, E, G, inter, shared_inter,
                                                          seed, dtype)
    rec = {}
    ours = ops.moe_block(x, gate_w, router_scale, experts, shared, G,
                         record=lambda n, a: rec.__setitem__(n, a))
    touched = set(experts.made)
    t = to_torch
    ref, ids, w = torch_moge_block(t(x), t(gate_w), t(router_scale), TorchView(experts),
                                   tuple(t(s) for s in shared), G)
    ref, ids, w = to_numpy(ref), ids.numpy(), w.numpy()
    fig = {"max_abs": float(np.abs(ours.astype(np.float64) - ref).max()),
           "max_rel": rel_err(ours, ref), "weights_max_rel": rel_err(rec["expert_weights"], w),
           "ids_equal": bool(np.array_equal(rec["expert_ids"], ids)),
           "experts_run": len(touched)}
    report(f"torch MoGE block {name} {mode} T={T} H={H} E={E} G={G}", **fig)
    assert ours.dtype == dtype
    assert fig["ids_equal"]
    assert touched == set(ids.reshape(-1).tolist())        # only selected experts were made
    assert fig["weights_max_rel"] <= TOL[mode]
    assert fig["max_rel"] <= TOL[mode]
    return rec, ids


# ---------------------------------------------------------------------- block tests
@pytest.mark.parametrize("mode", ["fp32", "fp64", "bf16"])
def test_moge_block_tiny_equals_torch(mode):
    c = preset("tiny-moge")
    rec, ids = compare_block("tiny", mode, 64, c.hidden_size, c.num_experts, c.num_groups,
                             c.moe_intermediate_size, c.shared_expert_intermediate_size, 11)
    # one expert per group, every group represented, every expert used somewhere
    size = c.num_experts // c.num_groups
    assert np.array_equal(ids // size, np.broadcast_to(np.arange(c.num_groups), ids.shape))
    assert len(np.unique(ids)) == c.num_experts


def test_moge_block_real_width_equals_torch():
    """One Pro-MoE layer at the real width: hidden 5120, 64 experts of 1344 in 8 groups,
    shared 5376; 3 tokens in fp32, so at most 24 of the 64 experts are ever generated."""
    c = preset("pro-moe-72b")
    compare_block("pro-moe-72b width", "fp32", 3, c.hidden_size, c.num_experts, c.num_groups,
                  c.moe_intermediate_size, c.shared_expert_intermediate_size, 72)


@pytest.mark.parametrize("mode", ["fp32", "fp64"])
def test_moge_route_equals_torch_including_ties(mode):
    """Routing alone on given logits, with exact ties inside groups: both pick the lowest id."""
    rng = np.random.default_rng(5)
    E, G = 64, 8
    logits = rng.standard_normal((32, E)).astype(NP_DTYPE[mode])
    logits[0] = 0.0                                    # all tied: each group picks 8g
    logits[1, 8:16] = 3.0                              # group 1 tied at its max
    logits[2, [17, 21]] = 5.0                          # two-way tie at ids 17 and 21
    scale = rng.uniform(0.5, 1.5, size=(1, E)).astype(NP_DTYPE[mode])
    ids, w = ops.moge_route(logits, scale, G)
    tids, tw = torch_moge_route(torch.from_numpy(logits), torch.from_numpy(scale), G)
    assert np.array_equal(ids, tids.numpy())
    assert np.array_equal(ids[0], np.arange(G) * 8)
    assert ids[1, 1] == 8 and ids[2, 2] == 17
    err = rel_err(w, tw.numpy())
    report(f"torch MoGE routing {mode} with ties", weights_max_rel=err)
    assert err <= TOL[mode]


# ---------------------------------------------------------------------- whole model
def torch_rms_norm(x, w, eps):
    """weight * (x / sqrt(mean(x^2) + eps)) with the statistics in float32 (or float64)."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def torch_rotate_half(x):
    d2 = x.shape[-1] // 2
    return torch.cat((-x[..., d2:], x[..., :d2]), dim=-1)


def torch_forward(c, W, ids, dtype):
    """The whole Pro-MoE forward pass in PyTorch from MODEL-SPEC: (logits, layer outputs).

    # ids [T] -> logits [T, V]; W: name -> tensor (Hugging Face names)
    """
    T, Hq, Hkv, D = len(ids), c.num_attention_heads, c.num_key_value_heads, c.head_dim
    inv_freq = c.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]   # exact angles
    emb = torch.cat((angle, angle), dim=-1)                                       # [T, D]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    mask = torch.full((T, T), float("-inf"), dtype=dtype).triu(1)                 # causal
    x = W["model.embed_tokens.weight"][torch.from_numpy(ids)]                     # [T, H]
    outs = []
    for i in range(c.num_hidden_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        n1 = torch_rms_norm(x, W[p + "input_layernorm.weight"], c.rms_norm_eps)
        q, k, v = (F.linear(n1, W[a + f"{n}_proj.weight"], W[a + f"{n}_proj.bias"])
                   .view(T, -1, D).transpose(0, 1) for n in "qkv")                # [heads, T, D]
        q, k = q * cos + torch_rotate_half(q) * sin, k * cos + torch_rotate_half(k) * sin
        k, v = k.repeat_interleave(Hq // Hkv, dim=0), v.repeat_interleave(Hq // Hkv, dim=0)
        s = q @ k.transpose(1, 2) * D ** -0.5 + mask                               # [Hq, T, T]
        probs = torch.softmax(s.to(torch.float64 if dtype == torch.float64 else torch.float32),
                              dim=-1).to(dtype)                             # float32 softmax
        attn = (probs @ v).transpose(0, 1).reshape(T, Hq * D)
        x = x + F.linear(attn, W[a + "o_proj.weight"], W[a + "o_proj.bias"])
        n2 = torch_rms_norm(x, W[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        m = p + "mlp."
        experts = {e: tuple(W[f"{m}experts.{e}.{n}_proj.weight"] for n in ("gate", "up", "down"))
                   for e in range(c.num_experts)}
        shared = tuple(W[f"{m}shared_expert.{n}_proj.weight"] for n in ("gate", "up", "down"))
        y, _, _ = torch_moge_block(n2, W[m + "gate.weight"], W[m + "router_scale"], experts,
                                   shared, c.num_experts_per_tok)
        x = x + y
        outs.append(to_numpy(x).copy())
    x = torch_rms_norm(x, W["model.norm.weight"], c.rms_norm_eps)
    return to_numpy(F.linear(x, W["lm_head.weight"])), outs


@pytest.mark.parametrize("mode", ["fp32", "fp64", "bf16"])
def test_tiny_moge_model_equals_torch_transcription(mode):
    """fp32/fp64: equal to rounding. bf16: the transcription rounds in another order (shared
    expert first, token by token), so the two differ by a few bf16 ulps over 3 layers; both
    are then judged against the float64 transcription on the same bf16-valued weights, and
    refimpl's bf16 error must be at most 2x the transcription's (FlashAttention's rule)."""
    model = refimpl.init_model("tiny-moge", seed=3, numerics=mode)
    c = model.config
    assert c.mlp_only_layers == () and not c.tie_word_embeddings
    ids = np.random.default_rng(3).integers(0, c.vocab_size, size=24)
    taps = refimpl.Taps()
    logits = model.forward(ids, taps=taps)
    W = {name: to_torch(w) for name, w in model.weights.items()}
    with torch.no_grad():
        ref, outs = torch_forward(c, W, ids, TORCH_DTYPE[mode])
    layer_errs = {f"layers.{i}.out": rel_err(taps[f"layers.{i}.out"], outs[i])
                  for i in range(c.num_hidden_layers)}
    err = rel_err(logits, ref)
    figures = {"logits_max_rel": err,
               "logits_max_abs": float(np.abs(logits.astype(np.float64) - ref).max()),
               **layer_errs}
    tol = TOL[mode] if mode != "bf16" else 3 * TOL[mode]   # 6 ulps; measured 4.3 (layer 2)
    if mode == "bf16":
        with torch.no_grad():
            exact, _ = torch_forward(c, {n: w.double() for n, w in W.items()}, ids,
                                     torch.float64)
        figures["refimpl_bf16_vs_fp64"] = rel_err(logits, exact)
        figures["torch_bf16_vs_fp64"] = rel_err(ref, exact)
        assert figures["refimpl_bf16_vs_fp64"] <= 2 * figures["torch_bf16_vs_fp64"]
    report(f"torch tiny-moge whole model {mode}", **figures)
    assert err <= tol
    assert all(e <= tol for e in layer_errs.values())
    # routing is not degenerate: several experts per group are used in every layer
    for i in range(c.num_hidden_layers):
        assert len(np.unique(taps[f"layers.{i}.expert_ids"])) > c.num_groups
