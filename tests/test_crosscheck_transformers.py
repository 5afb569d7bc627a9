"""Cross-check: the dense openPangu-Embedded model against Hugging Face transformers' Llama.

openPangu-Embedded is Llama-shaped with biases on q, k, v *and* o (transformers Llama's
``attention_bias=True`` puts a bias on all four) and tied embeddings. We build a small
``LlamaForCausalLM`` with every parameter randomised (biases and norm weights too, so they
matter), save it with ``save_pretrained``, rewrite its config.json to the PanguEmbedded fields
of MODEL-SPEC and load it with ``refimpl.io.checkpoint.load_model``. refimpl must then reproduce
transformers' logits, per-layer hidden states and greedy generation.

Measured figures are printed as ``crosscheck | ...`` lines (run with ``-s``) and recorded in
docs/crosschecks.md. transformers and torch are hard requirements of these tests (the project's
``test`` extra): a missing import fails, it does not skip.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import refimpl
from refimpl.io.checkpoint import load_model
from refimpl.numerics import bfloat16
from refimpl.ops import rope_tables

from .conftest import rel_err

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

SEED = 20240607
# A small openPangu-Embedded: GQA 4/2, head_dim 32 (= hidden / heads, so config.json omits it
# as the 1B's does), 3 layers, rope_theta of the 1B.
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 128, 352, 3, 4, 2, 300
HEAD_DIM = HIDDEN // HEADS
THETA = 4_000_000.0
EPS = 1e-5
MAX_POS = 32768
SEQ_LEN = 32
PROMPT_LEN, NEW_TOKENS = 8, 20

#: fp32 logits and hidden states, relative to max |value| (measured on an Intel Xeon: logits
#: 5.8e-7, hidden states <= 5.9e-7; on an AMD EPYC: logits 7.04e-7, final_norm 7.02e-7: OpenBLAS
#: and torch pick their float32 kernels, and so their summation orders, by the CPU). 8e-7 is
#: 6.7 float32 units (2^-23) of the tensor's scale; docs/crosschecks.md states it
FP32_TOL = 8e-7
#: logits and hidden states: ulps of the tensor's scale (max |value|) in its dtype; measured
#: here (docs/crosschecks.md): bf16 logits 1.88, hidden states <= 1.5; fp16 logits 2.38,
#: hidden states <= 2.25
HALF_ULPS = {"bf16": {"logits": 2.5, "hidden": 2.0}, "fp16": {"logits": 3.0, "hidden": 3.0}}


def report(name: str, **figures) -> None:
    """One line of measured agreement; `pytest -s` shows it (docs/crosschecks.md quotes it)."""
    body = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in figures.items())
    print(f"\ncrosscheck | {name} | {body}")


# ---------------------------------------------------------------------- the two models
def hf_llama() -> LlamaForCausalLM:
    """The transformers model, every parameter drawn from a seeded torch generator."""
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, rms_norm_eps=EPS, max_position_embeddings=MAX_POS,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
        attention_bias=True, mlp_bias=False, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():  # lm_head is the embedding (tied)
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.5 * noise)
            else:                                  # [out, in]
                p.copy_(noise / np.sqrt(p.shape[1]))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def pangu_config_json(rope_angles: str, dtype: str) -> dict:
    """config.json of an openPangu-Embedded checkpoint (MODEL-SPEC section 1), small sizes."""
    return {
        "architectures": ["PanguEmbeddedForCausalLM"], "model_type": "PanguEmbedded",
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": EPS, "rope_theta": THETA, "max_position_embeddings": MAX_POS,
        "vocab_size": VOCAB, "tie_word_embeddings": True, "bias": True, "hidden_act": "silu",
        "bos_token_id": 1, "pad_token_id": 0, "eos_token_id": 2, "torch_dtype": dtype,
        "refimpl_rope_angles": rope_angles,
    }


def save_as_pangu(model: LlamaForCausalLM, directory, rope_angles: str, dtype: str) -> str:
    """save_pretrained, then replace the Llama config.json by the PanguEmbedded one."""
    directory = os.fspath(directory)
    model.save_pretrained(directory, safe_serialization=True)
    generation_config = os.path.join(directory, "generation_config.json")
    if os.path.exists(generation_config):
        os.remove(generation_config)
    tmp = os.path.join(directory, "config.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(pangu_config_json(rope_angles, dtype), fh, indent=2)
    os.replace(tmp, os.path.join(directory, "config.json"))
    return directory


@pytest.fixture(scope="module")
def hf_fp32():
    return hf_llama()


@pytest.fixture(scope="module")
def ckpt(hf_fp32, tmp_path_factory):
    """rope mode -> checkpoint directory (fp32 safetensors written by transformers)."""
    return {mode: save_as_pangu(hf_fp32, tmp_path_factory.mktemp(f"pangu-{mode}"), mode,
                                "float32")
            for mode in ("exact", "float32")}


@pytest.fixture(scope="module")
def token_ids():
    rng = np.random.default_rng(SEED)
    ids = rng.integers(3, VOCAB, size=SEQ_LEN)
    ids[0] = 1                                           # bos
    return ids.astype(np.int64)


@pytest.fixture(scope="module")
def hf_out(hf_fp32, token_ids):
    with torch.no_grad():
        out = hf_fp32(torch.from_numpy(token_ids)[None], output_hidden_states=True)
    return out.logits[0].numpy(), [h[0].numpy() for h in out.hidden_states]


# ---------------------------------------------------------------------- fp32 logits, taps
def test_checkpoint_loads_as_pangu_embedded(ckpt):
    """The transformers checkpoint, with the PanguEmbedded config, is a dense tied model with
    biases on all four projections and no lm_head tensor."""
    model = load_model(ckpt["exact"], numerics="fp32")
    c = model.config
    assert (c.family, c.tie_word_embeddings, c.bias, c.head_dim) == ("dense", True, True, 32)
    assert "lm_head.weight" not in model.weights
    for proj in "qkvo":
        assert f"model.layers.0.self_attn.{proj}_proj.bias" in model.weights
        assert np.abs(model.weights[f"model.layers.0.self_attn.{proj}_proj.bias"]).max() > 0.1


@pytest.mark.parametrize("angles", ["exact", "float32"])
def test_fp32_logits_equal_transformers(ckpt, token_ids, hf_out, angles):
    model = load_model(ckpt[angles], numerics="fp32")
    assert model.config.rope_angles == angles
    logits = model.forward(token_ids)                    # [T, V]
    ref = hf_out[0]
    err = rel_err(logits, ref)
    report(f"transformers fp32 logits, rope {angles}", T=len(token_ids),
           max_abs=float(np.abs(logits - ref).max()), max_rel=err,
           logit_scale=float(np.abs(ref).max()))
    assert err < FP32_TOL
    assert np.array_equal(logits.argmax(-1), ref.argmax(-1))


def test_fp32_layer_taps_equal_transformers_hidden_states(ckpt, token_ids, hf_out):
    """hidden_states[0] = embedding, hidden_states[i + 1] = layers.{i}.out, except that
    transformers' last entry is after the final norm (our final_norm tap)."""
    model = load_model(ckpt["float32"], numerics="fp32")
    taps = refimpl.Taps()
    model.forward(token_ids, taps=taps)
    hs = hf_out[1]
    assert len(hs) == LAYERS + 1
    pairs = [("embed", hs[0])] + [(f"layers.{i}.out", hs[i + 1]) for i in range(LAYERS - 1)]
    pairs.append(("final_norm", hs[LAYERS]))
    worst = {}
    for name, ref in pairs:
        worst[name] = rel_err(taps[name], ref)
        assert worst[name] < FP32_TOL, name
    report("transformers fp32 hidden states", **worst)
    # the last layer's output is *not* transformers' last hidden state (that is normalised)
    assert rel_err(taps[f"layers.{LAYERS - 1}.out"], hs[LAYERS]) > 1e-2


