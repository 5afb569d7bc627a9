"""Streaming a checkpoint layer by layer (refimpl.io.streaming): exact results, only routed
experts read, pages released after each layer, bounded anonymous memory, progress output."""

import io
import os
import tracemalloc

import numpy as np
import pytest

from refimpl import cli
from refimpl.io import checkpoint, streaming
from refimpl.config import preset, weight_shapes
from refimpl.errors import CheckpointError
from refimpl.generate import generate
from refimpl.numerics import bfloat16
from refimpl.ops import basic
from refimpl.random_init import random_tensor
from refimpl.taps import Taps

IDS = np.array([1, 5, 9, 2, 7])


def _save(directory, config, poison=None):
    """A bf16 checkpoint of `config`'s seeded weights; `poison` names a tensor to hold NaN."""
    shapes = weight_shapes(config)

    def produce(name):
        w = random_tensor(config, name, shapes[name], 0, bfloat16)
        if name == poison:
            w = w.copy()
            w.reshape(-1)[3] = np.nan
        return w

    checkpoint.save_checkpoint(directory, config, produce, "bf16")
    return str(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-moge (3 MoGE layers, 12 experts in 3 groups) as a bf16 checkpoint."""
    return _save(tmp_path_factory.mktemp("stream") / "tiny", preset("tiny-moge"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A MoGE model whose tensors span many pages (experts 64 KiB each) and whose LM head
    (8192 x 128: 2 MiB in bf16, 4 MiB in float32) is larger than everything else together."""
    config = preset("tiny-moge").replace(hidden_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, vocab_size=8192, num_experts=8,
                                         num_experts_per_tok=2, moe_intermediate_size=256,
                                         shared_expert_intermediate_size=256)
    return _save(tmp_path_factory.mktemp("stream") / "wide", config)


def _bits(a):
    return np.asarray(a).view(np.uint8)


# ---------------------------------------------------------------------- exact results
@pytest.mark.parametrize("numerics", ["bf16", "fp32"])
def test_streamed_forward_equals_the_loaded_model_bit_for_bit(tiny, numerics):
    streamed = streaming.load_streamed(tiny, numerics=numerics, progress=False)
    loaded = checkpoint.load_model(tiny, numerics=numerics)
    ta, tb = Taps(), Taps()
    a = streamed.forward(IDS, taps=ta)
    b = loaded.forward(IDS, taps=tb)
    assert a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b))
    assert set(ta) == set(tb)
    for name in tb:
        assert np.array_equal(_bits(ta[name]), _bits(tb[name])), name


def test_streamed_numba_backend_equals_loaded_numba(tiny):
    streamed = streaming.load_streamed(tiny, numerics="bf16", backend="numba", progress=False)
    loaded = checkpoint.load_model(tiny, numerics="bf16", backend="numba")
    assert np.array_equal(_bits(streamed.forward(IDS)), _bits(loaded.forward(IDS)))


def test_streamed_generation_with_cache_equals_the_loaded_model(tiny):
    streamed = streaming.load_streamed(tiny, numerics="bf16", progress=False)
    loaded = checkpoint.load_model(tiny, numerics="bf16")
    a = list(generate(streamed, [1, 4, 6], max_new_tokens=5, stop_at_eos=False))
    b = list(generate(loaded, [1, 4, 6], max_new_tokens=5, stop_at_eos=False))
    assert a == b


# ---------------------------------------------------------------------- what is read
def test_only_the_routed_experts_are_read_once_each(tiny):
    model = streaming.load_streamed(tiny, numerics="bf16", progress=False)
    taps = Taps()
    model.forward(IDS[:2], taps=taps)
    counts = model.weights.counts
    c = model.config
    unselected = 0
    for i in range(c.num_hidden_layers):
        chosen = set(np.unique(taps[f"layers.{i}.expert_ids"]).tolist())
        for e in range(c.num_experts):
            names = [f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
                     for p in ("gate", "up", "down")]
            expect = 1 if e in chosen else 0
            assert [counts.get(n, 0) for n in names] == [expect] * 3, (i, e)
            unselected += e not in chosen
    assert unselected > 0  # 2 tokens x 3 groups cannot select all 12 experts of a layer
    # every other tensor is read (once per forward; the LM head after the final norm)
    others = [n for n in model.weights if ".mlp.experts." not in n]
    assert all(counts.get(n, 0) >= 1 for n in others)


def test_read_ahead_reads_the_selected_experts_only(tiny):
    """The read-ahead thread learns the routing from the MoE block's expert_ids: it checks
    (so reads) exactly the tensors the forward uses, never an unselected expert."""
    model = streaming.load_streamed(tiny, numerics="bf16", progress=False)
    taps = Taps()
    model.forward(IDS[:2], taps=taps)
    model._prefetcher.wait()
    assert model.weights.checked == set(model.weights.counts)
    assert sum(".mlp.experts." in n for n in model.weights.checked) < 3 * 3 * 12
    assert "layers.0.expert_ids" in taps            # the taps still get everything


