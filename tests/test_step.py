"""Model.step: a scheduler's batch over a paged KV cache equals each sequence run alone.

A trace of steps mixes whole prompts, prefill chunks and single decode tokens of sequences of
lengths 1 .. 300; a sequence finishes and frees its blocks, a new one arrives and takes them;
the free list starts shuffled, so block tables are neither contiguous nor increasing. Every
entry's logits must equal, bit for bit, `forward` of the same tokens on that sequence alone
with a contiguous `KVCache` holding the same prefix, in every numerics mode and with both
backends; the step's taps, cut per entry, equal forward's taps.
"""

from __future__ import annotations

import numpy as np
import pytest

import refimpl
from refimpl.errors import InputError
from refimpl.taps import Taps, split_step

MODES = ("fp64", "fp32", "bf16", "fp16")


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def prompts(model, seed=0):
    rng = np.random.default_rng(seed)
    lengths = {"a": 5, "b": 300, "c": 1, "d": 37, "e": 129}
    return {s: rng.integers(0, model.config.vocab_size, n) for s, n in lengths.items()}


#: the trace: entries (seq, tokens or None for a greedy decode token, or (start, stop) of the
#: prompt for a chunk), "free X" between steps
TRACE = [
    [("a", "all"), ("b", (0, 128)), ("c", "all")],
    [("b", (128, 300)), ("a", None), ("c", None)],
    [("a", None), ("b", None), ("c", None), ("e", (0, 64))],
    "free a",
    [("d", "all"), ("b", None), ("e", (64, 129)), ("c", None)],
    "free c",
    [("d", None), ("b", None), ("e", None)],
]


def replay(model, cache, solo_taps=False, step_taps=False):
    """Run TRACE through model.step and each sequence alone through forward; yields
    (seq, step logits, forward logits, step taps of the entry, forward taps)."""
    p = prompts(model)
    solo, last = {}, {}
    for step in TRACE:
        if isinstance(step, str):
            seq = step.split()[1]
            blocks = set(cache.block_table(seq).tolist())
            cache.free(seq)
            del solo[seq]
            yield ("freed", blocks)
            continue
        batch = []
        for seq, what in step:
            if what is None:
                ids = np.array([int(np.argmax(last[seq][-1]))])
            elif what == "all":
                ids = p[seq]
            else:
                ids = p[seq][what[0]:what[1]]
            batch.append((seq, ids))
        taps = Taps() if step_taps else None
        outs = model.step(batch, cache, taps=taps)
        per_entry = split_step(taps, [len(i) for _, i in batch]) if step_taps else None
        for b, ((seq, ids), logits) in enumerate(zip(batch, outs)):
            ref_taps = Taps() if solo_taps else None
            ref = model.forward(ids, solo.setdefault(seq, model.new_cache()), taps=ref_taps)
            last[seq] = logits
            yield (seq, logits, ref, per_entry[b] if per_entry else None, ref_taps)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moge"])
def test_step_equals_each_sequence_alone(preset, mode, backend):
    model = refimpl.init_model(preset, seed=1, numerics=mode, backend=backend)
    order = np.random.default_rng(3).permutation(64)
    cache = model.new_paged_cache(num_blocks=64, block_size=16, order=order)
    checked, freed, seen = 0, [], set()
    for item in replay(model, cache):
        if item[0] == "freed":
            freed.append(item[1])
            continue
        seq, got, want, _, _ = item
        assert got.shape == want.shape
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=f"{seq} {got.shape}")
        checked += 1
        if seq == "d" and seq not in seen:
            # the newcomer took the block the finished sequence "a" gave back
            assert freed[0] <= set(cache.block_table("d").tolist())
        seen.add(seq)
    assert checked == 17
    table = cache.block_table("b")
    assert len(table) == 19 and not np.array_equal(table, np.sort(table))   # out of order


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_step_taps_cut_per_entry_are_forwards_taps(backend):
    model = refimpl.init_model("tiny-moge", seed=2, numerics="bf16", backend=backend)
    cache = model.new_paged_cache(num_blocks=64, block_size=16,
                                  order=np.random.default_rng(4).permutation(64))
    compared = 0
    for item in replay(model, cache, solo_taps=True, step_taps=True):
        if item[0] == "freed":
            continue
        seq, _, _, mine, ref = item
        assert set(ref.arrays) <= set(mine), set(ref.arrays) - set(mine)
        for name, a in ref.arrays.items():
            np.testing.assert_array_equal(bits(mine[name]), bits(a), err_msg=f"{seq} {name}")
            compared += 1
        assert len(mine["slot_mapping"]) == len(mine["positions"]) == len(mine["embed"])
        experts = [n for n in mine if ".experts." in n]
        assert experts and {n for n in experts} == {n for n in ref.arrays if ".experts." in n}
    assert compared > 500


