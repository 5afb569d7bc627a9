"""The speculative-decoding rejection sampler (DEPLOYMENT.md section 5), as vLLM's serves it.

One call verifies a batch of sequences, sequence b with K_b >= 0 draft tokens (flattened:
draft i of sequence b is row cu[b-1] + i of the [N, V] probability tables, cu the cumulative
counts). Per sequence, left to right over its drafts x_i:

  greedy    accept while x_i == argmax p_i (lowest id on ties); at the first mismatch emit
            argmax p_i and stop
  sampled   accept when q_i(x_i) > 0 and p_i(x_i) / q_i(x_i) >= u_i (u_i uniform in [0, 1),
            given), i.e. with probability min(1, p / q); on the first rejection emit the
            recovered token and stop:
                recovered_i = argmax_v  r_i(v) / E_b(v),   r_i = max(p_i - q_i, 0)
            with E_b ~ Exponential(1) per sequence and vocabulary entry (given): the
            exponential race, which draws v with probability r_i(v) / sum r_i (vLLM's
            sample_recovered_tokens). An n-gram drafter has no q: q_i is the one-hot of x_i,
            so acceptance is p_i(x_i) >= u_i and r_i is p_i with x_i's entry set to 0.
  all accepted: emit the bonus token (sampled from p_K by the caller's sampler).

This is vLLM v1's rejection_sample (vllm/v1/sample/rejection_sampler.py:
rejection_greedy_sample_kernel, rejection_random_sample_kernel,
sample_recovered_tokens_kernel) written out per sequence, with its conventions: outputs
[B, max_K + 1] int32 padded with -1, the ratio test `p / q >= u` in the probabilities' dtype
(float32 there), ties of the argmaxes to the lowest id. The output distribution equals p's
exactly (Leviathan et al. 2023; tests/test_speculative.py enumerates it).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

#: the padding of output_token_ids (vLLM's PLACEHOLDER_TOKEN_ID)
PLACEHOLDER = -1


def _check(draft_token_ids, num_draft_tokens, draft_probs, target_probs, bonus_token_ids,
           uniforms, recovery_noise, greedy):
    d = np.asarray(draft_token_ids)
    n = np.asarray(num_draft_tokens)
    p = np.asarray(target_probs)
    if d.ndim != 1 or n.ndim != 1 or d.dtype.kind not in "iu" or n.dtype.kind not in "iu":
        raise InputError("rejection_sample: draft_token_ids [N] and num_draft_tokens [B] must "
                         "be 1-D integer arrays")
    if (n < 0).any() or int(n.sum()) != d.size:
        raise InputError(f"rejection_sample: num_draft_tokens must be >= 0 and sum to the "
                         f"{d.size} draft tokens, got {n.tolist()}")
    if p.ndim != 2 or p.shape[0] != d.size:
        raise InputError(f"rejection_sample: target_probs must be [N={d.size}, V], got "
                         f"{list(p.shape)}")
    V = p.shape[1]
    if d.size and (d.min() < 0 or d.max() >= V):
        raise InputError(f"rejection_sample: a draft token id is outside [0, {V})")
    b = np.asarray(bonus_token_ids)
    if b.shape != n.shape or b.dtype.kind not in "iu" or (b.size and (b.min() < 0 or b.max() >= V)):
        raise InputError(f"rejection_sample: bonus_token_ids must be [B={n.size}] ids in "
                         f"[0, {V})")
    if greedy:
        return
    if draft_probs is not None and np.shape(draft_probs) != p.shape:
        raise InputError(f"rejection_sample: draft_probs must be None (n-gram) or "
                         f"{list(p.shape)}, got {list(np.shape(draft_probs))}")
    u = np.asarray(uniforms)
    if u.shape != d.shape or (u.size and (u.min() < 0 or u.max() >= 1)):
        raise InputError(f"rejection_sample: uniforms must be [N={d.size}] in [0, 1)")
    e = np.asarray(recovery_noise)
    if e.shape != (n.size, V) or (e.size and not (e > 0).all()):
        raise InputError(f"rejection_sample: recovery_noise must be [B={n.size}, V={V}] "
                         "positive (Exponential(1) draws)")


def recovery_probs(draft_token_ids, draft_probs, target_probs) -> np.ndarray:
    """r = normalise(max(p - q, 0)) for every draft row (n-gram: q = one-hot of the draft
    token); a row with nothing left (p <= q everywhere, so the draft is always accepted)
    is all zeros. Computed in the probabilities' dtype. # [N], [N, V], [N, V] -> [N, V]"""
    p = np.asarray(target_probs)
    d = np.asarray(draft_token_ids)
    if draft_probs is None:
        r = p.copy()
        r[np.arange(d.size), d] = 0
    else:
        r = np.maximum(p - np.asarray(draft_probs, dtype=p.dtype), 0)
    total = r.sum(-1, keepdims=True)
    return np.where(total > 0, r / np.where(total > 0, total, 1), 0).astype(p.dtype)


