"""Speculative decoding: a drafter proposes K tokens, the target scores them in one forward,
`refimpl.ops.rejection_sample` keeps a prefix (DEPLOYMENT.md section 5).

    for tok in speculative_generate(target, NgramDrafter(), prompt_ids, num_speculative_tokens=4):
        ...

The loop, as vLLM runs it for one sequence:

    the target's cache holds every token but the last emitted one, `last`
    drafts  = drafter.propose(context, k)              k <= K (an n-gram drafter may find none)
    logits  = target.forward([last] + drafts)          one forward, k + 1 rows: p_0 .. p_k
    keep    = rejection_sample(drafts, p_0..p_{k-1}, bonus ~ p_k)   n accepted, plus one token
    cache.truncate(to the accepted prefix); emit drafts[:n] and the extra token; last = it

so each target forward emits between 1 and k + 1 tokens. Greedy (temperature 0): a draft is
kept while it equals the target's argmax, so the output is token for token the target's plain
greedy output. Sampled: p and q are `ops.sampling_probs` of the target's and the draft
model's logits with the same temperature, top-k and top-p (vLLM applies them to the target's
logits in compute_probs; the draft model here samples its token from q processed the same
way); the output is distributed exactly as the target's sampler. Randomness comes from one
seeded generator, drawn in a fixed order per step: the drafter's draws, the bonus token,
the K uniforms (float32), the recovery noise (Exponential(1), float32, one per vocabulary
entry).

Drafters: `ModelDrafter` (a smaller model sharing the target's tokenizer; its own KV cache,
rolled back to the accepted prefix) and `NgramDrafter` (prompt lookup: the tokens that
followed the earliest occurrence of the longest n-gram ending the context; q is one-hot).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .ops import rejection_sample, sample, sampling_probs


#: how the target scores [last] + drafts: one forward, or one forward per token
VERIFY_MODES = ("batched", "stepwise")


# ---------------------------------------------------------------------- drafters
class NgramDrafter:
    """Prompt lookup, as vLLM's NgramProposer: find the longest n-gram (min_n <= n <= max_n)
    that ends the context and occurs earlier in it, take its earliest occurrence, and propose
    the (up to) k tokens that followed it. No model, no probabilities (q is one-hot)."""

    name = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise InputError(f"n-gram drafter: need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, context, k: int, rng=None):
        """(draft ids [<= k], None). # context: the sequence so far."""
        ctx = np.asarray(context, np.int64)
        T = ctx.size
        for n in range(min(self.max_n, T - 1), self.min_n - 1, -1):
            suffix = ctx[T - n:]
            for j in range(0, T - n):                    # earliest first; ends before T - 1
                if np.array_equal(ctx[j:j + n], suffix):
                    return [int(t) for t in ctx[j + n:j + n + k]], None
        return [], None


class ModelDrafter:
    """A draft model sharing the target's tokenizer (vocabulary at most the target's). It
    proposes k tokens one forward at a time from its own KV cache, which it rolls back to the
    longest prefix it shares with the context it is given next; q_i = `sampling_probs` of its
    logits with the target's temperature / top-k / top-p, and the draft token is drawn from
    q_i (greedy: its argmax)."""

    name = "model"

    def __init__(self, model, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 prob_dtype=np.float32, vocab_size: int | None = None):
        self.model = model
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.prob_dtype = np.dtype(prob_dtype)
        self.vocab_size = vocab_size or model.config.vocab_size
        if model.config.vocab_size > self.vocab_size:
            raise InputError(f"draft model: its vocabulary ({model.config.vocab_size}) is "
                             f"larger than the target's ({self.vocab_size})")
        self.cache = None
        self.cached: list = []          # the token ids in self.cache, in order
        self._next_logits = None        # logits after self.cached (None: not computed)

    def _sync(self, context: list) -> np.ndarray:
        """Make the cache hold context[:-1] + context[-1] and return the logits after it."""
        if self.cache is None:
            self.cache = self.model.new_cache(capacity=len(context) + 64)
        common = 0
        for a, b in zip(self.cached, context):
            if a != b:
                break
            common += 1
        if common == len(context) and common == len(self.cached) and \
                self._next_logits is not None:
            return self._next_logits
        common = min(common, len(context) - 1)          # re-run at least the last token
        self.cache.truncate(common)
        self.cached = list(context[:common])
        return self._feed(context[common:])

    def _feed(self, ids) -> np.ndarray:
        logits = self.model.forward(np.asarray(ids, np.int64), self.cache, last_only=True)
        self.cached.extend(int(t) for t in ids)
        self._next_logits = logits[-1]
        return self._next_logits

    def propose(self, context, k: int, rng=None):
        """(draft ids [k], q [k, V] in prob_dtype, V the target's vocabulary)."""
        context = [int(t) for t in context]
        logits = self._sync(context)
        ids, probs = [], np.zeros((k, self.vocab_size), self.prob_dtype)
        V = self.model.config.vocab_size
        for i in range(k):
            q = sampling_probs(logits, self.temperature, self.top_k, self.top_p, np.float64)
            if self.temperature == 0.0:
                tok = int(np.argmax(q))
            else:
                tok = sample(logits, self.temperature, self.top_k, self.top_p, rng)
            probs[i, :V] = q.astype(self.prob_dtype)
            ids.append(tok)
            if i + 1 < k:
                logits = self._feed([tok])
        return ids, probs


