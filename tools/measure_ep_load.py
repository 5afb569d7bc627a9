"""Per-rank load of expert parallelism: MoGE against global top-8 on the same router logits.

    python tools/measure_ep_load.py [--tokens 512] [--batches 20] [--seed 0]

Pangu Pro MoE's 64 experts (8 groups of 8) are placed contiguously on ep_size ranks
(`refimpl.ops.expert_rank`); a rank's load is the number of (token, choice) rows routed to its
experts (`rank_loads`), its spread the standard deviation over the ranks divided by the mean
(`load_spread`), averaged over batches of --tokens tokens. Router logits, per batch:

* `iid sigma`: N(0, sigma^2) per token and expert, no expert preferred (an untrained router);
* `skew b`: the same with sigma = 1 plus a per-expert popularity bias N(0, b^2) fixed over the
  batches (what a trained router without a balancing loss drifts to);
* `real-width layer`: linear(x, gate) of a seeded Pro-MoE-width layer (hidden 5120, gate
  N(0, 1/hidden)), x ~ N(0, 1): the router logits of refimpl's random checkpoints.

MoGE picks one expert per group (`moge_route`); global top-8 the 8 most probable of the 64
(`global_topk_ids`). Prints a table and one JSON object last.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from refimpl import ops

E, G = 64, 8
EP_SIZES = (2, 4, 8, 16)


def spreads(logits_batches) -> dict:
    """{router: {ep: mean spread}} over the batches."""
    out = {"moge": {}, "top8": {}}
    for ep in EP_SIZES:
        m, t = [], []
        for logits in logits_batches:
            ids, _ = ops.moge_route(logits, np.ones((1, E), logits.dtype), G)
            m.append(ops.load_spread(ops.rank_loads(ids, E, ep)))
            t.append(ops.load_spread(ops.rank_loads(ops.global_topk_ids(logits, G), E, ep)))
        out["moge"][ep], out["top8"][ep] = float(np.mean(m)), float(np.mean(t))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    T, B = args.tokens, args.batches
    dists = {}
    for sigma in (0.3, 1.0, 2.0):
        dists[f"iid sigma={sigma}"] = [(rng.standard_normal((T, E)) * sigma).astype(np.float32)
                                       for _ in range(B)]
    for b in (0.5, 1.0):
        bias = rng.standard_normal(E) * b
        dists[f"skew b={b}"] = [(rng.standard_normal((T, E)) + bias).astype(np.float32)
                                for _ in range(B)]
    H = 5120
    gate = (rng.standard_normal((E, H)) / np.sqrt(H)).astype(np.float32)
    dists["real-width layer"] = [ops.linear(rng.standard_normal((T, H)).astype(np.float32), gate)
                                 for _ in range(B)]
    result = {"tokens": T, "batches": B, "experts": E, "groups": G, "spread": {}}
    print(f"load spread (std / mean of rows per rank), {B} batches of {T} tokens")
    print(f"{'router logits':22s} {'router':6s} " + " ".join(f"ep={ep:<5d}" for ep in EP_SIZES))
    for name, batches in dists.items():
        s = spreads(batches)
        result["spread"][name] = s
        for router in ("moge", "top8"):
            print(f"{name:22s} {router:6s} " + " ".join(f"{100 * s[router][ep]:6.1f}%"
                                                        for ep in EP_SIZES))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
