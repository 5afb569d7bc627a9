"""Golden cases of the speculative-decoding rejection sampler (`refimpl.ops.rejection_sample`).

Variants, each a batch of 4 sequences with 0, 1, 3 and 5 draft tokens over the preset's
vocabulary (the flattened layout of vLLM's RejectionSampler: row cu[b-1] + i is draft i of
sequence b):

    sampled   a draft model's q and the target's p (`ops.sampling_probs` of seeded logits at
              temperature 0.8, top-k 64, top-p 0.95, as both are processed), drafts drawn from q
    ngram     an n-gram drafter: no draft_probs (q one-hot), drafts picked by hand
    greedy    target scores only (vLLM passes the logits), argmax acceptance

The uniforms are set so that every outcome occurs: a sequence with no drafts (bonus only),
one with all drafts accepted (bonus appended), rejections at the first and at a middle
position, and one uniform exactly equal to p / q in float32 (accepted: the test is
`p / q >= u`; a kernel using `>` rejects it). The recovery noise (Exponential(1) per sequence
and vocabulary entry) is drawn so that in every row the largest r / E exceeds the second by
more than RECOVERY_MARGIN, so the recovered token is not a near-tie of the probabilities'
rounding. Greedy has an exact tie of the top two logits in one row (lowest id wins).
"""

from __future__ import annotations

import numpy as np

from .. import ops
from ..numerics import accum_dtype
from ..random_init import tensor_rng
from .format import Case

#: draft tokens of the four sequences of a case
DRAFT_COUNTS = (0, 1, 3, 5)
#: the sampling parameters applied to p and q in the sampled cases
TEMPERATURE, TOP_K, TOP_P = 0.8, 64, 0.95
#: relative gap between the best and second-best r / E of every row
RECOVERY_MARGIN = 1e-3
_WHY_EXACT = ("integers: every input is given and the rule is a comparison per draft token "
              "(p / q >= u in the probabilities' dtype) and an argmax (lowest id on ties)")
#: recovery_probs: normalise(max(p - q, 0)) over the vocabulary, a float sum of V terms
RECOVERY_TOL = {"float32": {"rtol": 1e-4, "atol": 0.0}, "float64": {"rtol": 1e-10, "atol": 0.0}}


def _probs(ctx, tag: str, rows: int, V: int, noise_of=None):
    """Seeded logits [rows, V] (float32) and their sampling distribution."""
    rng = tensor_rng(ctx.seed, f"golden.rejection_sample.{tag}")
    logits = (rng.standard_normal((rows, V)) * 1.5).astype(np.float32)
    if noise_of is not None:                 # the draft model: the target's logits, perturbed
        logits = (noise_of + rng.standard_normal((rows, V)) * 1.0).astype(np.float32)
    pd = accum_dtype(ctx.dtype)
    return logits, ops.sampling_probs(logits, TEMPERATURE, TOP_K, TOP_P, pd)