def test_greedy_generation_equals_transformers(ckpt, hf_fp32, token_ids):
    prompt = token_ids[:PROMPT_LEN]
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS,
                               min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = hf_fp32.generate(torch.from_numpy(prompt)[None], generation_config=gen_cfg)
    hf_tokens = out[0, PROMPT_LEN:].tolist()
    assert len(hf_tokens) == NEW_TOKENS
    model = load_model(ckpt["exact"], numerics="fp32")
    ours = list(refimpl.generate(model, prompt, max_new_tokens=NEW_TOKENS, stop_at_eos=False))
    # margin: the greedy choice is never a near-tie, so the equality is meaningful
    full = model.forward(np.concatenate([prompt, np.array(ours[:-1])]))[PROMPT_LEN - 1:]
    top2 = np.sort(full, axis=-1)[:, -2:]
    margin = float(np.min(top2[:, 1] - top2[:, 0]) / np.abs(full).max())
    report("transformers greedy generation", tokens=NEW_TOKENS,
           equal=int(sum(a == b for a, b in zip(ours, hf_tokens))), min_rel_margin=margin)
    assert ours == hf_tokens
    assert margin > 10 * FP32_TOL


# ---------------------------------------------------------------------- bf16 and fp16
#: mode -> (torch dtype, config.json torch_dtype, significand bits after the leading one)
HALF = {"bf16": (torch.bfloat16, "bfloat16", 7), "fp16": (torch.float16, "float16", 10)}