# ---------------------------------------------------------------------- the loop
@dataclass
class SpeculativeStats:
    """What the user sees: target forwards, tokens drafted / accepted / emitted."""
    target_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    accepted_per_step: list = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (1.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 1.0

    @property
    def accepted_per_forward(self) -> float:
        """Mean draft tokens accepted per target forward (tokens_per_forward - 1)."""
        return self.accepted / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens emitted per target forward (1 = no gain, K + 1 = every draft kept)."""
        return self.emitted / self.target_forwards if self.target_forwards else 0.0


def speculative_generate(target, drafter, prompt_ids, num_speculative_tokens: int = 4,
                         max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, seed: int = 0, eos_id=None,
                         stop_at_eos: bool = True, stats: SpeculativeStats | None = None,
                         prob_dtype=np.float32, verify: str = "batched"):
    """Yield new token ids one at a time, like `refimpl.generate`, drafting
    num_speculative_tokens (K >= 1) per target forward (see the module docstring).

    Sampled output has the target sampler's distribution. Greedy output equals
    `generate`'s token for token when the target's logits of a position do not depend on how
    many tokens its forward carries. verify="batched" (default) scores [last] + drafts in one
    forward, as serving does; its numerics are the target's at k + 1 rows (BLAS picks its
    kernel by shape, so the last bits can differ from a one-token decode and flip a greedy
    near-tie). verify="stepwise" scores them in k + 1 one-token forwards: the same numbers as
    plain decoding, so greedy output is identical on every backend and mode.
    `stats` (a SpeculativeStats) is filled in as it runs. prob_dtype: the probabilities'
    dtype in the acceptance test (float32, as vLLM)."""
    K = int(num_speculative_tokens)
    if K < 1:
        raise InputError(f"--speculate: the number of draft tokens must be at least 1, got {K}")
    if verify not in VERIFY_MODES:
        raise InputError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    c = target.config
    if target.kv_cache_type == "C8":
        raise InputError("speculative decoding verifies several tokens after cached ones, "
                         "which the C8 (int8) KV cache does not implement")
    prompt = [int(t) for t in target.check_token_ids(prompt_ids)]
    if isinstance(drafter, ModelDrafter):
        drafter.model.check_token_ids(prompt_ids)
    eos_ids = (set(c.eos_token_ids) if eos_id is None else
               set(eos_id) if isinstance(eos_id, (list, tuple, set)) else {eos_id})
    stats = stats if stats is not None else SpeculativeStats()
    rng = np.random.default_rng(seed)
    greedy = temperature == 0.0
    cache = target.new_cache(capacity=len(prompt) + max_new_tokens + K + 1)
    if len(prompt) > 1:
        target.forward(np.asarray(prompt[:-1]), cache, last_only=True)
    context, last, emitted = list(prompt), prompt[-1], 0
    while emitted < max_new_tokens:
        room = c.max_position_embeddings - cache.length - 1     # positions after `last`
        k = max(0, min(K, max_new_tokens - emitted - 1, room))
        drafts, q = drafter.propose(context, k, rng) if k else ([], None)
        drafts = [int(t) for t in drafts][:k]
        k = len(drafts)
        base = cache.length
        if verify == "batched":
            logits = target.forward(np.asarray([last] + drafts), cache)      # [k + 1, V]
        else:
            logits = np.concatenate([target.forward(np.asarray([t]), cache)
                                     for t in [last] + drafts])              # [k + 1, V]
        stats.target_forwards += 1
        if greedy:
            bonus = int(np.argmax(logits[k].astype(np.float64)))
            result = rejection_sample(np.asarray(drafts, np.int64), [k], None,
                                      logits[:k].astype(np.float64), [bonus], greedy=True)
        else:
            p = sampling_probs(logits, temperature, top_k, top_p, prob_dtype)  # [k + 1, V]
            bonus = sample(logits[k], temperature, top_k, top_p, rng)
            uniforms = rng.random(k, dtype=np.float32)
            noise = np.maximum(rng.standard_exponential((1, logits.shape[1]), np.float32),
                               np.finfo(np.float32).tiny)
            result = rejection_sample(np.asarray(drafts, np.int64), [k],
                                      None if q is None else q[:k], p[:k], [bonus], uniforms,
                                      noise)
        n = int(result["num_accepted"][0])
        out = [int(t) for t in result["output_token_ids"][0, :n + 1]]
        cache.truncate(base + 1 + n)                   # `last` and the accepted drafts
        stats.drafted += k
        stats.accepted += n
        stats.accepted_per_step.append(n)
        for token in out:
            yield token
            emitted += 1
            stats.emitted += 1
            context.append(token)
            if (stop_at_eos and token in eos_ids) or emitted == max_new_tokens:
                return
        last = out[-1]


__all__ = ["NgramDrafter", "ModelDrafter", "SpeculativeStats", "speculative_generate"]
