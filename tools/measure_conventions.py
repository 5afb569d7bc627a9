"""How much the two numerics profiles (hf, vllm-ascend) differ on the same weights and tokens.

    python tools/measure_conventions.py [--layers 4] [--tokens 256] [--numerics bf16]

A Pro-MoE-width model (hidden 5120, 40/8 heads, 64 experts in 8 groups; expert widths reduced
to 128 / 256 with --small-experts, which routing does not depend on) with seeded random
weights runs the same token ids under both profiles. Per layer it reports the fraction of
(token, group) choices that differ (a) in the two forwards (differences propagate) and (b) of
the router alone: the vllm-ascend router on the hf run's own router logits; and the logits'
normwise difference and top-1 agreement. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import refimpl
from refimpl import ops
from refimpl.config import preset
from refimpl.taps import Taps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--numerics", default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small-experts", action="store_true")
    args = p.parse_args()
    over = {"num_hidden_layers": args.layers}
    if args.small_experts:
        over.update(moe_intermediate_size=128, shared_expert_intermediate_size=256)
    base = preset("pro-moe-72b", **over)
    ids = np.random.default_rng(args.seed).integers(3, base.vocab_size, args.tokens)
    runs = {}
    for profile in ("hf", "vllm-ascend"):
        model = refimpl.init_model(base.with_conventions(profile), seed=args.seed,
                                   numerics=args.numerics, backend="numba")
        taps = Taps(routing=True)
        logits = model.forward(ids, taps=taps)
        runs[profile] = (logits.astype(np.float64), taps)
        G = model.config.num_groups
    (lh, th), (lv, tv) = runs["hf"], runs["vllm-ascend"]
    layers = []
    for i in range(args.layers):
        key = f"layers.{i}.router_logits"
        router_alone, _ = ops.moge_route(th[key], np.ones((1, th[key].shape[1]), th[key].dtype),
                                         G, softmax_dtype="activation")
        hf_alone, _ = ops.moge_route(th[key], np.ones((1, th[key].shape[1]), th[key].dtype), G)
        layers.append({"layer": i,
                       "choices_differ_in_the_forwards": float(np.mean(th.routing[i] !=
                                                                        tv.routing[i])),
                       "choices_differ_router_alone": float(np.mean(router_alone != hf_alone))})
    out = {"config": {"hidden": base.hidden_size, "experts": base.num_experts, "groups": G,
                      "layers": args.layers, "tokens": args.tokens,
                      "numerics": args.numerics, "small_experts": args.small_experts},
           "per_layer": layers,
           "logits_normwise_diff": float(np.max(np.abs(lh - lv)) / np.max(np.abs(lh))),
           "top1_agreement": float(np.mean(lh.argmax(-1) == lv.argmax(-1)))}
    for row in layers:
        print(f"layer {row['layer']}: choices differing {100 * row['choices_differ_in_the_forwards']:.2f}% "
              f"(router alone on the same logits: {100 * row['choices_differ_router_alone']:.2f}%)")
    print(f"logits: normwise difference {out['logits_normwise_diff']:.3g}, top-1 agreement "
          f"{100 * out['top1_agreement']:.1f}%")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