def half_ulp(x: float, mode: str) -> float:
    """The spacing of the mode's numbers at |x|."""
    return float(2.0 ** (np.floor(np.log2(abs(x))) - HALF[mode][2]))


@pytest.fixture(scope="module", params=list(HALF))
def half_case(request, hf_fp32, token_ids, tmp_path_factory):
    """transformers in bf16 or fp16 (the fp32 model cast), saved as a checkpoint of that
    dtype, and its output."""
    mode = request.param
    tdtype, name, _ = HALF[mode]
    hf = hf_llama().to(tdtype)
    dirs = {angles: save_as_pangu(hf, tmp_path_factory.mktemp(f"pangu-{mode}-{angles}"),
                                  angles, name)
            for angles in ("exact", "float32")}
    with torch.no_grad():
        out = hf(torch.from_numpy(token_ids)[None], output_hidden_states=True)
        ref32 = hf_fp32(torch.from_numpy(token_ids)[None]).logits[0].numpy()
    logits = out.logits[0].float().numpy()
    hidden = [h[0].float().numpy() for h in out.hidden_states]
    return mode, dirs, logits, hidden, ref32


@pytest.mark.parametrize("angles", ["exact", "float32"])
def test_half_logits_agree_with_transformers(half_case, token_ids, angles):
    """bf16 / fp16 against transformers in the same dtype: the same cast points give
    agreement to a few ulps of the logit scale (not bit-equality: the float32 accumulation
    order of the matmuls differs, and one flipped rounding propagates; the operators
    themselves are bit-equal to a transcription, tests/test_castpoints_torch.py)."""
    mode, dirs, ref, _, ref32 = half_case
    model = load_model(dirs[angles], numerics=mode)
    assert model.config.rope_angles == angles
    assert model.weights["model.norm.weight"].dtype == model.dtype
    logits = model.forward(token_ids).astype(np.float32)
    scale = float(np.abs(ref).max())
    diff = float(np.abs(logits - ref).max())
    ulps = diff / half_ulp(scale, mode)
    # the low-precision error itself: each run against transformers fp32
    ours_vs_32 = float(np.abs(logits - ref32).max())
    hf_vs_32 = float(np.abs(ref - ref32).max())
    report(f"transformers {mode} logits, rope {angles}", max_abs=diff, max_rel=diff / scale,
           logit_scale=scale, ulps_of_scale=ulps, refimpl_vs_hf_fp32=ours_vs_32,
           hf_vs_hf_fp32=hf_vs_32)
    assert ulps <= HALF_ULPS[mode]["logits"]
    # FlashAttention's rule: our low-precision error is at most 2x transformers' own
    assert ours_vs_32 <= 2 * hf_vs_32