def test_each_tensor_is_checked_for_nan_when_first_used(tmp_path):
    config = preset("tiny-moge").replace(num_hidden_layers=2)
    bad = "model.layers.1.self_attn.o_proj.weight"
    path = _save(tmp_path / "nan", config, poison=bad)
    model = streaming.load_streamed(path, numerics="bf16", progress=False)  # headers only
    with pytest.raises(CheckpointError, match=bad.replace(".", r"\.")):
        model.forward(IDS)
    ok = streaming.load_streamed(path, numerics="bf16", progress=False, allow_nonfinite=True)
    assert np.isnan(ok.forward(IDS).astype(np.float32)).any()


# ---------------------------------------------------------------------- pages and memory
@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="needs Linux pagemap")
@pytest.mark.parametrize("release", [True, False])
def test_each_layers_pages_are_unmapped_after_the_layer(wide, release):
    model = streaming.load_streamed(wide, numerics="bf16", progress=False, release=release,
                                    prefetch=False)
    w = model.weights
    if streaming.resident_bytes(w.arrays["lm_head.weight"]) is None:
        pytest.skip("pagemap not readable here")
    resident = {}

    def after_layer(i):  # Model.forward calls this right after layer i (and its release)
        resident[i] = sum(streaming.resident_bytes(w.arrays[n]) for n in w.layer_names(i)
                          if w.counts.get(n))

    model.forward(IDS, progress=after_layer)
    assert sorted(resident) == [0, 1]
    for i, nbytes in resident.items():
        if release:
            assert nbytes == 0, (i, nbytes)
        else:  # the control: what was read stays mapped without the release
            assert nbytes > 256 * 1024, (i, nbytes)
    head = streaming.resident_bytes(w.arrays["lm_head.weight"])
    assert (head == 0) if release else (head >= w.arrays["lm_head.weight"].nbytes)


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="needs Linux pagemap")
@pytest.mark.parametrize("release", [True, False])
def test_asking_for_an_expert_releases_the_previous_experts_pages(wide, release):
    _, arrays = checkpoint.load_weights(wide)
    w = streaming.StreamedWeights(arrays, release_pages=release)
    p = "model.layers.0.mlp.experts."
    first = [f"{p}0.{k}_proj.weight" for k in ("gate", "up", "down")]
    touched = sum(float(np.asarray(w[n], dtype=np.float32).sum()) for n in first)
    assert np.isfinite(touched)
    resident = [streaming.resident_bytes(arrays[n]) for n in first]
    if None in resident:
        pytest.skip("pagemap not readable here")
    assert min(resident) >= 64 * 1024                      # 64 KiB each, read just now
    w[f"{p}1.gate_proj.weight"]                            # the MoE block moves on
    after = [streaming.resident_bytes(arrays[n]) for n in first]
    assert after == ([0, 0, 0] if release else resident)


def test_read_ahead_checks_and_releases_but_leaves_a_bad_tensor_to_the_forward(tmp_path):
    config = preset("tiny-moge").replace(num_hidden_layers=1)
    bad = "model.layers.0.self_attn.q_proj.weight"
    _, arrays = checkpoint.load_weights(_save(tmp_path / "nan", config, poison=bad))
    w = streaming.StreamedWeights(arrays)
    names = w.layer_names(0)
    jobs = streaming.Prefetcher()
    jobs.submit(lambda: w.read_ahead(names))
    jobs.submit(lambda: 1 / 0)                  # a failing job does not stop the thread
    done = []
    jobs.submit(lambda: done.append(True))
    jobs.wait()
    jobs.close()
    assert done == [True]
    assert w.checked == set(names) - {bad}
    with pytest.raises(CheckpointError, match="holds NaN"):
        w[bad]
    assert w[names[-1]] is arrays[names[-1]]    # checked ahead: returned as is


def test_prefetch_announces_the_whole_array_in_pieces(wide, monkeypatch):
    _, arrays = checkpoint.load_weights(wide)
    head = arrays["lm_head.weight"]
    mapped, start, end = streaming._mapped_span(head)
    advised = []

    class Spy:  # records the madvise calls, then makes them
        def madvise(self, advice, offset, length):
            advised.append((offset, length))
            mapped.madvise(advice, offset, length)

    monkeypatch.setattr(streaming, "PREFETCH_CHUNK", 64 * 1024)
    monkeypatch.setattr(streaming, "_mapped_span", lambda a: (Spy(), start, end))
    nbytes = streaming.prefetch(head)
    first = start // streaming.PAGE * streaming.PAGE
    assert nbytes == end - first >= head.nbytes
    assert advised == [(o, min(64 * 1024, end - o)) for o in range(first, end, 64 * 1024)]


