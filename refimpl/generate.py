"""Autoregressive generation on top of Model.forward with a KV cache."""

from __future__ import annotations

import numpy as np

from .ops import sample


def generate(model, prompt_ids, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id=None,
             stop_at_eos: bool = True):
    """Yield new token ids one at a time: prefill the prompt, then one-token decode steps.

    Greedy when temperature is 0; otherwise seeded sampling (refimpl.ops.sample). Stops after
    max_new_tokens, or after yielding an eos id when stop_at_eos: `eos_id` (an id or a
    collection of ids; default every id of the config's eos_token_id).
    """
    if eos_id is None:
        eos_ids = set(model.config.eos_token_ids)
    else:
        eos_ids = set(eos_id) if isinstance(eos_id, (list, tuple, set)) else {eos_id}
    rng = np.random.default_rng(seed)
    cache = model.new_cache(capacity=len(prompt_ids) + max_new_tokens)
    logits = model.forward(np.asarray(prompt_ids), cache, last_only=True)  # [1, V]
    for step in range(max_new_tokens):
        token = sample(logits[-1], temperature, top_k, top_p, rng)
        yield token
        if (stop_at_eos and token in eos_ids) or step == max_new_tokens - 1:
            return  # no forward for a token nobody will ask for
        logits = model.forward(np.array([token]), cache, last_only=True)