def _recovery_noise(ctx, tag: str, r: np.ndarray, counts) -> np.ndarray:
    """Exponential(1) [B, V] float32 whose argmax r / E has a margin in every row."""
    rng = tensor_rng(ctx.seed, f"golden.rejection_sample.{tag}.noise")
    B, V = len(counts), r.shape[1]
    e = np.empty((B, V), np.float32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for b in range(B):
        rows = r[starts[b]:starts[b] + counts[b]]
        for _ in range(1000):
            e[b] = np.maximum(rng.standard_exponential(V, dtype=np.float32),
                              np.finfo(np.float32).tiny)
            ok = True
            for row in rows:
                if not row.any():
                    continue
                ratio = np.sort((row / e[b].astype(row.dtype)).astype(np.float64))[-2:]
                ok &= ratio[1] > ratio[0] * (1 + RECOVERY_MARGIN)
            if ok:
                break
        else:
            raise RuntimeError("no recovery noise with a margin")
    return e


def _pick(rng, p_row, q_row, want: str) -> int:
    """A draft token: 'accept' (p > 0), 'reject' (p / q < 0.9, q > 0), 'boundary' (p < q)."""
    if want == "accept":
        cand = np.flatnonzero((p_row > 0) & (q_row > 0))
    elif want == "reject":
        cand = np.flatnonzero((q_row > 0) & (p_row < 0.9 * q_row))
    else:
        cand = np.flatnonzero((p_row > 0) & (q_row * 0.99 > p_row))      # p / q < 1
    w = q_row[cand].astype(np.float64)
    return int(cand[rng.choice(cand.size, p=w / w.sum())])


#: per sequence, what each draft position is made to do
_PLAN = ((), ("accept",), ("accept", "reject", "accept"),
         ("accept", "accept", "accept", "boundary", "reject"))


def _sampled_or_ngram(ctx, variant: str) -> Case:
    V = ctx.config.vocab_size
    counts = np.array(DRAFT_COUNTS, np.int64)
    N, B = int(counts.sum()), counts.size
    rng = tensor_rng(ctx.seed, f"golden.rejection_sample.{variant}.plan")
    t_logits, p = _probs(ctx, f"{variant}.target", N, V)
    ngram = variant == "ngram"
    if ngram:
        q = None
    else:
        _, q = _probs(ctx, f"{variant}.draft", N, V, noise_of=t_logits)
    pd = p.dtype
    drafts = np.zeros(N, np.int64)
    uniforms = np.zeros(N, np.float32)
    boundary_row = None
    row = 0
    for plan in _PLAN:
        for want in plan:
            q_row = np.eye(1, V, 0, dtype=pd)[0] if ngram else q[row]
            if ngram:            # one-hot q: accept needs p > 0, a rejection p < 1
                pr = p[row]
                cand = {"accept": pr > 0, "reject": pr < 0.5, "boundary": (pr > 0) & (pr < 1)}[want]
                if not cand.any():
                    raise RuntimeError(f"rejection_sample golden: no n-gram draft to {want}")
                ids = np.flatnonzero(cand)
                drafts[row] = int(ids[np.argmax(pr[ids])] if want != "reject" else ids[0])
                q_of = pd.type(1)
            else:
                drafts[row] = _pick(rng, p[row], q_row, want)
                q_of = q[row, drafts[row]]
            ratio = p[row, drafts[row]] / q_of                 # in the probabilities' dtype
            ratio32 = np.float32(ratio)
            if want == "accept":
                uniforms[row] = np.float32(min(float(ratio), 1.0) * 0.5)
            elif want == "reject":
                uniforms[row] = np.float32((float(ratio) + 1.0) / 2)
            elif pd == np.float32:                              # u == p / q exactly
                uniforms[row] = ratio32
                boundary_row = row
                assert ratio32 == ratio and 0 < ratio32 < 1
            else:            # float64 p / q is not a float32 uniform: just below it
                uniforms[row] = ratio32 if ratio32 <= ratio else np.nextafter(
                    ratio32, np.float32(0))
            row += 1
    bonus = rng.integers(0, V, B).astype(np.int64)       # the caller's draw from p_K
    r = ops.recovery_probs(drafts, q, p)
    noise = _recovery_noise(ctx, variant, r, counts)
    res = ops.rejection_sample(drafts, counts, q, p, bonus, uniforms, noise)
    desc = ("speculative-decoding rejection sampler (vLLM v1 RejectionSampler, random "
            "requests): accept draft x when q(x) > 0 and p(x) / q(x) >= u, else emit the "
            "recovered token argmax(max(p - q, 0) / E) and stop; all accepted: the bonus token"
            + ("; n-gram drafter: no draft_probs (q one-hot)" if ngram else ""))
    case = ctx.case("rejection_sample", variant, desc, _params(ctx, variant, counts, V, pd,
                                                               boundary_row),
                    ["rejection_sample"], {"default": "exact", "why": _WHY_EXACT})
    case.add("draft_token_ids", drafts, "input")
    case.add("num_draft_tokens", counts, "input")
    if not ngram:
        case.add("draft_probs", q, "input")
    case.add("target_probs", p, "input")
    case.add("bonus_token_ids", bonus, "input")
    case.add("uniforms", uniforms, "input")
    case.add("recovery_noise", noise, "input")
    _outputs(case, res, pd, sampled=True)
    return case


def _greedy(ctx) -> Case:
    V = ctx.config.vocab_size
    counts = np.array(DRAFT_COUNTS, np.int64)
    N, B = int(counts.sum()), counts.size
    rng = tensor_rng(ctx.seed, "golden.rejection_sample.greedy")
    scores = (rng.standard_normal((N, V)) * 3.0).astype(accum_dtype(ctx.dtype))
    tie_row = N - 1                      # the last draft of the last sequence: a tie
    top = np.argsort(-scores[tie_row], kind="stable")[:2]
    lo_id, hi_id = int(min(top)), int(max(top))
    scores[tie_row, hi_id] = scores[tie_row, lo_id] = scores[tie_row].max()
    argmax = scores.argmax(-1)
    drafts = argmax.copy()
    reject_row = 2                       # sequence 2's second draft: a mismatch
    drafts[reject_row] = (argmax[reject_row] + 1 + rng.integers(V - 1)) % V
    drafts[tie_row] = hi_id              # equal score, higher id: not the argmax (rejected)
    bonus = rng.integers(0, V, B).astype(np.int64)
    res = ops.rejection_sample(drafts, counts, None, scores, bonus, greedy=True)
    case = ctx.case("rejection_sample", "greedy",
                    "speculative-decoding rejection sampler, greedy requests (vLLM v1 "
                    "rejection_greedy_sample_kernel): accept while the draft equals the "
                    "target's argmax (lowest id on ties); at the first mismatch emit the argmax;"
                    " all accepted: the bonus token",
                    {**_params(ctx, "greedy", counts, V, scores.dtype, None),
                     "tie": f"row {tie_row}: ids {lo_id} and {hi_id} share the top score; the "
                            f"draft is {hi_id}, the argmax {lo_id}"},
                    ["rejection_sample"], {"default": "exact", "why": _WHY_EXACT})
    case.add("draft_token_ids", drafts, "input")
    case.add("num_draft_tokens", counts, "input")
    case.add("target_probs", scores, "input",
             note="the target's scores (vLLM passes the logits for greedy requests)")
    case.add("bonus_token_ids", bonus, "input")
    _outputs(case, res, scores.dtype, sampled=False)
    return case


def _params(ctx, variant, counts, V, pd, boundary_row) -> dict:
    N, B = int(np.sum(counts)), len(counts)
    out = {"batch": B, "num_draft_tokens": [int(c) for c in counts], "vocab_size": V,
           "probability_dtype": np.dtype(pd).name,
           "layout": f"draft_token_ids [{N}] int64 (flattened: row cu[b-1] + i is draft i of "
                     f"sequence b); num_draft_tokens [{B}]; draft_probs, target_probs [{N}, "
                     f"{V}]; bonus_token_ids [{B}]; uniforms [{N}] float32 in [0, 1); "
                     f"recovery_noise [{B}, {V}] float32 Exponential(1); output_token_ids "
                     f"[{B}, {max(counts) + 1}] int32 padded with -1",
           "formula": "per sequence, left to right: accept x_i iff q_i(x_i) > 0 and "
                      "p_i(x_i) / q_i(x_i) >= u_i (computed in the probabilities' dtype); at "
                      "the first rejection emit recovered_i = argmax_v r_i(v) / E_b(v), "
                      "r_i = max(p_i - q_i, 0) (lowest id on ties) and stop; if all K_b are "
                      "accepted append bonus_b. num_accepted_b = accepted drafts; "
                      "recovery_probs_i = r_i / sum r_i (0 where r_i is all 0)"}
    if variant == "sampled":
        out["sampling"] = (f"p and q: ops.sampling_probs(logits, temperature={TEMPERATURE}, "
                           f"top_k={TOP_K}, top_p={TOP_P}) of seeded logits (q: the target's "
                           "logits plus N(0, 1) noise)")
    if variant == "ngram":
        out["formula"] += "; n-gram: q_i is the one-hot of x_i (accept iff p_i(x_i) >= u_i, " \
                          "r_i = p_i with x_i set to 0)"
    if variant == "greedy":
        out["formula"] = ("per sequence: accept x_i while x_i == argmax target_probs_i "
                          "(lowest id on ties); at the first mismatch emit that argmax and "
                          "stop; if all are accepted append bonus_b")
    if boundary_row is not None:
        out["boundary"] = (f"uniforms[{boundary_row}] == p / q of its draft exactly "
                           "(float32): accepted, since the test is >=")
    return out


def _outputs(case, res, pd, sampled: bool) -> None:
    args = ["draft_token_ids", "num_draft_tokens"] + (["draft_probs"] if sampled else []) + \
        ["target_probs", "bonus_token_ids"] + (["uniforms", "recovery_noise"] if sampled else [])
    produced = {"op": "rejection_sample", "args": args}
    case.add("output_token_ids", res["output_token_ids"], "output", produced_by=produced)
    case.add("num_accepted", res["num_accepted"], "output", produced_by=produced)
    if sampled:
        case.add("recovered_token_ids", res["recovered_token_ids"], "output",
                 produced_by=produced, note="the token each row would emit if it were the "
                                            "first rejection (argmax r / E)")
        case.add("recovery_probs", res["recovery_probs"], "output", produced_by=produced,
                 tolerance=RECOVERY_TOL[np.dtype(pd).name],
                 note="normalise(max(p - q, 0)): a sum over the vocabulary, so allclose with "
                      "a relative tolerance for its summation order")


def _rejection_sample_cases(ctx) -> list:
    return [_sampled_or_ngram(ctx, "sampled"), _sampled_or_ngram(ctx, "ngram"), _greedy(ctx)]


SPECULATIVE_OPERATORS = ("rejection_sample",)
BUILDERS = {"rejection_sample": _rejection_sample_cases}