def test_half_layer_taps_agree_with_transformers(half_case, token_ids):
    mode, dirs, _, hidden, _ = half_case
    model = load_model(dirs["float32"], numerics=mode)
    taps = refimpl.Taps()
    model.forward(token_ids, taps=taps)
    names = ["embed"] + [f"layers.{i}.out" for i in range(LAYERS - 1)] + ["final_norm"]
    figures = {}
    for name, ref in zip(names, hidden):
        ours = taps[name].astype(np.float32)
        ulps = float(np.abs(ours - ref).max()) / half_ulp(float(np.abs(ref).max()), mode)
        figures[name] = ulps
        assert ulps <= HALF_ULPS[mode]["hidden"], name
    assert figures["embed"] == 0.0
    report(f"transformers {mode} hidden states, ulps of each tensor's scale", **figures)


# ---------------------------------------------------------------------- RoPE tables
ROPE_HEAD_DIM = 128  # the real head_dim of both families


def hf_rope_tables(positions, theta: float, head_dim: int = ROPE_HEAD_DIM):
    """cos, sin [P, head_dim] float32 from transformers' LlamaRotaryEmbedding."""
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=MAX_POS,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    with torch.no_grad():
        cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32),
                                             torch.from_numpy(np.asarray(positions))[None])
    return cos[0].numpy(), sin[0].numpy()


def table_diff(ours, ref):
    """(max |difference|, fraction of positions x columns where cos and sin are bit-equal)."""
    (c, s), (rc, rs) = ours, ref
    return (max(float(np.abs(c - rc).max()), float(np.abs(s - rs).max())),
            float(np.mean((c == rc) & (s == rs))))


@pytest.mark.parametrize("theta", [4_000_000.0, 16_000_000.0])
def test_rope_exact_angles_differ_from_transformers_by_1e3_near_30000(theta):
    """transformers computes the angle position * inv_freq in float32; near position 30000
    that angle is off by ~1e-3 rad, so the exact tables (the default) differ from its tables
    by ~1e-3 there, while at the first 32 positions they agree to float32 rounding."""
    positions = np.arange(MAX_POS)
    ref = hf_rope_tables(positions, theta)
    exact = rope_tables(positions, ROPE_HEAD_DIM, theta, angles="exact", dtype=np.float32)
    late = positions >= 29000
    late_err, _ = table_diff([t[late] for t in exact], [t[late] for t in ref])
    early_err, _ = table_diff([t[:32] for t in exact], [t[:32] for t in ref])
    report(f"transformers RoPE tables, exact angles, theta={theta:.3g}",
           max_abs_positions_29000_32767=late_err, max_abs_positions_0_31=early_err)
    assert 3e-4 < late_err < 1e-2
    # below position 32 the float32 angle is within ulp(32)/2 ~ 1e-6 of the exact one
    assert early_err < 4e-6


@pytest.mark.parametrize("theta", [4_000_000.0, 16_000_000.0])
def test_rope_float32_angles_are_bit_closer_to_transformers(theta):
    """At the positions of the logits tests (0..31) the "float32" mode agrees bit-for-bit
    with transformers on more table entries than the "exact" mode does."""
    positions = np.arange(SEQ_LEN)
    ref = hf_rope_tables(positions, theta)
    figures = {}
    for mode in ("exact", "float32"):
        err, equal = table_diff(rope_tables(positions, ROPE_HEAD_DIM, theta, angles=mode,
                                            dtype=np.float32), ref)
        figures[f"{mode}_max_abs"], figures[f"{mode}_bit_equal"] = err, equal
    report(f"transformers RoPE tables positions 0..31, theta={theta:.3g}", **figures)
    assert figures["float32_bit_equal"] > figures["exact_bit_equal"]


@pytest.mark.parametrize("theta", [4_000_000.0, 16_000_000.0])
def test_rope_float32_angles_reproduce_transformers_up_to_32767(theta):
    """With angles="float32" the tables are transformers' to one float32 ulp at every
    position 0..32767 (cos/sin of the same float32 angle; torch's cos may differ by 1 ulp)."""
    positions = np.arange(MAX_POS)
    err, equal = table_diff(rope_tables(positions, ROPE_HEAD_DIM, theta, angles="float32",
                                        dtype=np.float32), hf_rope_tables(positions, theta))
    report(f"transformers RoPE tables, float32 angles, theta={theta:.3g}, positions 0..32767",
           max_abs=err, bit_equal=equal)
    assert err <= 2.0 ** -23