def test_paged_cache_bookkeeping():
    cache = refimpl.PagedKVCache(2, 1, 4, np.float32, num_blocks=6, block_size=4,
                                 order=[5, 3, 1, 0, 2, 4])
    np.testing.assert_array_equal(cache.reserve("x", 6), [20, 21, 22, 23, 12, 13])
    cache.advance("x", 6)
    np.testing.assert_array_equal(cache.reserve("y", 1), [4])
    cache.advance("y", 1)
    np.testing.assert_array_equal(cache.reserve("x", 3), [14, 15, 0])   # next block: 0
    cache.advance("x", 3)
    np.testing.assert_array_equal(cache.block_tables(["x", "y"]), [[5, 3, 0], [1, -1, -1]])
    assert cache.free_blocks == 2 and cache.length("x") == 9
    with pytest.raises(InputError, match="needs 3 more blocks of 4, 2 free"):
        cache.reserve("z", 12)
    assert cache.free_blocks == 2 and "z" not in cache.sequences      # nothing taken
    cache.free("x")
    np.testing.assert_array_equal(cache.reserve("z", 5), [20, 21, 22, 23, 12])  # reused first
    with pytest.raises(InputError, match="no sequence 'x'"):
        cache.free("x")
    with pytest.raises(InputError, match="permutation"):
        refimpl.PagedKVCache(1, 1, 4, np.float32, num_blocks=3, block_size=4, order=[0, 0, 1])
    assert np.isnan(cache.key_cache[0]).all()                          # never written yet


def test_step_refuses_bad_batches_and_leaves_the_cache_as_it_was():
    model = refimpl.init_model("tiny-dense", seed=1, numerics="fp32")
    cache = model.new_paged_cache(num_blocks=4, block_size=8)
    model.step([("a", [1, 2, 3])], cache)
    before = (cache.free_blocks, cache.length("a"), cache.block_table("a").tolist())
    for batch, fragment in (
            ([], "at least one entry"),
            ([("a", [1]), ("a", [2])], "each sequence at most once"),
            ([("a", [1, 9999])], "outside the vocabulary"),
            ([("a", [1]), ("b", list(range(1, 40)))], "paged cache full"),
            ([("b", np.ones(513, np.int64))], "max_position_embeddings")):
        with pytest.raises(InputError, match=fragment):
            model.step(batch, cache)
        assert (cache.free_blocks, cache.length("a"), cache.block_table("a").tolist()) == before


