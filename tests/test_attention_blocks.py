"""The spec's attention works a block of queries at a time (long contexts in bounded memory);
the blocking must not change a number.

Bit for bit where that is a property of the arithmetic: under OpenBLAS's generic x86-64
kernels (OPENBLAS_CORETYPE=Prescott, one thread: the BLAS the committed suite is made with),
which compute each row of a product the same whatever the row count, every block size gives
the unblocked bits, in every mode, causal or not, prefill and chunked. On the host's own BLAS
(AVX2 kernels can move a float32 sum's last bit with the row count, as they do with the thread
count) the blocked result is within the float32 summation error of the unblocked one. Memory:
the peak of a blocked call is a small multiple of one block's scores, not [Hq, T, S].
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from refimpl import ops
from refimpl.numerics import storage_dtype

MODES = ("fp64", "fp32", "bf16", "fp16")


def test_query_blocks_are_aligned_and_cover_the_queries():
    blocks = ops.attention_query_blocks
    assert blocks(5, 5, 4) == [(0, 5)]
    assert blocks(100, 100, 4, block_rows=8)[:2] == [(0, 8), (8, 16)]
    assert blocks(100, 100, 4, block_rows=8)[-1] == (88, 100)   # a 4-row tail joins the block
    assert blocks(100, 100, 4, block_rows=13)[1] == (8, 16)     # rounded down to 8
    assert blocks(3, 3, 4, block_rows=1) == [(0, 3)]
    # the default budget: one head's float32 scores at S = 32768 in 32 MiB -> 256 rows
    at_32k = blocks(32768, 32768, 4)
    assert {b - a for a, b in at_32k} == {256} and at_32k[-1][1] == 32768
    for T in (1, 7, 8, 9, 127, 129, 300):
        for rows in (8, 16, 40):
            got = blocks(T, T, 4, block_rows=rows)
            assert got[0][0] == 0 and got[-1][1] == T
            assert all(b == c for (_, b), (c, _) in zip(got, got[1:]))
            assert all(a % 8 == 0 for a, _ in got)
            assert len(got) == 1 or min(b - a for a, b in got) >= 8


_BITS_SCRIPT = r"""
import json, sys
import numpy as np
from refimpl import ops
from refimpl.numerics import storage_dtype
rng = np.random.default_rng(7)
report = []
for mode in ("fp64", "fp32", "bf16", "fp16"):
    dt = storage_dtype(mode)
    for T, S, causal in ((1, 1, True), (129, 129, True), (127, 300, True), (200, 200, False),
                         (64, 64, True)):
        q = rng.standard_normal((T, 4, 32)).astype(dt)
        k = rng.standard_normal((S, 2, 32)).astype(dt)
        v = rng.standard_normal((S, 2, 32)).astype(dt)
        whole = ops.attention(q, k, v, causal=causal, block_rows=1 << 30)
        for rows in (8, 16, 40, 128):
            got = ops.attention(q, k, v, causal=causal, block_rows=rows)
            diff = int(np.sum(got.view(np.uint8) != whole.view(np.uint8)))
            report.append([mode, T, S, causal, rows, diff])
print(json.dumps(report))
"""


def test_blocked_attention_is_the_unblocked_bits_under_the_generic_blas(tmp_path):
    env = dict(os.environ, OPENBLAS_CORETYPE="Prescott", OPENBLAS_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _BITS_SCRIPT], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert len(report) == 4 * 5 * 4
    differing = [r for r in report if r[-1]]
    assert not differing, f"blocked != unblocked (mode, T, S, causal, rows, bytes): {differing}"


@pytest.mark.parametrize("mode", MODES)
def test_blocked_attention_is_within_summation_error_on_this_blas(mode):
    rng = np.random.default_rng(3)
    dt = storage_dtype(mode)
    T, S = 300, 333
    q = rng.standard_normal((T, 4, 64)).astype(dt)
    k, v = (rng.standard_normal((S, 2, 64)).astype(dt) for _ in range(2))
    whole = ops.attention(q, k, v, block_rows=1 << 30).astype(np.float64)
    got = ops.attention(q, k, v, block_rows=16).astype(np.float64)
    # a sum's last bits may move: at most one ulp of the output's rounding plus the worst-case
    # error of an S-term sum of p * v in the accumulation dtype (sum p = 1)
    eps = np.finfo(np.float64 if mode == "fp64" else np.float32).eps
    bound = (np.spacing(np.abs(whole).astype(dt)).astype(np.float64)
             + S * eps * float(np.max(np.abs(v.astype(np.float64)))))
    assert np.all(np.abs(got - whole) <= bound), float(np.max(np.abs(got - whole) / bound))


def test_blocked_attention_memory_is_bounded_by_a_block(monkeypatch):
    """At T = S = 2048 with 8 heads the unblocked scores would be 8 x 2048 x 2048 float32
    (128 MiB); with a 1 MiB block budget the call's peak stays a few MiB."""
    monkeypatch.setattr(sys.modules["refimpl.ops.attention"], "ATTENTION_BLOCK_BYTES", 2**20)
    rng = np.random.default_rng(0)
    T, Hq, Hkv, D = 2048, 8, 2, 64
    dt = storage_dtype("bf16")
    q = rng.standard_normal((T, Hq, D)).astype(dt)
    k, v = (rng.standard_normal((T, Hkv, D)).astype(dt) for _ in range(2))
    tracemalloc.start()
    ops.attention(q, k, v)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    inputs_f32 = (q.size + k.size + v.size) * 4          # the float32 copies of q, k, v
    assert peak < inputs_f32 + q.nbytes + 8 * 2**20, peak / 2**20