def rejection_sample(draft_token_ids, num_draft_tokens, draft_probs, target_probs,
                     bonus_token_ids, uniforms=None, recovery_noise=None,
                     greedy: bool = False) -> dict:
    """Verify draft tokens against the target (see the module docstring for the rule).

    # draft_token_ids int [N], num_draft_tokens int [B] (K_b, any >= 0, sum N),
    # draft_probs [N, V] or None (n-gram), target_probs [N, V] (for greedy: any scores whose
    # argmax is the target's choice), bonus_token_ids int [B], uniforms [N] in [0, 1),
    # recovery_noise [B, V] > 0
    -> {"output_token_ids": int32 [B, max_K + 1] (-1 padded), "num_accepted": int32 [B],
        "recovered_token_ids": int32 [N] (sampled only: the token each row would emit on
        rejection), "recovery_probs": [N, V] (sampled only: the distribution it is drawn from)}
    """
    _check(draft_token_ids, num_draft_tokens, draft_probs, target_probs, bonus_token_ids,
           uniforms, recovery_noise, greedy)
    d = np.asarray(draft_token_ids).astype(np.int64)
    counts = np.asarray(num_draft_tokens).astype(np.int64)
    p = np.asarray(target_probs)
    bonus = np.asarray(bonus_token_ids).astype(np.int64)
    B, N = counts.size, d.size
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    max_k = int(counts.max()) if B else 0
    out = np.full((B, max_k + 1), PLACEHOLDER, np.int32)
    accepted = np.zeros(B, np.int32)
    result = {"output_token_ids": out, "num_accepted": accepted}
    if greedy:
        choice = p.argmax(-1) if N else np.zeros(0, np.int64)        # [N], lowest id on ties
    else:
        r = recovery_probs(d, draft_probs, p)                          # [N, V]
        e = np.asarray(recovery_noise)
        seq_of_row = np.repeat(np.arange(B), counts)                   # [N]
        choice = (r / e[seq_of_row].astype(p.dtype)).argmax(-1) if N else np.zeros(0, np.int64)
        result["recovered_token_ids"] = choice.astype(np.int32)
        result["recovery_probs"] = r
        u = np.asarray(uniforms).astype(p.dtype)
        q_of_draft = (np.ones(N, p.dtype) if draft_probs is None
                      else np.asarray(draft_probs, p.dtype)[np.arange(N), d])
        p_of_draft = p[np.arange(N), d]
    for b in range(B):
        k0, K = int(starts[b]), int(counts[b])
        for i in range(K):
            row = k0 + i
            if greedy:
                ok = d[row] == choice[row]
            else:
                ok = q_of_draft[row] > 0 and p_of_draft[row] / q_of_draft[row] >= u[row]
            if not ok:
                out[b, i] = choice[row]                  # target argmax or recovered token
                break
            out[b, i] = d[row]
            accepted[b] += 1
        else:
            out[b, K] = bonus[b]
    return result


__all__ = ["PLACEHOLDER", "rejection_sample", "recovery_probs"]