def _cli(*args):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "REFIMPL_DEBUG"}
    return subprocess.run([sys.executable, "-m", "refimpl", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


def test_serve_sim_default_trace_equals_generating_each_request_alone():
    res = _cli("serve-sim", "--check")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any("prefill 4 | " in ln for ln in lines)              # a prompt cut in chunks
    assert any(" | " in ln and "decode" in ln and "prefill" in ln for ln in lines)  # mixed
    assert sum("[same as alone]" in ln for ln in lines) == 4
    assert "arrived at step 5" in res.stdout


def test_scheduler_waits_for_blocks_and_frees_them():
    from refimpl.scheduler import Request, simulate

    model = refimpl.init_model("tiny-moge", seed=1, numerics="bf16", backend="numba")
    rng = np.random.default_rng(0)
    reqs = [Request(f"r{i}", list(rng.integers(3, 257, n)), a, 6)
            for i, (n, a) in enumerate([(30, 0), (7, 0), (19, 1), (1, 3)])]
    cache = model.new_paged_cache(num_blocks=6, block_size=8)    # too few for all at once
    steps = list(simulate(model, reqs, cache, token_budget=10))
    assert cache.free_blocks == 6 and all(r.finished for r in reqs)
    assert max(s.blocks_used for s in steps) <= 6
    first_of = {r.rid: min(s.index for s in steps if any(e[0] == r.rid for e in s.entries))
                for r in reqs}
    assert first_of["r2"] > 1                                     # waited for blocks
    for r in reqs:
        alone = [int(t) for t in refimpl.generate(model, r.prompt, max_new_tokens=6,
                                                  eos_id=[])]
        assert r.generated == alone, r.rid


def test_serve_sim_refuses_bad_options():
    for args, fragment in ((["--token-budget", "0"], "--token-budget"),
                           (["--arrive", "0,1"], "--arrive needs 4"),
                           (["--num-blocks", "1", "--block-size", "2"], "needs"),
                           (["--model", "tiny-dense"], "--token-ids")):
        res = _cli("serve-sim", *args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.count("\n") == 1 and fragment in res.stderr, res.stderr


# ---------------------------------------------------------------------- the step's golden
@pytest.fixture(scope="module")
def step_golden(tmp_path_factory):
    from refimpl.golden.cases import step_case
    from refimpl.golden.format import load_case, write_case

    model = refimpl.init_model("tiny-moge", seed=0, numerics="bf16")
    entries = [([1, 5, 7, 9, 3, 3, 3, 3, 2], [11]), ([], [2, 3, 4, 5, 6]), ([8, 8, 8], [4, 5]),
               ([], [7])]
    case = step_case(model, entries, block_size=4, model_name="tiny-moge", seed=0)
    path = write_case(str(tmp_path_factory.mktemp("step")), case)
    return model, entries, path, load_case(path)


def test_step_golden_rows_are_forward_of_each_sequence(step_golden):
    model, entries, _, case = step_golden
    t = case.tensors
    np.testing.assert_array_equal(t["q_lens"], [1, 5, 2, 1])
    np.testing.assert_array_equal(t["kv_lens"], [10, 5, 5, 1])
    cu = np.r_[0, np.cumsum(t["q_lens"])]
    bs = 4
    for b, (prefix, new) in enumerate(entries):
        kv = model.new_cache()
        if prefix:
            model.forward(prefix, kv)
        taps = Taps()
        logits = model.forward(new, kv, taps=taps)
        np.testing.assert_array_equal(bits(t["logits"][cu[b]:cu[b + 1]]), bits(logits))
        for name in ("layers.0.q_rope", "layers.1.attn", "layers.2.out"):
            np.testing.assert_array_equal(bits(t[name][cu[b]:cu[b + 1]]), bits(taps[name]))
        # the slot mapping points into the sequence's own blocks, in position order
        pos = t["positions"][cu[b]:cu[b + 1]]
        table = t["block_tables"][b]
        np.testing.assert_array_equal(t["slot_mapping"][cu[b]:cu[b + 1]],
                                      table[pos // bs].astype(np.int64) * bs + pos % bs)
    assert np.isnan(t["layers.0.key_cache"].astype(np.float64)).any()    # unowned slots


def test_step_golden_passes_itself_and_fails_wrong_kernels(step_golden, tmp_path):
    from refimpl.golden.compare import Options, compare_paths

    _, _, path, case = step_golden
    t = {k: np.asarray(v) for k, v in case.tensors.items()}
    outs = [e["name"] for e in case.entries("output")]

    def judge(arrays, name):
        d = tmp_path / name
        d.mkdir()
        for k in outs:
            a = arrays.get(k, t[k])
            np.save(d / f"{k}.npy", a.view(np.uint16) if a.dtype == refimpl.numerics.bfloat16
                    else a)
        return compare_paths(path, str(d), Options())

    assert judge({}, "same")["verdict"] == "pass"
    swapped = {"layers.0.key_cache_out": t["layers.0.value_cache_out"],
               "layers.0.value_cache_out": t["layers.0.key_cache_out"]}
    assert judge(swapped, "kv-swapped")["verdict"] == "fail"
    # decode entry 0 attending only to its own new token, not its cached prefix
    q = t["layers.0.q_rope"][:1]
    k_new, v_new = t["layers.0.k_rope"][:1], t["layers.0.v"][:1]
    attn = t["layers.0.attn"].copy()
    attn[:1] = refimpl.ops.attention(q, k_new, v_new).reshape(1, -1)
    report = judge({"layers.0.attn": attn}, "no-prefix")
    assert report["verdict"] == "fail"


def test_golden_step_cli(tmp_path):
    res = _cli("golden", "--model", "tiny-dense", "--step", "1,2,3/4;/5,6", "--block-size", "2",
               "--layers", "1", "--numerics", "fp32", "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    from refimpl.golden.format import load_case

    case = load_case(str(tmp_path / "tiny-dense-step-fp32"))
    assert "--step '1,2,3/4;/5,6' --block-size 2 --layers 1" in case.manifest["command"]
    assert "layers.1.key_cache" in case.tensors and "layers.0.key_cache" not in case.tensors
    for args, fragment in ((["--step", "1,2/"], "at least one new token"),
                           (["--step", "1,2"], "PREFIX/NEW"),
                           (["--step", "/1,999999"], "outside the vocabulary")):
        res = _cli("golden", "--model", "tiny-dense", *args, "--out", tmp_path / "x")
        assert res.returncode == 2 and fragment in res.stderr, res.stderr
