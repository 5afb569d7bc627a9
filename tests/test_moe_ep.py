"""The voted router of the 300I Duo deployment and expert parallelism (refimpl.ops.moe_ep).

The voted router is checked against a transcription of vllm-ascend's `pangu_group8_topk`
(vllm_ascend/models/pangu_moe.py, `topk_wrapper(num_voted_experts)`), run in torch on inputs
without vote ties at the cut (where torch's unstable argsort leaves the order open). Expert
parallelism must equal the single-device block bit for bit, for every ep_size that divides
the experts, in every mode and both conventions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from refimpl import ops
from refimpl.config import ModelConfig, preset
from refimpl.errors import ConfigError, InputError
from refimpl.numerics import storage_dtype

import torch  # noqa: E402  (the test extra; a missing torch fails, not skips)
MODES = ("fp64", "fp32", "bf16", "fp16")
TORCH_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
            "fp64": torch.float64}


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def vllm_ascend_voted_topk(gating_output, router_scale, topk, num_voted_experts,
                           global_num_experts, scores=None):
    """vllm-ascend's pangu_group8_topk with ep_size 1 (rank 0 holds every group), line by
    line: softmax in the gating dtype, per-group argmax votes, the num_voted_experts most
    voted experts per group kept, max over the kept scores, times router_scale. `scores`,
    if given, replaces the softmax (its last bits are torch's exp, not the rule under test)."""
    if scores is None:
        scores = torch.nn.functional.softmax(gating_output, dim=1)
    num_tokens = scores.shape[0]
    local_num_group = topk
    experts_per_group = global_num_experts // topk
    router_weights = router_scale.squeeze()
    if num_voted_experts == experts_per_group:
        topk_weights, topk_ids = torch.max(scores.view(num_tokens, local_num_group, -1), dim=-1)
        bias = torch.arange(0, global_num_experts, experts_per_group,
                            dtype=torch.int32).unsqueeze(0)
        topk_ids = topk_ids.to(torch.int32) + bias
    else:
        group_expert_indices = torch.arange(experts_per_group, dtype=torch.int32).view(1, 1, -1)
        group_expert_offset = (torch.arange(local_num_group, dtype=torch.int32)
                               * experts_per_group).unsqueeze(0)
        expert_index_range = torch.arange(experts_per_group, dtype=torch.int32)
        scores_grouped = scores.view(num_tokens, local_num_group, experts_per_group)
        best_expert_idx = torch.argmax(scores_grouped, dim=2)
        vote_mask = best_expert_idx.unsqueeze(-1).to(torch.int32) == group_expert_indices
        expert_vote_freq = vote_mask.sum(dim=0)
        sorted_indices = torch.argsort(expert_vote_freq, dim=1, descending=True).to(torch.int32)
        topk_experts = sorted_indices[:, :num_voted_experts]
        keep_mask = (topk_experts.unsqueeze(-1) == expert_index_range).any(dim=1).unsqueeze(0)
        masked_scores = torch.where(keep_mask, scores_grouped, 0)
        topk_weights, best_pos_in_group = masked_scores.max(dim=2)
        topk_ids = (best_pos_in_group.to(torch.int32) + group_expert_offset).to(torch.int32)
    router_weights = router_weights.index_select(0, topk_ids.view(-1)).view(topk_ids.shape)
    topk_weights *= router_weights
    return topk_weights, topk_ids


def _vote_has_no_tie_at_the_cut(probs, G, V):
    size = probs.shape[1] // G
    best = np.argmax(probs.reshape(len(probs), G, size), -1)
    for g in range(G):
        votes = np.sort(np.bincount(best[:, g], minlength=size))[::-1]
        if V < size and votes[V - 1] == votes[V]:
            return False
    return True


@pytest.mark.parametrize("mode", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("V", [1, 3, 5, 8])
def test_voted_router_is_vllm_ascends_pangu_group8_topk(mode, V):
    dt = storage_dtype(mode)
    E, G = 64, 8
    checked = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        T = int(rng.integers(1, 400))
        bias = rng.standard_normal(E) * 1.5           # some experts more popular
        logits = (rng.standard_normal((T, E)) + bias).astype(dt)
        scale = rng.uniform(0.5, 1.5, (1, E)).astype(dt)
        probs = ops.softmax(logits, axis=-1)
        if mode != "fp32":
            probs = probs.astype(dt)
        if not _vote_has_no_tie_at_the_cut(np.asarray(probs, np.float64), G, V):
            continue
        # torch's float32 exp may round a half-precision probability the other way: give
        # the transcription our probabilities where they differ anywhere
        t_probs = torch.softmax(torch.from_numpy(logits.astype(np.float32)).to(TORCH_DT[mode]),
                                dim=1)
        same_p = mode == "fp32" or np.array_equal(t_probs.float().numpy(),
                                                  probs.astype(np.float32))
        given = None if same_p else torch.from_numpy(probs.astype(np.float32)).to(TORCH_DT[mode])
        ids, w = ops.moge_route(logits, scale, G, softmax_dtype="activation",
                                num_voted_experts=V)
        tw, tids = vllm_ascend_voted_topk(torch.from_numpy(logits.astype(np.float32)).to(
            TORCH_DT[mode]), torch.from_numpy(scale.astype(np.float32)).to(TORCH_DT[mode]),
            G, V, E, scores=given)
        np.testing.assert_array_equal(ids, tids.numpy().astype(np.int64))
        if mode == "fp32":   # torch's float32 exp is not ours: a last bit may differ
            np.testing.assert_allclose(w, tw.numpy(), rtol=1e-6, atol=0)
        else:                # rounded to the half dtype: equal
            np.testing.assert_array_equal(bits(w.astype(dt)),
                                          bits(tw.float().numpy().astype(dt)))
        checked += 1
        if checked == 12:
            break
    assert checked == 12


def test_voted_router_depends_on_the_batch_and_keeps_own_choices_when_kept():
    rng = np.random.default_rng(4)
    E, G, T = 64, 8, 48
    logits = (rng.standard_normal((T, E)) * 2).astype(np.float32)
    scale = np.ones((1, E), np.float32)
    plain, _ = ops.moge_route(logits, scale, G)
    voted, _ = ops.moge_route(logits, scale, G, num_voted_experts=5)
    keep = ops.moge_vote(ops.softmax(logits, axis=-1), G, 5)             # [G, 8]
    kept = keep[np.arange(G)[None, :], plain - np.arange(G)[None, :] * 8]  # [T, G]
    assert (voted[kept] == plain[kept]).all() and (voted[~kept] != plain[~kept]).all()
    assert (~kept).any()                                  # some tokens were outvoted
    # each group uses at most 5 experts in the batch
    for g in range(G):
        assert len(np.unique(voted[:, g])) <= 5
    # the same token alone (decode of one sequence) keeps its own argmax: batch-dependent
    alone = np.concatenate([ops.moge_route(logits[t:t + 1], scale, G, num_voted_experts=5)[0]
                            for t in range(T)])
    np.testing.assert_array_equal(alone, plain)
    # every expert kept = plain MoGE
    np.testing.assert_array_equal(ops.moge_route(logits, scale, G, num_voted_experts=8)[0],
                                  plain)
    with pytest.raises(InputError, match="num_voted_experts"):
        ops.moge_route(logits, scale, G, num_voted_experts=0)


def test_router_switch_in_config():
    c = preset("tiny-moge")
    assert c.router == "moge" and c.voted_experts is None
    d = c.to_hf_dict()
    assert d["refimpl_router"] == "moge" and d["refimpl_num_voted_experts"] == 5
    v = ModelConfig.from_hf_dict({**d, "refimpl_router": "moge_voted",
                                  "refimpl_num_voted_experts": 2})
    assert v.voted_experts == 2 and v.conventions == "hf"
    for bad, fragment in (({"refimpl_router": "topk"}, "refimpl_router"),
                          ({"refimpl_num_voted_experts": 0}, "refimpl_num_voted_experts"),
                          ({"refimpl_num_voted_experts": "5"}, "refimpl_num_voted_experts")):
        with pytest.raises(ConfigError, match=fragment):
            ModelConfig.from_hf_dict({**d, **bad})
    assert "refimpl_router" not in preset("tiny-dense").to_hf_dict()


def _block(mode, T, E=16, G=4, H=24, I=8, seed=0):
    rng = np.random.default_rng(seed)
    dt = storage_dtype(mode)
    x = rng.standard_normal((T, H)).astype(dt)
    gate_w = (rng.standard_normal((E, H)) * 0.4).astype(dt)
    scale = rng.uniform(0.5, 1.5, (1, E)).astype(dt)
    experts = [tuple((rng.standard_normal(s) * 0.2).astype(dt) for s in ((I, H), (I, H), (H, I)))
               for _ in range(E)]
    shared = tuple((rng.standard_normal(s) * 0.2).astype(dt) for s in ((I, H), (I, H), (H, I)))
    return x, gate_w, scale, experts, shared, G


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("conventions", [("float32", "after_down"), ("activation", "before_down")])
def test_expert_parallel_block_equals_the_single_device_block(mode, conventions):
    softmax_dtype, point = conventions
    for T in (1, 3, 37):
        x, gate_w, scale, experts, shared, G = _block(mode, T, seed=T)
        E = len(experts)
        one = ops.moe_block(x, gate_w, scale, experts, shared, G,
                            router_softmax_dtype=softmax_dtype, weight_point=point)
        for ep in (1, 2, 4, 8, 16):
            y, plan = ops.moe_block_ep(x, gate_w, scale, experts, shared, G, ep,
                                       router_softmax_dtype=softmax_dtype, weight_point=point)
            np.testing.assert_array_equal(bits(y), bits(one), err_msg=f"T={T} ep={ep}")
            sc = plan["send_counts"]
            assert sc.shape == (ep, ep) and sc.sum() == T * G
            # source s sends each of its tokens G rows
            np.testing.assert_array_equal(sc.sum(1), np.diff(plan["token_bounds"]) * G)
            np.testing.assert_array_equal(sc.sum(0), ops.rank_loads(plan["expert_ids"], E, ep))
            for r, rank in enumerate(plan["ranks"]):
                first, last = rank["experts"]
                assert ((rank["recv_expert_ids"] >= first) & (rank["recv_expert_ids"] < last)).all()
                np.testing.assert_array_equal(bits(rank["x"]), bits(x[rank["recv_token_idx"]]))
                assert rank["group_list"][-1] == len(rank["x"]) == sc[:, r].sum()


def test_expert_parallel_rank_outputs_are_each_experts_swiglu():
    x, gate_w, scale, experts, shared, G = _block("bf16", 29, seed=3)
    _, plan = ops.moe_block_ep(x, gate_w, scale, experts, shared, G, 4)
    for rank in plan["ranks"]:
        for i, (t, e) in enumerate(zip(rank["recv_token_idx"], rank["recv_expert_ids"])):
            tok = np.flatnonzero((plan["expert_ids"] == e).any(1))
            row = int(np.flatnonzero(tok == t)[0])
            want = ops.swiglu(x[tok], *experts[int(e)])[row]
            np.testing.assert_array_equal(bits(rank["out"][i]), bits(want))


def test_moge_on_one_group_per_rank_is_balanced_and_topk_is_not():
    """MoGE's point: with the 8 groups on 8 ranks every rank computes exactly T rows."""
    rng = np.random.default_rng(0)
    T, E, G = 512, 64, 8
    logits = (rng.standard_normal((T, E)) + rng.standard_normal(E)).astype(np.float32)
    ids, _ = ops.moge_route(logits, np.ones((1, E), np.float32), G)
    np.testing.assert_array_equal(ops.rank_loads(ids, E, 8), np.full(8, T))
    assert ops.load_spread(ops.rank_loads(ids, E, 8)) == 0.0
    top = ops.global_topk_ids(logits, G)
    assert top.shape == (T, G) and (np.diff(top, axis=1) > 0).all()
    assert ops.load_spread(ops.rank_loads(top, E, 8)) > 0.1
    with pytest.raises(InputError, match="ep_size"):
        ops.rank_loads(ids, E, 3)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_voted_router_in_a_batched_step_votes_over_the_whole_batch(backend):
    """Model.step with the voted router routes the packed batch at once (the vote spans
    every sequence of the step, as the serving batch does), so an entry's selection can
    differ from its forward alone; both backends agree bit for bit."""
    import refimpl
    from refimpl.taps import Taps

    model = refimpl.init_model("tiny-moge", seed=1, numerics="bf16", backend=backend,
                               router="moge_voted", num_voted_experts=1)
    rng = np.random.default_rng(0)
    batch = [(s, rng.integers(0, model.config.vocab_size, n)) for s, n in
             (("a", 7), ("b", 1), ("c", 12))]
    taps = Taps()
    outs = model.step(batch, model.new_paged_cache(num_blocks=16, block_size=16), taps=taps)
    logits = taps.arrays["layers.0.router_logits"]
    want, _ = ops.moge_route(logits, model.w("model.layers.0.mlp.router_scale"),
                             model.config.num_groups, num_voted_experts=1)
    np.testing.assert_array_equal(taps.arrays["layers.0.expert_ids"], want)
    for g in range(model.config.num_groups):              # one expert per group, batch-wide
        assert len(np.unique(want[:, g])) == 1
    alone = [model.forward(ids) for _, ids in batch]
    assert any(not np.array_equal(bits(o), bits(a)) for o, a in zip(outs, alone))
    # each entry equals its forward alone run with the batch's selection forced
    L = model.config.num_hidden_layers
    start = 0
    for (_, ids), out in zip(batch, outs):
        forced = {i: taps.arrays[f"layers.{i}.expert_ids"][start:start + len(ids)]
                  for i in range(L)}
        start += len(ids)
        np.testing.assert_array_equal(bits(out), bits(model.forward(ids, expert_ids=forced)))


def test_moe_ep_goldens_follow_ep_size_and_refuse_bad_ones(tmp_path):
    from refimpl.golden import operator_cases

    cases = operator_cases("tiny-moge", ["moe_ep"], "bf16", tokens=8, ep_size=4)
    names = [c.name for c in cases]
    assert names == [f"tiny-moge-moe-ep-rank{r}-bf16" for r in range(4)] + \
        ["tiny-moge-moe-ep-combine-bf16"]
    assert cases[0].parameters["ep_size"] == 4 and "--ep-size 4" in cases[0].command
    assert np.asarray(cases[0].parameters["send_counts"]).shape == (4, 4)
    for bad in (5, 0, 24):
        with pytest.raises(InputError, match="--ep-size"):
            operator_cases("tiny-moge", ["moe_ep"], "bf16", tokens=8, ep_size=bad)
    r = subprocess.run([sys.executable, "-m", "refimpl", "golden", "--model", "tiny-moge",
                        "--token-ids", "1,2", "--ep-size", "2", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--ep-size goes with --preset" in r.stderr
    assert r.stderr.count("\n") == 1
