"""`compare`: wrong kernels are caught, correct ones computed differently pass, unusable
candidates give exit 2 and a clear verdict line (never a traceback); metrics and criteria."""

import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from refimpl import ops
from refimpl.golden.compare import Options, compare_paths, judge_ascend, judge_double_thousandth, \
    judge_k_error, judge_ulp, metrics, ulp_distance
from refimpl.config import preset
from refimpl.golden.format import TENSORS_NAME, find_cases, load_case, write_tensors_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "golden")
BF16 = np.dtype(ml_dtypes.bfloat16)


def case_path(name: str) -> str:
    return os.path.join(GOLDEN, name.split("-")[0] + "-" + name.split("-")[1], name)


def tensors(name: str) -> dict:
    return load_case(case_path(name)).tensors


def cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "REFIMPL_DEBUG"}
    return subprocess.run([sys.executable, "-m", "refimpl", "compare", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def write_npy(directory, arrays: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    for name, a in arrays.items():
        np.save(os.path.join(directory, f"{name}.npy"), a)
    return str(directory)


def verdict(golden, candidate, **opts) -> dict:
    return compare_paths(str(golden), str(candidate), Options(**opts))


# ---------------------------------------------------------------------- candidate kernels
def acc_of(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def attention_once(q, k, v, mask_offset=0):
    """Attention in float32 (float64 for fp64), rounded once; mask_offset shifts the causal
    diagonal (1: each query also sees the next key, the classic off-by-one)."""
    acc = acc_of(q.dtype)
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    head = np.arange(Hq) // (Hq // Hkv)
    s = np.einsum("thd,shd->hts", q.astype(acc), k.astype(acc)[:, head]) * acc(D ** -0.5)
    allowed = np.arange(S)[None, :] <= np.arange(T)[:, None] + S - T + mask_offset
    s = np.where(allowed[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v.astype(acc)[:, head]).astype(q.dtype)


def attention_naive_fp16(q, k, v):
    """Softmax in float16 without subtracting the row max: exp overflows to inf."""
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    head = np.arange(Hq) // (Hq // Hkv)
    s = (np.einsum("thd,shd->hts", q.astype(np.float32), k.astype(np.float32)[:, head])
         * D ** -0.5).astype(np.float16)
    allowed = np.arange(S)[None, :] <= np.arange(T)[:, None] + S - T
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.where(allowed[None], np.exp(s), np.float16(0))
        p = e / e.sum(-1, keepdims=True, dtype=np.float16)
    return np.einsum("hts,shd->thd", p.astype(np.float32),
                     v.astype(np.float32)[:, head]).astype(np.float16)


def rope_once(x, cos, sin):
    acc = acc_of(x.dtype)
    c, s = cos.astype(acc)[:, None, :], sin.astype(acc)[:, None, :]
    xa = x.astype(acc)
    return (xa * c + ops.rotate_half(xa) * s).astype(x.dtype)


def swiglu_once(x, wg, wu, wd):
    acc = acc_of(x.dtype)
    xa = x.astype(acc)
    g, u = xa @ wg.astype(acc).T, xa @ wu.astype(acc).T
    return ((g / (1 + np.exp(-g)) * u) @ wd.astype(acc).T)


def rms_norm_once(x, w, eps):
    acc = acc_of(x.dtype)
    xa = x.astype(acc)
    return (xa / np.sqrt((xa * xa).mean(-1, keepdims=True) + eps) * w.astype(acc)).astype(x.dtype)


def moe_once(t, groups, renormalise=False):
    """The MoGE block in float32 rounded once, routing on the storage-dtype router logits
    (as a kernel behind a bf16 router GEMM does); renormalise=True is the classic bug."""
    x = t["x"]
    logits = ops.linear(x, t["gate.weight"])
    ids, w = ops.moge_route(logits, t["router_scale"], groups)
    if renormalise:
        w = w / w.sum(-1, keepdims=True)
    y = swiglu_once(x, *(t[f"shared_expert.{p}_proj.weight"] for p in ("gate", "up", "down")))
    for tok in range(x.shape[0]):
        for g in range(groups):
            e = ids[tok, g]
            y[tok] += w[tok, g] * swiglu_once(
                x[tok:tok + 1], *(t[f"experts.{p}_proj.weight"][e] for p in ("gate", "up",
                                                                              "down")))[0]
    return y.astype(x.dtype)


def rope_candidate(name, fn):
    t = tensors(name)
    return {out: fn(t[out[0]], t["cos"], t["sin"]) for out in ("q_rope", "k_rope")}


# ---------------------------------------------------------------------- wrong kernels
def interleaved_rope(name):
    return rope_candidate(name, ops.apply_rope_interleaved)


def renormalised_route(name):
    t = tensors(name)
    ids, w = ops.moge_route(t["router_logits"], t["router_scale"], preset("tiny-moge").num_groups)
    return {"expert_ids": ids, "expert_weights": (w / w.sum(-1, keepdims=True)).astype(w.dtype)}


def renormalised_moe(name):
    return {"y": moe_once(tensors(name), preset("tiny-moge").num_groups, renormalise=True)}


def causal_off_by_one(name):
    t = tensors(name)
    return {"o": attention_once(t["q"], t["k"], t["v"], mask_offset=1)}


def decode_drops_last_key(name):
    t = tensors(name)
    return {"o": attention_once(t["q"], t["k"], t["v"], mask_offset=-1)}


#: bug -> (golden case, candidate builder)
WRONG = {
    "interleaved-rope": ("tiny-dense-rope-bf16", interleaved_rope),
    "interleaved-rope-long-fp32": ("tiny-moge-rope-long-fp32", interleaved_rope),
    "renormalised-moge-route": ("tiny-moge-moge-route-bf16", renormalised_route),
    "renormalised-moe": ("tiny-moge-moe-bf16", renormalised_moe),
    "causal-off-by-one": ("tiny-dense-attention-prefill-bf16", causal_off_by_one),
    "decode-drops-last-key": ("tiny-moge-attention-decode-fp16", decode_drops_last_key),
}


@pytest.mark.parametrize("bug", sorted(WRONG))
def test_a_wrong_kernel_fails(tmp_path, bug):
    golden, build = WRONG[bug]
    cand = write_npy(tmp_path / "cand", build(golden))
    report = verdict(case_path(golden), cand)
    assert report["verdict"] == "fail", report
    failing = [o for o in report["cases"][0]["outputs"] if o["verdict"] == "fail"]
    assert failing and all(o["metrics"]["max_abs_err"] > 1e-2 for o in failing)


def test_wrong_kernels_fail_on_the_command_line(tmp_path):
    golden, build = WRONG["interleaved-rope"]
    result = cli(case_path(golden), write_npy(tmp_path / "rope", build(golden)))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("verdict: FAIL")
    assert "q_rope: k-error: max |c-ref64|" in result.stdout
    golden, build = WRONG["renormalised-moe"]
    result = cli(case_path(golden), write_npy(tmp_path / "moe", build(golden)))
    assert result.returncode == 1 and "verdict: FAIL" in result.stdout


def test_naive_float16_softmax_overflows_to_nan_and_is_unusable(tmp_path):
    t = tensors("tiny-dense-attention-prefill-fp16")
    cand = write_npy(tmp_path / "c", {"o": attention_naive_fp16(t["q"], t["k"], t["v"])})
    result = cli(case_path("tiny-dense-attention-prefill-fp16"), cand)
    assert result.returncode == 2, result.stdout
    assert "o: UNUSABLE: o: candidate has" in result.stdout and "NaN" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("verdict: UNUSABLE")
    assert "Traceback" not in result.stdout + result.stderr


# ---------------------------------------------------------------------- correct kernels
def _correct(name):
    t = tensors(name)
    op = load_case(case_path(name)).manifest["operator"]
    if op == "attention":
        return {"o": attention_once(t["q"], t["k"], t["v"])}
    if op == "rope":
        return rope_candidate(name, rope_once)
    if op == "swiglu":
        ws = (t["gate_proj.weight"], t["up_proj.weight"], t["down_proj.weight"])
        return {"y": swiglu_once(t["x"], *ws).astype(t["x"].dtype)}
    if op == "rms_norm":
        return {"y": rms_norm_once(t["x"], t["weight"], preset("tiny-dense").rms_norm_eps)}
    if op == "moe":
        return {"y": moe_once(t, preset("tiny-moge").num_groups)}
    raise AssertionError(op)


CORRECT = [f"tiny-{p}-{op}-{mode}" for p, op in
           (("dense", "attention-prefill"), ("moge", "attention-decode"), ("dense", "rope"),
            ("moge", "rope-long"), ("dense", "swiglu"), ("moge", "rms-norm"), ("moge", "moe"))
           for mode in ("bf16", "fp16", "fp32")]


@pytest.mark.parametrize("name", CORRECT)
def test_a_correct_kernel_computed_differently_passes(tmp_path, name):
    cand = _correct(name)
    golden = tensors(name)
    report = verdict(case_path(name), write_npy(tmp_path / "c", cand))
    assert report["verdict"] == "pass", [o["reason"] for c in report["cases"]
                                         for o in c["outputs"]]
    if not name.endswith("fp32"):  # really a different computation, not the spec's bits
        assert any(not np.array_equal(cand[k], golden[k]) for k in cand)


def test_allclose_would_reject_a_correct_bf16_rope_and_k_error_does_not(tmp_path):
    """Why rope/attention/swiglu default to k-error: torch's bf16 atol 1e-5 fails a correct
    kernel that rounds once instead of at the spec's cast points."""
    for name in ("tiny-dense-rope-bf16", "tiny-dense-attention-prefill-bf16"):
        cand = write_npy(tmp_path / name, _correct(name))
        assert verdict(case_path(name), cand, criterion="allclose")["verdict"] == "fail"
        assert verdict(case_path(name), cand)["verdict"] == "pass"


def test_a_correct_kernel_passes_on_the_command_line_as_bin_files(tmp_path):
    name = "tiny-moge-attention-prefill-bf16"
    d = tmp_path / "bin"
    d.mkdir()
    _correct(name)["o"].view(np.uint16).tofile(d / "o.bin")
    result = cli(case_path(name), d)
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().splitlines()[-1] == (
        "verdict: PASS (1 passed, 0 failed of 1 outputs in 1 case)")


def test_the_goldens_own_npy_export_passes(tmp_path):
    """--export npy writes bfloat16 as uint16 bits; compare reads them back as bfloat16."""
    result = subprocess.run([sys.executable, "-m", "refimpl", "golden", "--preset", "tiny-moge",
                             "--ops", "moge_route,rope", "--tokens", "4", "--export", "npy",
                             "--out", tmp_path / "g"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    cases = sorted(os.listdir(tmp_path / "g"))
    assert cases == ["tiny-moge-moge-route-bf16", "tiny-moge-rope-bf16",
                     "tiny-moge-rope-long-bf16"]
    for case in cases:
        os.makedirs(tmp_path / "c" / case)
        for f in os.listdir(tmp_path / "g" / case):
            if f.endswith(".npy"):
                shutil.copy(tmp_path / "g" / case / f, tmp_path / "c" / case / f)
    assert np.load(tmp_path / "c" / "tiny-moge-rope-bf16" / "q_rope.npy").dtype == np.uint16
    report = verdict(tmp_path / "g", tmp_path / "c")
    assert report["verdict"] == "pass" and report["summary"]["pass"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-dense-attention-prefill-bf16",
                                  "tiny-moge-attention-decode-bf16", "tiny-dense-rope-bf16",
                                  "tiny-dense-rms-norm-bf16", "tiny-dense-swiglu-bf16",
                                  "tiny-moge-moe-bf16", "tiny-moge-moge-route-bf16"])
def test_the_numba_kernels_pass(tmp_path, name):
    from refimpl import kernels as K  # a hard dependency: failing to import is a failure
    t = tensors(name)
    c = preset("tiny-moge")
    op = load_case(case_path(name)).manifest["operator"]
    if op == "attention":
        cand = {"o": K.attention(t["q"], t["k"], t["v"], causal=True)}
    elif op == "rope":
        cand = {n: K.apply_rope(t[n[0]], t["cos"], t["sin"]) for n in ("q_rope", "k_rope")}
    elif op == "rms_norm":
        cand = {"y": K.rms_norm(t["x"], t["weight"], c.rms_norm_eps)}
    elif op == "swiglu":
        cand = {"y": K.swiglu(t["x"], t["gate_proj.weight"], t["up_proj.weight"],
                              t["down_proj.weight"])}
    elif op == "moge_route":
        ids, w = K.moge_route(t["router_logits"], t["router_scale"], c.num_groups)
        cand = {"expert_ids": ids, "expert_weights": w}
    else:
        experts = [tuple(t[f"experts.{p}_proj.weight"][e] for p in ("gate", "up", "down"))
                   for e in range(c.num_experts)]
        cand = {"y": K.moe_block(t["x"], t["gate.weight"], t["router_scale"], experts,
                                 [t[f"shared_expert.{p}_proj.weight"]
                                  for p in ("gate", "up", "down")], c.num_groups)}
    report = verdict(case_path(name), write_npy(tmp_path / "c", cand))
    assert report["verdict"] == "pass", [o["reason"] for o in report["cases"][0]["outputs"]]


# ---------------------------------------------------------------------- unusable input
def _last_line(result):
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_unusable_candidates_exit_2_with_a_verdict_line(tmp_path):
    name = "tiny-dense-attention-decode-bf16"
    good = tensors(name)["o"]
    cases = {
        "shape": ({"o": good.reshape(4, 16)}, "candidate shape [4, 16], golden shape [1, 4, 16]"),
        "missing": ({"other": good}, "has no o.npy or o.bin"),
        "nan": ({"o": np.where(np.arange(64).reshape(1, 4, 16) == 5, np.nan,
                               good.astype(np.float32)).astype(BF16)},
                "candidate has 1 NaN where the golden has none (first at index [0, 0, 5])"),
        "dtype": ({"o": good.astype(np.float32)},
                  "candidate dtype float32, golden dtype bfloat16 (pass --cast"),
    }
    for label, (arrays, fragment) in cases.items():
        result = cli(case_path(name), write_npy(tmp_path / label, arrays))
        assert result.returncode == 2, (label, result.stdout)
        assert fragment in result.stdout, (label, result.stdout)
        assert _last_line(result).startswith("verdict: UNUSABLE"), label
    result = cli(case_path(name), tmp_path / "dtype", "--cast")
    assert result.returncode == 0, result.stdout


def test_unusable_files_and_paths(tmp_path):
    name = "tiny-dense-attention-decode-bf16"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "o.bin").write_bytes(b"\0" * 100)
    result = cli(case_path(name), tmp_path / "bin")
    assert result.returncode == 2 and "o.bin has 100 bytes but the golden o is [1, 4, 16] of " \
                                      "bfloat16 = 128 bytes" in result.stdout
    (tmp_path / "npy").mkdir()
    (tmp_path / "npy" / "o.npy").write_bytes(b"not a numpy file")
    result = cli(case_path(name), tmp_path / "npy")
    assert result.returncode == 2 and "not a readable .npy file" in result.stdout
    result = cli(tmp_path / "no-golden", tmp_path / "npy")
    assert result.returncode == 2
    assert _last_line(result) == f"verdict: UNUSABLE: golden: {tmp_path / 'no-golden'}: no such " \
                                 "directory"
    result = cli(case_path(name), tmp_path / "no-candidate")
    assert result.returncode == 2 and "no such directory" in _last_line(result)
    (tmp_path / "empty").mkdir()
    result = cli(tmp_path / "empty", tmp_path / "npy")
    assert result.returncode == 2 and "holds no case" in _last_line(result)
    # a golden whose tensors were edited is refused, not trusted
    shutil.copytree(case_path(name), tmp_path / "edited")
    data = bytearray((tmp_path / "edited" / TENSORS_NAME).read_bytes())
    data[-2] ^= 0x40
    (tmp_path / "edited" / TENSORS_NAME).write_bytes(bytes(data))
    result = cli(tmp_path / "edited", tmp_path / "npy")
    assert result.returncode == 2 and "sha256" in result.stdout
    # a truncated candidate safetensors file
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / TENSORS_NAME).write_bytes(b"\x10\0\0\0\0\0\0\0{")
    result = cli(case_path(name), tmp_path / "st")
    assert result.returncode == 2 and "truncated file" in result.stdout
    result = cli(case_path(name), tmp_path / "npy", "--criterion", "nope")
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_inf_is_a_failure_not_unusable(tmp_path):
    name = "tiny-dense-attention-decode-bf16"
    o = tensors(name)["o"].copy()
    o[0, 0, 0] = np.inf
    result = cli(case_path(name), write_npy(tmp_path / "c", {"o": o}))
    assert result.returncode == 1, result.stdout


# ---------------------------------------------------------------------- layouts and report
def test_a_directory_of_cases_against_case_layout_candidates(tmp_path):
    """GOLDEN a directory of cases, CANDIDATE the same layout: the golden itself passes; one
    broken case fails and is named."""
    cand = tmp_path / "cand"
    shutil.copytree(os.path.join(GOLDEN, "tiny-dense"), cand)
    result = cli(os.path.join(GOLDEN, "tiny-dense"), cand)
    assert result.returncode == 0, result.stdout[-2000:]
    n = len(find_cases(os.path.join(GOLDEN, "tiny-dense")))
    assert n >= 42
    assert _last_line(result).startswith("verdict: PASS (") and f"in {n} cases" in _last_line(result)
    bad = cand / "tiny-dense-rope-fp16"
    t = load_case(str(bad)).tensors
    t["q_rope"] = ops.apply_rope_interleaved(t["q"], t["cos"], t["sin"])
    write_tensors_file(str(bad / TENSORS_NAME), list(t.items()))
    result = cli(os.path.join(GOLDEN, "tiny-dense"), cand, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["verdict"] == "fail"
    assert [c["case"] for c in report["cases"] if c["verdict"] != "pass"] == [
        "tiny-dense-rope-fp16"]
    (q,) = [o for c in report["cases"] if c["case"] == "tiny-dense-rope-fp16"
            for o in c["outputs"] if o["name"] == "q_rope"]
    for key in ("max_abs_err", "max_rel_err", "mismatches", "mismatch_ratio", "cosine",
                "max_ulp", "worst_index"):
        assert key in q["metrics"]
    assert q["criterion"] == "k-error" and q["criterion_detail"]["ratio"] > 10


def test_json_report_of_unusable_input_is_strict_json(tmp_path):
    name = "tiny-dense-attention-decode-bf16"
    o = tensors(name)["o"].astype(np.float32)
    o[0, 0, 0] = np.nan
    result = cli(case_path(name), write_npy(tmp_path / "c", {"o": o.astype(BF16)}), "--json")
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report["verdict"] == "unusable" and report["summary"]["unusable"] == 1
    result = cli(tmp_path / "none", tmp_path, "--json")
    assert result.returncode == 2 and json.loads(result.stdout)["verdict"] == "unusable"


def test_options_override_the_manifest(tmp_path):
    name = "tiny-dense-rope-bf16"
    cand = write_npy(tmp_path / "c", _correct(name))
    assert verdict(case_path(name), cand, criterion="allclose")["verdict"] == "fail"
    assert verdict(case_path(name), cand, criterion="allclose", atol=0.05)["verdict"] == "pass"
    assert verdict(case_path(name), cand, criterion="double-thousandth",
                   atol=0.05)["verdict"] == "pass"
    # the spec's own output against itself: ratio 1, so k = 0.5 fails and k = 1 passes
    spec = write_npy(tmp_path / "s", {n: tensors(name)[n] for n in ("q_rope", "k_rope")})
    assert verdict(case_path(name), spec, k=1.0)["verdict"] == "pass"
    assert verdict(case_path(name), spec, k=0.5)["verdict"] == "fail"
    # the spec's fp32 output against the float64 reference passes the MindStudio rule
    fp32 = "tiny-dense-attention-prefill-fp32"
    spec = write_npy(tmp_path / "f", {"o": tensors(fp32)["o"]})
    report = verdict(case_path(fp32), spec, criterion="ascend")
    assert report["verdict"] == "pass"
    assert report["cases"][0]["outputs"][0]["criterion_detail"]["against"] == "o.ref64"


def test_text_report_lists_metrics_and_reasons(tmp_path):
    name = "tiny-moge-moge-route-bf16"
    result = cli(case_path(name), write_npy(tmp_path / "c", renormalised_route(name)))
    lines = result.stdout.splitlines()
    assert lines[0] == f"case {name} (moge_route, bf16): FAIL"
    assert lines[1].split() == ["output", "dtype", "shape", "max_abs", "max_rel", "mismatch",
                                "cosine", "ulp", "worst", "criterion", "verdict"]
    assert lines[2].split()[0] == "expert_ids" and lines[2].split()[-1] == "PASS"
    assert lines[3].split()[0] == "expert_weights" and lines[3].split()[-1] == "FAIL"
    assert any(line.startswith("  expert_weights: allclose: ") and "worst element" in line
               for line in lines)


# ---------------------------------------------------------------------- metrics and rules
def test_ulp_distance():
    one = np.array([1.0], dtype=BF16)
    nxt = np.array([1.0078125], dtype=BF16)                  # 1 + 2^-7, the next bfloat16
    assert ulp_distance(nxt, one)[0] == 1
    tiny = np.array([np.float32(1e-45)], dtype=np.float32)  # the smallest subnormal
    assert ulp_distance(tiny, -tiny)[0] == 2                  # across zero
    assert ulp_distance(np.array([-0.0]), np.array([0.0]))[0] == 0
    assert ulp_distance(np.array([3, 7]), np.array([3, 4]))[1] == 3
    f16 = np.array([1.0, 2.0], dtype=np.float16)
    assert list(ulp_distance(f16, np.array([1.0, 2.001953125], dtype=np.float16))) == [0, 1]


def test_metrics():
    g = np.array([[1.0, 2.0], [4.0, -8.0]], dtype=np.float32)
    c = np.array([[1.0, 2.0], [4.5, -8.0]], dtype=np.float32)
    m = metrics(c, g, rtol=0.1, atol=0.0)
    assert m["max_abs_err"] == 0.5 and m["max_rel_err"] == 0.125
    assert m["worst_index"] == [1, 0] and m["mismatches"] == 1 and m["mismatch_ratio"] == 0.25
    assert m["max_ulp"] == 2 ** 20                            # 0.5 at 4.0 is 2^20 float32 ulps
    assert abs(m["cosine"] - np.dot(c.ravel(), g.ravel()) / np.linalg.norm(c)
               / np.linalg.norm(g)) < 1e-12
    assert metrics(g, g, 0, 0)["mismatches"] == 0 and metrics(g, g, 0, 0)["cosine"] == 1.0


def test_double_thousandth_rule():
    g = np.ones(10000, dtype=np.float16)
    for dtype, allowed in ((np.float16, 10), (np.float32, 1)):
        for bad in (allowed, allowed + 1):
            c = g.astype(dtype).copy()
            c[:bad] += dtype(0.01)                              # over abs and rel 1e-3
            c[bad:bad + 50] += dtype(0.0009)                    # under both: never counted
            ok, _, d = judge_double_thousandth(c, g.astype(dtype), Options())
            assert ok == (bad == allowed) and d["bad"] == bad, (dtype, bad)


def test_ascend_rule():
    ref = np.linspace(1, 2, 1000)
    assert judge_ascend(ref + 5e-4, ref)[0]                    # max abs < 1e-3
    assert not judge_ascend(-ref, ref)[0]                      # cosine
    c = ref.copy()
    c[:5] *= 1.02                                              # 0.5% over 1%: 0.5% < 1% passes
    assert judge_ascend(c, ref)[0] is False                    # but 0.5% over 0.01% fails
    c = ref * (1 + 5e-5)                                       # all under 0.01% relative
    c[0] += 0.5
    assert not judge_ascend(c, ref)[0]                         # 1 of 1000 over 0.1%: not below
    c = ref * (1 + 5e-5)
    assert judge_ascend(c, ref)[0]


def test_k_error_rule():
    ref = np.zeros(4)
    spec = np.array([0.01, 0, 0, 0])
    ok, _, d = judge_k_error(np.array([0.0, 0.02, 0, 0]), spec, ref, 2.0, 0.0)
    assert ok and d["ratio"] == 2.0
    assert not judge_k_error(np.array([0.0, 0.021, 0, 0]), spec, ref, 2.0, 0.0)[0]
    assert judge_k_error(np.array([0.0, 0.021, 0, 0]), spec, ref, 2.0, 1e-3)[0]


@pytest.mark.parametrize("label, edit, fragment", [
    ("no role", lambda m: m["tensors"][0].pop("role"), "has no 'role'"),
    ("not an object", lambda m: m["tensors"].__setitem__(0, "x"), "is str, not an object"),
    ("bad role", lambda m: m["tensors"][0].__setitem__("role", "weight"), "role 'weight'"),
    ("text tolerance", lambda m: next(e for e in m["tensors"] if e["role"] == "output")
     .__setitem__("tolerance", {"rtol": "0.01", "atol": 0}), "needs numeric rtol and atol"),
    ("unknown criterion", lambda m: next(e for e in m["tensors"] if e["role"] == "output")
     .__setitem__("criterion", {"name": "close-enough"}), "unknown criterion"),
    ("text k", lambda m: next(e for e in m["tensors"] if e["role"] == "output")
     .__setitem__("criterion", {"name": "k-error", "k": "two"}), "is not a number"),
])
def test_a_malformed_manifest_makes_that_case_unusable_and_the_others_are_judged(
        tmp_path, label, edit, fragment):
    golden = tmp_path / "g"
    for name in ("tiny-dense-rope-bf16", "tiny-moge-moe-bf16"):
        shutil.copytree(case_path(name), golden / name)
    shutil.copytree(golden, tmp_path / "c")          # the golden outputs as the candidate
    manifest = golden / "tiny-dense-rope-bf16" / "manifest.json"
    m = json.loads(manifest.read_text())
    edit(m)
    manifest.write_text(json.dumps(m))
    result = cli(golden, tmp_path / "c")
    assert result.returncode == 2, (label, result.stdout)
    assert "Traceback" not in result.stdout + result.stderr
    report = verdict(str(golden), str(tmp_path / "c"))
    by_case = {c["case"]: c for c in report["cases"]}
    assert by_case["tiny-moge-moe-bf16"]["verdict"] == "pass"
    bad = next(c for c in report["cases"] if c["case"] != "tiny-moge-moe-bf16")
    assert bad["verdict"] == "unusable"
    text = bad.get("reason") or " ".join(o["reason"] for o in bad["outputs"]
                                         if o["verdict"] == "unusable")
    assert fragment in text and "\n" not in text, (label, text)


def test_ulp_criterion_counts_moved_elements_and_bounds_the_distance():
    g = np.arange(1, 2001, dtype=np.float32).astype(BF16)
    bits = g.view(np.uint16)
    one = bits.copy()
    one[7] += 1                                          # one element 1 ulp away
    ok, why, d = judge_ulp(one.view(BF16), g, 2, 1e-3)   # 2000 elements: 2 may differ
    assert ok and d["differ"] == 1 and d["allowed_to_differ"] == 2, why
    three = one.copy()
    three[[100, 200]] += 1                               # 3 differ > 2 allowed
    ok, why, _ = judge_ulp(three.view(BF16), g, 2, 1e-3)
    assert not ok and "3 of 2000" in why
    far = bits.copy()
    far[5] += 3                                          # one element 3 ulps away
    ok, why, d = judge_ulp(far.view(BF16), g, 2, 1e-3)
    assert not ok and d["over_max_ulp"] == 1
    ok, _, _ = judge_ulp(g, g, 0, 0.0)
    assert ok


@pytest.mark.parametrize("field, value, fragment", [
    ("max_ulp", -1, "max_ulp"), ("max_ulp", 1.5, "max_ulp"), ("max_fraction", 2, "max_fraction"),
    ("max_fraction", "x", "max_fraction")])
def test_malformed_ulp_criterion_is_unusable(tmp_path, field, value, fragment):
    src = os.path.join(GOLDEN, "tiny-dense", "tiny-dense-add-rms-norm-bf16")
    case = tmp_path / "case"
    shutil.copytree(src, case)
    manifest = json.loads((case / "manifest.json").read_text())
    for e in manifest["tensors"]:
        if e["name"] == "y":
            assert e["criterion"]["name"] == "ulp"
            e["criterion"][field] = value
    (case / "manifest.json").write_text(json.dumps(manifest))
    report = compare_paths(str(case), src)
    y = [o for c in report["cases"] for o in c["outputs"] if o["name"] == "y"][0]
    assert y["verdict"] == "unusable" and fragment in y["reason"], y