def test_release_and_resident_bytes_of_arrays_that_are_not_mapped():
    a = np.ones(10)
    assert streaming.release(a) == 0 and streaming.prefetch(a) == 0
    assert streaming.resident_bytes(a) is None


@pytest.mark.parametrize("block_bytes, bounded", [(64 * 1024, True), (2**40, False)])
def test_anonymous_memory_of_a_streamed_forward_is_bounded(wide, monkeypatch, block_bytes,
                                                           bounded):
    """NumPy reports its allocations to tracemalloc, so the peak of the arrays allocated
    during a forward is measured exactly (no timing). With the LM head converted in 64 KiB
    blocks the peak stays under 1 MiB; converting it in one piece (the control) costs its
    4 MiB float32 copy."""
    monkeypatch.setattr(basic, "LINEAR_BLOCK_BYTES", block_bytes)
    model = streaming.load_streamed(wide, numerics="bf16", progress=False)
    model.forward(IDS)  # first use: NaN checks (4 Mi values at a time) happen here
    tracemalloc.start()
    try:
        model.forward(IDS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    head_f32 = model.weights.arrays["lm_head.weight"].size * 4
    if bounded:
        assert peak < 2**20 < head_f32, peak
    else:
        assert peak > head_f32, peak


def test_memory_status_and_peak_sampler(monkeypatch):
    status = streaming.memory_status()
    if not status:
        pytest.skip("no /proc/self/status")
    assert set(status) == set(streaming.STATUS_FIELDS.values())
    assert status["vm_rss"] >= status["rss_anon"] > 0 and status["vm_hwm"] >= status["vm_rss"]
    # The peak logic, on scripted readings: /proc's RssAnon of a multi-threaded process (torch
    # loaded by other tests) is a per-CPU-batched counter that can lag a 64 MiB allocation.
    readings = iter([{"rss_anon": 100}, {"rss_anon": 900}, {"rss_anon": 300}])
    monkeypatch.setattr(streaming, "memory_status", lambda pid="self": next(readings))
    sampler = streaming.PeakSampler(interval=10.0)  # the thread never wakes: samples by hand
    with sampler:                                    # start samples once, stop once
        sampler.sample()
    assert sampler.peak == {"rss_anon": 900} and sampler.samples == 3
    monkeypatch.undo()
    assert streaming.memory_status("no-such-pid") == {}
    assert "VmHWM" in streaming.memory_line(status)


# ---------------------------------------------------------------------- linear in blocks
@pytest.mark.parametrize("T", [1, 3, 32])
@pytest.mark.parametrize("wdtype", [bfloat16, np.float16])
def test_linear_converts_an_oversized_weight_in_blocks_of_rows(monkeypatch, rng, T, wdtype):
    x = rng.standard_normal((T, 96)).astype(bfloat16)
    w = (rng.standard_normal((1000, 96)) * 0.1).astype(wdtype)
    b = rng.standard_normal(1000).astype(bfloat16)
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    whole = basic.linear(x, w, b)                     # 384 KB float32 copy: under the limit
    assert np.array_equal(_bits(whole), _bits(((x32 @ w32.T) + b.astype(np.float32))
                                               .astype(bfloat16)))
    monkeypatch.setattr(basic, "LINEAR_BLOCK_BYTES", 96 * 4 * 300)   # 300 rows per block
    assert basic.linear_block_rows(w, np.float32) == 300
    assert basic.linear_block_rows(w32, np.float32) == 1000           # no copy: never split
    blocks = np.concatenate([x32 @ w32[r:r + 300].T for r in range(0, 1000, 300)], axis=-1)
    split = basic.linear(x, w, b)
    assert np.array_equal(_bits(split), _bits((blocks + b.astype(np.float32)).astype(bfloat16)))
    # one float32 dot product per output either way: at most the last bit of bf16 differs
    diff = np.abs(split.astype(np.float32) - whole.astype(np.float32))
    assert np.all(diff <= np.abs(whole.astype(np.float32)) * 2**-7 + 1e-30)
    assert np.array_equal(_bits(basic.linear(x[None], w, b)[0]), _bits(split))  # [B, T, in]


# ---------------------------------------------------------------------- progress output
class _Clock:
    def __init__(self, times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


class _Tty(io.StringIO):
    def isatty(self):
        return True


MEM = {"rss_anon": 312 * 2**20, "rss_file": int(2.9 * 2**30)}


def test_progress_line_format():
    assert streaming.format_progress(3, 48, 12.34, MEM) == (
        "layer  3/48 [#-------------------]   6% 12.3 s, ~3.1 min left "
        "| anon 312 MiB, file 2.9 GiB")
    assert streaming.format_progress(0, 4, 0.0, None, width=4) == "layer 0/4 [----]   0% 0.0 s"
    assert streaming.format_progress(4, 4, 7200.0, None, width=4) == "layer 4/4 [####] 100% 2.0 h"
    assert streaming.format_size(2**20 * 1.4) == "1 MiB"
    assert streaming.format_duration(59.94) == "59.9 s"


def test_progress_bar_in_a_log_writes_one_line_per_layer():
    out = io.StringIO()
    bar = streaming.ProgressBar(2, stream=out, enabled=True, clock=_Clock([0.0, 0.0, 1.0, 2.0]),
                                memory=lambda: MEM)
    bar.start()
    bar.update(1)
    bar.update(2)
    bar.finish()
    assert out.getvalue().splitlines() == [
        "layer 0/2 [--------------------]   0% 0.0 s | anon 312 MiB, file 2.9 GiB",
        "layer 1/2 [##########----------]  50% 1.0 s, ~1.0 s left | anon 312 MiB, file 2.9 GiB",
        "layer 2/2 [####################] 100% 2.0 s | anon 312 MiB, file 2.9 GiB"]


def test_progress_bar_on_a_terminal_redraws_in_place_and_erases_itself():
    out = _Tty()
    bar = streaming.ProgressBar(2, stream=out, clock=_Clock([0.0, 0.0, 5.0]), memory=None)
    assert bar.enabled  # a terminal: on by default
    bar.start()
    bar.update(1)
    bar.finish()
    first = "layer 0/2 [--------------------]   0% 0.0 s"
    second = "layer 1/2 [##########----------]  50% 5.0 s, ~5.0 s left"
    assert out.getvalue() == ("\r" + first + "\r" + second.ljust(len(first))
                              + "\r" + " " * len(second) + "\r")
    assert "\n" not in out.getvalue()


def test_progress_bar_is_silent_off_a_terminal_unless_asked(tiny, capsys):
    quiet = io.StringIO()
    model = streaming.load_streamed(tiny, numerics="bf16")  # progress None: terminals only
    model.progress_stream = quiet
    model.forward(IDS)
    assert quiet.getvalue() == ""
    model.progress = True
    model.forward(IDS)
    lines = quiet.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines] == ["layer 0/3", "layer 1/3", "layer 2/3",
                                                       "layer 3/3"]
    assert len(model.stats["layer_seconds"]) == 3 and model.stats["seconds"] > 0


# ---------------------------------------------------------------------- command line
def test_run_stream_generates_the_same_tokens(tiny, capsys):
    args = ["run", "--model", tiny, "--token-ids", "1,2,3", "--max-new-tokens", "4",
            "--numerics", "bf16"]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out
    assert cli.main(args + ["--stream", "--progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "layer 3/3 [" in captured.err and "[streamed: peak RSS" in captured.err


@pytest.mark.parametrize("extra, message", [
    (["--progress"], "--progress goes with --stream"),
    (["--stream", "--model", "tiny-moge"], "--stream reads a checkpoint directory"),
])
def test_run_stream_refuses_bad_options(extra, message, capsys):
    assert cli.main(["run", "--token-ids", "1"] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_golden_model_cases_from_a_checkpoint_hold_the_moe_intermediates(tiny, tmp_path):
    """`golden --model DIR` on a MoGE checkpoint: the layer case holds the router logits,
    expert ids and weights, each selected expert's input and output and the combined output,
    equal to a streamed forward's taps."""
    from refimpl.golden.format import find_cases, load_case

    out = tmp_path / "golden"
    assert cli.main(["golden", "--model", tiny, "--token-ids", "1,5,9,2,7", "--layers", "1",
                     "--no-weights", "--numerics", "bf16", "--out", str(out)]) == 0
    cases = {load_case(os.path.join(out, c)).name: load_case(os.path.join(out, c))
             for c in find_cases(str(out))}
    layer = cases["tiny-layer1-bf16"].tensors
    taps = Taps([1])
    streaming.load_streamed(tiny, numerics="bf16", progress=False).forward(IDS, taps=taps)
    experts = np.unique(taps["layers.1.expert_ids"])
    names = ["router_logits", "expert_ids", "expert_weights", "shared_expert_out", "mlp_out"]
    names += [f"experts.{e}.{k}" for e in experts for k in ("token_idx", "in", "out")]
    for name in names:
        assert np.array_equal(_bits(layer[f"layers.1.{name}"]), _bits(taps[f"layers.1.{name}"]))
    assert not any(n.startswith("model.layers.") for n in layer)   # --no-weights


def test_docs_state_the_block_and_prefetch_sizes_of_the_code():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "streaming.md"),
               encoding="utf-8").read()
    assert basic.LINEAR_BLOCK_BYTES == 256 * 2**20 and "(256 MiB)" in doc
    assert streaming.PREFETCH_CHUNK == 8 * 2**20 and "in 8 MiB pieces" in doc
