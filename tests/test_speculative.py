"""Speculative decoding: the rejection sampler against a transcription of vLLM's kernels, the
exact output distribution by enumeration, greedy identity with plain decoding, the drafters,
the golden cases and the wrong kernels they must fail."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import refimpl
from refimpl import ops
from refimpl.errors import InputError
from refimpl.generate import generate
from refimpl.golden import operator_cases
from refimpl.golden.format import load_case, write_case
from refimpl.io.checkpoint import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR, load_model
from refimpl.speculative import (ModelDrafter, NgramDrafter, SpeculativeStats,
                                 speculative_generate)
from refimpl.tokenizer import Tokenizer

from .conftest import candidate_verdicts, cli, one_line_error


# ---------------------------------------------------------------------- vLLM, transcribed
def vllm_rejection_sample(draft_ids, counts, draft_probs, target_probs, bonus, uniforms,
                          q_noise, greedy):
    """vllm/v1/sample/rejection_sampler.py (rejection_greedy_sample_kernel,
    sample_recovered_tokens_kernel, rejection_random_sample_kernel), line by line in torch."""
    copy = lambda a: None if a is None else np.array(a)  # noqa: E731  (writable for torch)
    draft_probs, uniforms, q_noise = copy(draft_probs), copy(uniforms), copy(q_noise)
    target_probs = torch.as_tensor(copy(target_probs))
    draft_ids = torch.as_tensor(copy(draft_ids))
    cu = torch.cumsum(torch.as_tensor(np.array(counts)), 0)
    B, max_spec_len = len(counts), int(max(counts))
    out = torch.full((B, max_spec_len + 1), -1, dtype=torch.int32)
    if greedy:
        target_argmax = target_probs.argmax(dim=-1)
        for req_idx in range(B):
            start_idx = 0 if req_idx == 0 else int(cu[req_idx - 1])
            num_draft_tokens = int(cu[req_idx]) - start_idx
            rejected = False
            for pos in range(num_draft_tokens):
                if not rejected:
                    draft_token_id = draft_ids[start_idx + pos]
                    target_argmax_id = target_argmax[start_idx + pos]
                    out[req_idx, pos] = target_argmax_id
                    if draft_token_id != target_argmax_id:
                        rejected = True
            if not rejected:
                out[req_idx, num_draft_tokens] = int(bonus[req_idx])
        return out.numpy()
    q = torch.as_tensor(q_noise)
    recovered = torch.empty_like(draft_ids)
    for req_idx in range(B):
        start_idx = 0 if req_idx == 0 else int(cu[req_idx - 1])
        for pos in range(int(cu[req_idx]) - start_idx):
            row = start_idx + pos
            if draft_probs is None:
                prob = target_probs[row].clone()
                prob[draft_ids[row]] = 0
            else:
                prob = torch.clamp(target_probs[row] - torch.as_tensor(draft_probs)[row], min=0)
            recovered[row] = torch.argmax(prob / q[req_idx])
    uniforms = torch.as_tensor(uniforms)
    for req_idx in range(B):
        start_idx = 0 if req_idx == 0 else int(cu[req_idx - 1])
        num_draft_tokens = int(cu[req_idx]) - start_idx
        rejected = False
        for pos in range(num_draft_tokens):
            if not rejected:
                row = start_idx + pos
                draft_token_id = draft_ids[row]
                draft_prob = 1 if draft_probs is None else \
                    torch.as_tensor(draft_probs)[row, draft_token_id]
                target_prob = target_probs[row, draft_token_id]
                uniform_prob = uniforms[row]
                if draft_prob > 0 and target_prob / draft_prob >= uniform_prob:
                    token_id = draft_token_id
                else:
                    rejected = True
                    token_id = recovered[row]
                out[req_idx, pos] = token_id
        if not rejected:
            out[req_idx, num_draft_tokens] = int(bonus[req_idx])
    return out.numpy()


def _random_batch(rng, counts, V, zeros=True):
    N = int(sum(counts))
    logits = rng.standard_normal((N, V)) * 2
    p = ops.sampling_probs(logits, 0.9, 8 if zeros else 0, 0.9 if zeros else 1.0, np.float32)
    q = ops.sampling_probs(logits + rng.standard_normal((N, V)), 0.9, 8 if zeros else 0,
                           0.9 if zeros else 1.0, np.float32)
    drafts = np.array([rng.choice(V, p=row / row.sum()) for row in q.astype(np.float64)],
                      np.int64).reshape(N)
    return (drafts, np.asarray(counts, np.int64), q, p, rng.integers(0, V, len(counts)),
            rng.random(N, dtype=np.float32),
            np.maximum(rng.standard_exponential((len(counts), V), np.float32), 1e-30))


@pytest.mark.parametrize("seed", range(6))
def test_rejection_sample_equals_vllm_transcription(seed):
    rng = np.random.default_rng(seed)
    counts = [int(k) for k in rng.integers(0, 6, 5)]
    drafts, counts, q, p, bonus, u, noise = _random_batch(rng, counts, 50, zeros=seed % 2 == 0)
    for draft_probs in (q, None):                                  # model drafter, n-gram
        ours = ops.rejection_sample(drafts, counts, draft_probs, p, bonus, u, noise)
        theirs = vllm_rejection_sample(drafts, counts, draft_probs, p, bonus, u, noise, False)
        assert np.array_equal(ours["output_token_ids"], theirs)
        n = (theirs[:, :] != -1).sum(1) - 1
        assert np.array_equal(ours["num_accepted"], n)
    greedy = ops.rejection_sample(drafts, counts, None, p, bonus, greedy=True)
    assert np.array_equal(greedy["output_token_ids"],
                          vllm_rejection_sample(drafts, counts, None, p, bonus, u, noise, True))


def test_acceptance_is_p_over_q_at_least_u_in_float32():
    """At u == p / q (float32) the draft is kept; one float32 step above it, rejected."""
    p = np.array([[0.3, 0.7]], np.float32)
    q = np.array([[0.7, 0.3]], np.float32)
    ratio = np.float32(p[0, 0]) / np.float32(q[0, 0])
    noise = np.ones((1, 2), np.float32)
    keep = ops.rejection_sample([0], [1], q, p, [1], np.array([ratio], np.float32), noise)
    drop = ops.rejection_sample([0], [1], q, p, [1],
                                np.array([np.nextafter(ratio, np.float32(1))], np.float32), noise)
    assert keep["output_token_ids"].tolist() == [[0, 1]] and keep["num_accepted"][0] == 1
    assert drop["output_token_ids"].tolist() == [[1, -1]] and drop["num_accepted"][0] == 0
    # q(x) = 0 is a rejection, whatever u (vLLM's guard against a division by zero)
    zero = ops.rejection_sample([0], [1], np.array([[0.0, 1.0]], np.float32), p, [1],
                                np.zeros(1, np.float32), noise)
    assert zero["num_accepted"][0] == 0


def test_recovered_tokens_follow_the_recovery_distribution():
    """argmax r / E with E ~ Exponential(1) draws v with probability r(v) / sum r: 200000
    draws against the exact distribution (chi-square, 1e-6 level, fixed seed)."""
    rng = np.random.default_rng(0)
    p = np.array([0.4, 0.3, 0.2, 0.1, 0.0], np.float64)
    q = np.array([0.1, 0.5, 0.1, 0.2, 0.1], np.float64)
    r = ops.recovery_probs(np.array([1]), q[None], p[None])[0]
    assert np.allclose(r, [0.75, 0.0, 0.25, 0.0, 0.0])
    n = 200_000
    e = rng.standard_exponential((n, 5))
    draws = np.argmax(np.maximum(p - q, 0)[None] / e, axis=1)
    counts = np.bincount(draws, minlength=5)
    assert counts[[1, 3, 4]].sum() == 0
    expected = r * n
    chi2 = sum((counts[i] - expected[i]) ** 2 / expected[i] for i in (0, 2))
    assert chi2 < 23.9                                      # chi-square(1) at 1e-6


def test_rejection_sample_refuses_bad_input():
    p = np.full((2, 4), 0.25, np.float32)
    good = dict(draft_token_ids=[0, 1], num_draft_tokens=[2], draft_probs=p, target_probs=p,
                bonus_token_ids=[3], uniforms=np.zeros(2, np.float32),
                recovery_noise=np.ones((1, 4), np.float32))
    ops.rejection_sample(**good)
    for change, message in ((dict(num_draft_tokens=[3]), "sum to"),
                            (dict(draft_token_ids=[0, 4]), "outside"),
                            (dict(bonus_token_ids=[9]), "bonus_token_ids"),
                            (dict(uniforms=np.ones(2, np.float32)), "uniforms"),
                            (dict(recovery_noise=np.zeros((1, 4), np.float32)), "recovery_noise"),
                            (dict(draft_probs=p[:1]), "draft_probs")):
        with pytest.raises(InputError, match=message):
            ops.rejection_sample(**{**good, **change})


# ---------------------------------------------------------------------- exact distribution
V_SMALL = 12


@pytest.fixture(scope="module")
def small_models():
    """A target and a different draft model over a 12-token vocabulary (random weights)."""
    cfg = refimpl.preset("tiny-dense", vocab_size=V_SMALL, num_hidden_layers=2)
    target = refimpl.Model(cfg, refimpl.random_weights(cfg, seed=0), numerics="fp64")
    draft = refimpl.Model(cfg, refimpl.random_weights(cfg, seed=1), numerics="fp64")
    return target, draft


def _dist_fn(model, T, top_k, top_p):
    memo = {}

    def dist(ctx):
        if ctx not in memo:
            logits = model.forward(np.array(ctx)) * 8      # sharper than random weights give
            memo[ctx] = ops.sampling_probs(logits[-1], T, top_k, top_p, np.float64)
        return memo[ctx]
    return dist


def exact_output_distribution(p_of, q_of, ctx, n, K, ngram=None, recovery=ops.recovery_probs):
    """{tokens: probability} of the next n emitted tokens of speculative decoding, by
    enumerating every draft, acceptance and recovery outcome: a draft d of q is kept with
    probability P(u <= p(d) / q(d)) = min(1, p(d) / q(d)) (u uniform), else the emitted
    token is drawn from `recovery` (the operator's r); all K kept: the bonus from p. ngram:
    a function ctx -> its proposals (q one-hot)."""
    def fresh(ctx, n):
        return {(): 1.0} if n == 0 else step(ctx, n, K, ctx)

    def step(ctx, n, k, start):
        out: dict = {}

        def add(prefix, prob, sub):
            for seq, s in sub.items():
                out[prefix + seq] = out.get(prefix + seq, 0.0) + prob * s

        p = p_of(ctx)
        proposals = ngram(start)[len(ctx) - len(start):] if ngram else None
        if k == 0 or (ngram and not proposals):        # bonus (or an n-gram miss: plain step)
            for v in range(p.size):
                if p[v] > 0:
                    add((v,), p[v], fresh(ctx + (v,), n - 1))
            return out
        if ngram:
            drafts = {proposals[0]: 1.0}
            q = np.zeros(p.size); q[proposals[0]] = 1.0
        else:
            q = q_of(ctx)
            drafts = {d: q[d] for d in range(q.size) if q[d] > 0}
        for d, qd in drafts.items():
            accept = min(1.0, p[d] / qd)
            if accept > 0:
                add((d,), qd * accept, step(ctx + (d,), n - 1, k - 1, start) if n > 1
                    else {(): 1.0})
            if accept < 1:
                r = recovery(np.array([d]), None if ngram else q[None], p[None])[0]
                for v in range(r.size):
                    if r[v] > 0:
                        add((v,), qd * (1 - accept) * r[v], fresh(ctx + (v,), n - 1))
        return out
    return fresh(tuple(ctx), n)


def target_distribution(p_of, ctx, n):
    out = {(): 1.0}
    for _ in range(n):
        out = {seq + (v,): s * pv for seq, s in out.items()
               for v, pv in enumerate(p_of(tuple(ctx) + seq)) if pv > 0}
    return out


@pytest.mark.parametrize("T,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.8)])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_speculative_output_distribution_is_the_targets_exactly(small_models, T, top_k,
                                                                top_p, K):
    """The first token and the first two tokens, enumerated: equal to the target's own
    distribution to float64 rounding, for a model drafter and an n-gram drafter."""
    target, draft = small_models
    p_of, q_of = _dist_fn(target, T, top_k, top_p), _dist_fn(draft, T, top_k, top_p)
    ctx = (1, 5, 7, 5)
    ngram = NgramDrafter(1, 2)
    for n in (1, 2):
        want = target_distribution(p_of, ctx, n)
        for kind in ("model", "ngram"):
            got = exact_output_distribution(p_of, q_of, ctx, n, K,
                                            ngram=(lambda c: _ngram_plan(ngram, c, K))
                                            if kind == "ngram" else None)
            assert set(got) <= set(want)
            err = max(abs(got.get(s, 0.0) - w) for s, w in want.items())
            assert err < 1e-14, (kind, n, err)
            assert abs(sum(got.values()) - 1) < 1e-14


def _ngram_plan(drafter, ctx, K):
    """The n-gram drafter's proposals at the start of an iteration (a fixed list, as the
    loop uses it while verifying)."""
    return [int(t) for t in drafter.propose(list(ctx), K)[0]]


def test_a_biased_recovery_distribution_is_caught(small_models):
    """Recovering from normalise(p) instead of normalise(max(p - q, 0)) still gives fluent
    text, and a wrong distribution: the enumeration sees it."""
    target, draft = small_models
    p_of, q_of = _dist_fn(target, 1.0, 0, 1.0), _dist_fn(draft, 1.0, 0, 1.0)
    ctx = (1, 5, 7, 5)
    biased = lambda d, q, p: p / p.sum(-1, keepdims=True)  # noqa: E731
    got = exact_output_distribution(p_of, q_of, ctx, 1, 2, recovery=biased)
    want = target_distribution(p_of, ctx, 1)
    assert max(abs(got[s] - w) for s, w in want.items()) > 1e-3


def test_sampled_speculative_decoding_on_the_real_path_matches_the_target(small_models):
    """speculative_generate itself (its forwards, cache roll-back, float32 acceptance),
    2400 seeds, first two tokens: against the exact target distribution (chi-square over
    the pairs, 1e-6 level; deterministic seeds)."""
    target, draft = small_models
    fp32 = lambda m: refimpl.Model(m.config, m.weights, numerics="fp32")  # noqa: E731
    t32, d32 = fp32(target), fp32(draft)
    T = 1.0
    ctx = [1, 5, 7, 5]
    p_of = _dist_fn(target, T, 0, 1.0)
    # _dist_fn sharpens the logits x8: the real path gets the same by temperature T / 8
    want = target_distribution(p_of, ctx, 2)
    n_runs = 2400
    counts: dict = {}
    for seed in range(n_runs):
        out = tuple(speculative_generate(t32, ModelDrafter(d32, T / 8), ctx, 2, 2, T / 8,
                                         seed=seed, stop_at_eos=False))
        counts[out] = counts.get(out, 0) + 1
    expected = {s: w * n_runs for s, w in want.items()}
    big = [s for s, e in expected.items() if e >= 5]
    rest_obs = n_runs - sum(counts.get(s, 0) for s in big)
    rest_exp = n_runs - sum(expected[s] for s in big)
    chi2 = sum((counts.get(s, 0) - expected[s]) ** 2 / expected[s] for s in big)
    chi2 += (rest_obs - rest_exp) ** 2 / rest_exp if rest_exp > 0 else 0
    dof = len(big)
    # chi-square at the 1e-6 level: mean dof, sd sqrt(2 dof): dof + 6.5 sd bounds it safely
    assert chi2 < dof + 6.5 * np.sqrt(2 * dof), (chi2, dof)


# ---------------------------------------------------------------------- greedy = plain greedy
@pytest.fixture(scope="module")
def default_tok():
    return Tokenizer.from_dir(DEFAULT_MODEL_DIR)


def _targets(mode, backend="numpy"):
    """(name, target, model drafter) for the dense default model and a MoGE target."""
    dense = load_model(DEFAULT_MODEL_DIR, numerics=mode, backend=backend)
    small = refimpl.preset("tiny-dense", num_hidden_layers=1)
    moge = refimpl.init_model("tiny-moge", seed=0, numerics=mode, backend=backend)
    return [("dense", dense, load_model(DEFAULT_DRAFT_DIR, numerics=mode, backend=backend)),
            ("moge", moge, refimpl.init_model(small, seed=3, numerics=mode, backend=backend))]


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_greedy_speculative_output_is_plain_greedy(mode, default_tok):
    """Stepwise verification (the same numbers as plain decoding): token for token equal to
    `generate`, every K from 1 to 8, both drafters, dense and MoGE targets."""
    for name, target, draft_model in _targets(mode):
        prompt = (default_tok.encode("The json module") if name == "dense"
                  else [1, 17, 30, 17, 30, 99])
        plain = list(generate(target, prompt, 24, stop_at_eos=False))
        for K in range(1, 9):
            for drafter in (NgramDrafter(), ModelDrafter(draft_model)):
                stats = SpeculativeStats()
                got = list(speculative_generate(target, drafter, prompt, K, 24,
                                                stop_at_eos=False, stats=stats,
                                                verify="stepwise"))
                assert got == plain, (name, mode, K, drafter.name)
                assert stats.emitted == 24 and stats.target_forwards <= 24
                assert stats.accepted <= stats.drafted
                assert abs(stats.accepted_per_forward + 1 - stats.tokens_per_forward) < 1e-12


def test_batched_verification_is_plain_greedy_where_the_target_is_batch_invariant(default_tok):
    """One forward over [last] + drafts, as served. The numba bf16 default model gives the
    same logits for a position whatever the number of tokens in its forward (checked here
    first), so its speculative greedy output equals plain greedy for every K and drafter."""
    target = load_model(DEFAULT_MODEL_DIR, numerics="bf16", backend="numba")
    ids = np.array(default_tok.encode("The json module and the os module"))
    c1, c2 = target.new_cache(64), target.new_cache(64)
    target.forward(ids[:4], c1), target.forward(ids[:4], c2)
    chunk = target.forward(ids[4:], c1)
    steps = np.concatenate([target.forward(ids[i:i + 1], c2) for i in range(4, ids.size)])
    assert np.array_equal(chunk.view(np.uint16), steps.view(np.uint16))
    prompt = default_tok.encode("The json module")
    plain = list(generate(target, prompt, 32, stop_at_eos=False))
    draft = load_model(DEFAULT_DRAFT_DIR, numerics="bf16", backend="numba")
    for K in range(1, 9):
        for drafter in (NgramDrafter(), ModelDrafter(draft)):
            assert list(speculative_generate(target, drafter, prompt, K, 32,
                                             stop_at_eos=False)) == plain, (K, drafter.name)


def test_the_cache_rolls_back_to_the_accepted_prefix(default_tok):
    """After each step the target's cache holds exactly the emitted tokens but the last:
    a fresh forward over prompt + output[:-1] gives the same keys."""
    target = load_model(DEFAULT_MODEL_DIR, numerics="fp32")
    prompt = default_tok.encode("Return the")
    cache = target.new_cache(8)
    target.forward(np.array(prompt), cache)
    cache.truncate(2)
    assert cache.length == 2
    with pytest.raises(InputError, match="cannot truncate"):
        cache.truncate(3)
    logits = target.forward(np.array(prompt[2:]), cache)
    assert np.allclose(logits, target.forward(np.array(prompt))[2:], rtol=1e-5, atol=1e-5)


def vllm_ngram(origin_tokens, min_ngram, max_ngram, max_model_len, k):
    """vllm/v1/spec_decode/ngram_proposer.py _find_longest_matched_ngram_and_propose_tokens,
    transcribed (KMP over the reversed tokens)."""
    total_token = origin_tokens.shape[0]
    if total_token < min_ngram:
        return []
    k = min(k, max_model_len - total_token)
    if k <= 0:
        return []
    tokens = origin_tokens[::-1]
    lps = np.zeros(max_ngram, dtype=np.int32)
    longest_ngram = 0
    position = 0
    prev_lps = 0
    i = 1
    while i < total_token:
        if tokens[prev_lps] == tokens[i]:
            prev_lps += 1
            if prev_lps >= longest_ngram:
                longest_ngram = prev_lps
                position = i
            if i < max_ngram:
                lps[i] = prev_lps
            if prev_lps == max_ngram:
                prev_lps = lps[max_ngram - 1]
            i += 1
        elif prev_lps != 0:
            prev_lps = lps[prev_lps - 1]
        else:
            i += 1
    if longest_ngram < min_ngram:
        return []
    start_position = total_token - 1 - position + longest_ngram
    k = min(k, total_token - start_position)
    return [int(t) for t in origin_tokens[start_position:start_position + k]]


@pytest.mark.parametrize("min_n,max_n", [(1, 4), (2, 3), (3, 5)])
def test_ngram_drafter_equals_vllm_prompt_lookup(min_n, max_n):
    rng = np.random.default_rng(min_n * 10 + max_n)
    drafter = NgramDrafter(min_n, max_n)
    for _ in range(400):
        T = int(rng.integers(1, 40))
        ctx = rng.integers(0, int(rng.integers(2, 6)), T)       # few symbols: many repeats
        k = int(rng.integers(1, 8))
        assert drafter.propose(ctx, k)[0] == vllm_ngram(ctx, min_n, max_n, 10_000, k), ctx
    assert NgramDrafter().propose([1, 2, 3, 4, 2, 3], 4)[0] == [4, 2, 3]   # vLLM's docstring


def test_model_drafter_resyncs_its_cache(default_tok):
    """The draft model's proposals depend only on the context it is given, whatever it
    drafted before (its cache rolled back to the common prefix)."""
    d = load_model(DEFAULT_MODEL_DIR, numerics="fp32", layers=2)
    ctx = default_tok.encode("The json module")
    a = ModelDrafter(d)
    a.propose(ctx, 5)
    a.propose(ctx + [7, 9], 3)                 # something else in between
    fresh = ModelDrafter(d).propose(ctx + [11], 4)[0]
    assert a.propose(ctx + [11], 4)[0] == fresh


# ---------------------------------------------------------------------- goldens
@pytest.fixture(scope="module", params=["bf16", "fp64"])
def rejection_cases(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("rs")
    return [write_case(str(d), c) for c in operator_cases("tiny-dense", ["rejection_sample"],
                                                          request.param)]


def _candidate(t, variant, bug=None):
    """An independent rejection sampler on a case's tensors, with an optional bug."""
    d, counts, p = t["draft_token_ids"], t["num_draft_tokens"], t["target_probs"]
    q = t.get("draft_probs")
    B, V = counts.size, p.shape[1]
    greedy = variant == "greedy"
    out = np.full((B, counts.max() + 1), 0 if bug == "pad_zero" else -1, np.int32)
    acc = np.zeros(B, np.int32)
    if greedy:
        best = p.argmax(-1) if bug != "greedy_ties_highest" else \
            V - 1 - p[:, ::-1].argmax(-1)
    else:
        qq = np.eye(V, dtype=p.dtype)[d] if q is None else q
        if bug == "recover_from_p":
            r = p.copy()
        elif bug == "recover_q_minus_p":
            r = np.maximum(qq - p, 0)
        elif bug == "ngram_draft_not_zeroed" and q is None:
            r = p.copy()
        else:
            r = np.maximum(p - qq, 0)
        total = r.sum(-1, keepdims=True)
        probs = np.where(total > 0, r / np.where(total > 0, total, 1), 0)
        if bug == "recovery_unnormalised":
            probs = r
        seq = np.repeat(np.arange(B), counts)
        best = (r / t["recovery_noise"][seq].astype(p.dtype)).argmax(-1)
    start = 0
    for b in range(B):
        K = int(counts[b])
        rejected = False
        for i in range(K):
            row = start + i
            if greedy:
                ok = d[row] == best[row]
            else:
                pq = p[row, d[row]] / qq[row, d[row]] if qq[row, d[row]] > 0 else -1
                u = t["uniforms"][row].astype(p.dtype)
                ok = {"gt_not_ge": pq > u, "accept_q_over_p":
                      qq[row, d[row]] / p[row, d[row]] >= u if p[row, d[row]] > 0 else False
                      }.get(bug, pq >= u)
            if rejected and bug == "continue_after_reject":
                out[b, i] = d[row] if ok else best[row]
                continue
            if not ok:
                out[b, i] = best[row]
                rejected = True
                if bug != "continue_after_reject":
                    break
                continue
            out[b, i] = d[row]
            acc[b] += 1
        if not rejected and bug != "no_bonus" or bug == "bonus_after_reject":
            out[b, min(acc[b] + (1 if rejected else 0), K)] = t["bonus_token_ids"][b]
        start += K
    if bug == "count_includes_emitted":
        acc = acc + 1
    res = {"output_token_ids": out, "num_accepted": acc}
    if not greedy:
        res["recovered_token_ids"] = best.astype(np.int32)
        res["recovery_probs"] = probs.astype(p.dtype)
    return res


