"""A small continuous-batching scheduler over `Model.step` and a `PagedKVCache`: requests
arrive at given steps, prompts are prefilled in chunks within a per-step token budget, every
running sequence decodes one token per step, finished sequences free their blocks.

It exists to show `Model.step` serving a trace (`python -m refimpl serve-sim`), not to be a
serving system: admission reserves a request's whole footprint (prompt + max_new_tokens) in
blocks up front, so nothing is ever preempted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .ops import sample


@dataclass
class Request:
    """One generation request: `prompt` token ids, the step it arrives at, how many tokens to
    generate (stopping early at an eos id)."""

    rid: str
    prompt: list
    arrival: int = 0
    max_new_tokens: int = 16
    generated: list = field(default_factory=list)
    prefilled: int = 0            # prompt tokens already in the cache
    finished: bool = False


@dataclass
class StepRecord:
    """What one step ran: entries (request id, "prefill" / "decode", tokens), the blocks in
    use and free after it, and the requests that finished at it."""

    index: int
    entries: list
    blocks_used: int
    blocks_free: int
    finished: list


def simulate(model, requests, cache, token_budget: int = 64, temperature: float = 0.0,
             seed: int = 0, eos_ids=(), max_steps: int = 10_000):
    """Run requests to completion through `model.step` on `cache`; yield a StepRecord per
    step. Sampling as `refimpl.generate` (greedy at temperature 0; otherwise each request
    has its own generator seeded with seed + its index)."""
    if token_budget < 1:
        raise InputError(f"--token-budget must be >= 1, got {token_budget}")
    reqs = sorted(requests, key=lambda r: r.arrival)
    for r in reqs:
        footprint = cache.blocks_needed(r.rid, len(r.prompt) + r.max_new_tokens)
        if footprint > cache.num_blocks:
            raise InputError(f"request {r.rid!r} needs {footprint} blocks of "
                             f"{cache.block_size}; the cache has {cache.num_blocks}")
    rngs = {r.rid: np.random.default_rng(seed + i) for i, r in enumerate(requests)}
    admitted, reserved = [], 0
    step = 0
    while not all(r.finished for r in reqs):
        if step >= max_steps:
            raise InputError(f"the trace did not finish in {max_steps} steps")
        for r in reqs:    # admit in arrival order while the whole footprint fits
            if r.finished or r in admitted or r.arrival > step:
                continue
            need = -(-(len(r.prompt) + r.max_new_tokens) // cache.block_size)
            if reserved + need > cache.num_blocks:
                break
            admitted.append(r)
            reserved += need
        batch, kinds, budget = [], [], token_budget
        for r in admitted:    # running sequences decode first
            if not r.finished and r.prefilled == len(r.prompt) and budget > 0:
                batch.append((r.rid, [r.generated[-1]]))
                kinds.append((r, "decode"))
                budget -= 1
        for r in admitted:    # then prompt chunks, oldest first
            if r.prefilled < len(r.prompt) and budget > 0:
                n = min(budget, len(r.prompt) - r.prefilled)
                batch.append((r.rid, r.prompt[r.prefilled:r.prefilled + n]))
                kinds.append((r, "prefill"))
                budget -= n
        done = []
        if batch:
            logits = model.step(batch, cache)
            for (r, kind), (_, ids), lg in zip(kinds, batch, logits):
                if kind == "prefill":
                    r.prefilled += len(ids)
                    if r.prefilled < len(r.prompt):
                        continue          # a chunk that does not end the prompt samples nothing
                token = int(sample(lg[-1], temperature, 0, 1.0, rngs[r.rid]))
                r.generated.append(token)
                if token in eos_ids or len(r.generated) == r.max_new_tokens:
                    r.finished = True
                    cache.free(r.rid)
                    admitted.remove(r)
                    reserved -= -(-(len(r.prompt) + r.max_new_tokens) // cache.block_size)
                    done.append(r.rid)
        entries = [(r.rid, kind, len(ids)) for (r, kind), (_, ids) in zip(kinds, batch)]
        yield StepRecord(step, entries, cache.num_blocks - cache.free_blocks, cache.free_blocks,
                         done)
        step += 1