BUGS = {"sampled": ("gt_not_ge", "recover_from_p", "recover_q_minus_p", "accept_q_over_p",
                    "no_bonus", "bonus_after_reject", "pad_zero", "count_includes_emitted",
                    "continue_after_reject", "recovery_unnormalised"),
        "ngram": ("gt_not_ge", "ngram_draft_not_zeroed", "no_bonus", "pad_zero",
                  "continue_after_reject", "recovery_unnormalised"),
        "greedy": ("greedy_ties_highest", "no_bonus", "bonus_after_reject", "pad_zero",
                   "count_includes_emitted", "continue_after_reject")}


def test_rejection_sample_goldens_fail_wrong_kernels_and_pass_correct_ones(rejection_cases,
                                                                           tmp_path):
    """The committed rule passes three implementations (the spec, the vLLM transcription in
    torch, an independent loop); every bug fails its variant in every mode, except `>` for
    `>=` in fp64 (no float32 uniform equals a float64 p / q: the boundary is a float32 test)."""
    n = 0
    for case_dir in rejection_cases:
        case = load_case(case_dir)
        t = {name: case.tensors[name] for name in case.tensors}
        variant = next(v for v in BUGS if f"-{v}-" in os.path.basename(case_dir))
        greedy = variant == "greedy"
        q = t.get("draft_probs")
        spec = ops.rejection_sample(t["draft_token_ids"], t["num_draft_tokens"], q,
                                    t["target_probs"], t["bonus_token_ids"], t.get("uniforms"),
                                    t.get("recovery_noise"), greedy=greedy)
        vllm = vllm_rejection_sample(t["draft_token_ids"], t["num_draft_tokens"], q,
                                     t["target_probs"], t["bonus_token_ids"], t.get("uniforms"),
                                     t.get("recovery_noise"), greedy)
        theirs = {"output_token_ids": vllm, "num_accepted": (vllm != -1).sum(1) - 1}
        if not greedy:
            theirs["recovered_token_ids"] = spec["recovered_token_ids"]
            theirs["recovery_probs"] = spec["recovery_probs"].astype(np.float64).astype(
                t["target_probs"].dtype)
        for arrays in (spec, theirs, _candidate(t, variant)):
            n += 1
            got = candidate_verdicts(case_dir, tmp_path / f"ok{n}", {k: arrays[k] for k in spec})
            assert set(got.values()) == {"pass"}, (case_dir, got)
        fp64 = t["target_probs"].dtype == np.float64
        for bug in BUGS[variant]:
            if bug == "gt_not_ge" and fp64:
                continue
            n += 1
            got = candidate_verdicts(case_dir, tmp_path / f"bug{n}", _candidate(t, variant, bug))
            assert "fail" in got.values(), (case_dir, bug, got)


# ---------------------------------------------------------------------- the command line
@pytest.mark.parametrize("draft", ["ngram", "default-draft"])
def test_run_speculates_out_of_the_box(draft):
    plain = cli("run", "--max-new-tokens", "20")
    spec = cli("run", "--draft", draft, "--speculate", "4", "--max-new-tokens", "20",
               "--compare-plain")
    assert spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout                    # greedy: the same text
    stats = [ln for ln in spec.stderr.splitlines() if ln.startswith("[speculative:")]
    assert len(stats) == 1 and "acceptance" in stats[0] and "tokens per target forward" in \
        stats[0]
    assert any("plain decoding" in ln and "same tokens" in ln for ln in spec.stderr.splitlines())


def test_the_shipped_draft_model_shares_the_default_tokenizer():
    from refimpl.io.checkpoint import DEFAULT_DRAFT_DIR
    with open(os.path.join(DEFAULT_DRAFT_DIR, "tokenizer.model"), "rb") as a, \
            open(os.path.join(DEFAULT_MODEL_DIR, "tokenizer.model"), "rb") as b:
        assert a.read() == b.read()
    draft, target = load_model(DEFAULT_DRAFT_DIR), load_model(DEFAULT_MODEL_DIR)
    assert draft.config.vocab_size == target.config.vocab_size
    n = lambda m: sum(int(np.prod(w.shape)) for w in m.weights.values())  # noqa: E731
    assert n(draft) < n(target) / 4


def test_run_speculative_bad_options(tmp_path):
    assert "needs a drafter" in one_line_error(cli("run", "--speculate", "3"))
    assert "at least 1" in one_line_error(cli("run", "--draft", "ngram", "--speculate", "0"))
    line = one_line_error(cli("run", "--draft", "nonexistent"))
    assert "--draft 'nonexistent' is neither" in line
    assert "needs --draft" in one_line_error(cli("run", "--compare-plain"))
    assert "larger than the target" in one_line_error(
        cli("run", "--model", "tiny-dense", "--draft", "default-draft", "--token-ids", "1,2"))
    p = cli("run", "--draft", "ngram", "--ngram", "x")
    assert p.returncode == 2 and "MIN,MAX" in p.stderr
    assert "min_n <= max_n" in one_line_error(cli("run", "--draft", "ngram", "--ngram", "3,2"))
