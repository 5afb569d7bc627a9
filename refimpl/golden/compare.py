"""Judge a candidate (a kernel's outputs) against golden cases.

For every output of a case: max absolute error, max relative error (against |golden|),
mismatch count and ratio (elements outside atol + rtol * |golden|), cosine similarity, max
ULP distance in the output dtype and the worst element's index, all against the golden
output; then a verdict by a criterion:

  allclose           |c - g| <= atol + rtol * |g| everywhere (torch.testing.assert_close;
                     rtol/atol from the manifest's per-dtype tolerance or --rtol/--atol)
  double-thousandth  the Ascend rule: fail only if more than 0.1% (float16/bfloat16) or
                     0.01% (float32/float64) of the elements exceed BOTH an absolute and a
                     relative error of 1e-3 (relative to max(|c|, |g|))
  ascend             the MindStudio rule, against the float64 reference NAME.ref64 (the
                     golden output when there is none): cosine > 0.99; then max abs error
                     < 1e-3 passes; otherwise the fractions of elements whose relative error
                     exceeds 1%, 0.1%, 0.01% must each stay below that fraction (elements with
                     |reference| < 1e-3 are judged on absolute error instead)
  k-error            max |c - ref64| <= k * max |g - ref64| + atol: the candidate's error
                     against the float64 reference is at most k (default 2) times the spec's
                     own low-precision error (FlashAttention's rule)
  ulp                every element within max_ulp units in the last place of the golden
                     output (in its dtype), and at most ceil(max_fraction * n) elements
                     differing from it at all: for outputs whose every rounding is specified,
                     where a correct kernel moves a last bit only where a float32 sum's order
                     decides a rounding (rare), and a kernel with a cast point missing moves
                     a quarter of them (add_rms_norm's y)
  exact              integer outputs (expert ids): equal everywhere

Routing (`--routing`, default tie-tolerant): an expert selection (an output whose criterion
names its `near_ties`) is judged exactly in "exact" mode; in "tie-tolerant" mode it may
differ from the golden only where the golden's choice is a near-tie (a margin below what the
storage dtype resolves, `refimpl.ops.near_ties`). Where the candidate decided a near-tie the
other way, the rows of those tokens in outputs marked `"routing": "rows"` are excluded from
the verdict, and the report counts them. The outputs of experts a differing choice touches
(`"routing": "expert"`: their token lists differ) are never compared; they are "excluded".
Outputs marked `"routing": "selection"` (the MoE block's stage taps: a permutation or a
dispatched buffer of the whole selection) are excluded when the candidate decided any
near-tie the other way.
Tie-tolerant is the default because a correct kernel that sums the router logits in another
order may round a logit to its neighbour and flip such a choice; every wrong router of
tests/test_wrong_kernels.py differs at choices that are not near-ties.

Verdicts: "pass", "fail", or "unusable" (missing output, wrong shape or dtype, NaN where the
golden has none, unreadable file, malformed manifest entry); "not given" (an optional output
the candidate left out) and "excluded" (see routing) do not count. The overall verdict is the
worst; exit status 0 / 1 / 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .format import CRITERIA, DEFAULT_K, EXPORTS, REF_SUFFIX, TENSORS_NAME, ULP_DEFAULTS, \
    GoldenError, LoadedCase, dtype_from_name, find_cases, is_float, load_case, read_tensors_file

BF16 = np.dtype(ml_dtypes.bfloat16)
#: double-thousandth rule: thresholds and the allowed fraction by dtype
DT_THRESHOLD = 1e-3
DT_FRACTION = {"float16": 1e-3, "bfloat16": 1e-3, "float32": 1e-4, "float64": 1e-4}
#: MindStudio rule constants
ASCEND_COSINE = 0.99
ASCEND_MAX_ABS = 1e-3
ASCEND_LEVELS = (1e-2, 1e-3, 1e-4)
ASCEND_SMALL_VALUE = 1e-3
#: MindStudio ULP thresholds (reported, not part of the verdict)
ULP_THRESHOLDS = {"float16": 1, "bfloat16": 1, "float32": 32, "float64": 32}
VERDICTS = ("pass", "fail", "unusable")
#: verdicts of outputs that were not judged (they do not change the case's verdict)
NOT_JUDGED = ("not given", "excluded")
ROUTING_MODES = ("tie-tolerant", "exact")
EXIT_CODES = {"pass": 0, "fail": 1, "unusable": 2}


@dataclass
class Options:
    """Overrides from the command line (None: the case's own)."""

    criterion: str | None = None
    rtol: float | None = None
    atol: float | None = None
    k: float | None = None
    cast: bool = False
    routing: str = "tie-tolerant"


class Unusable(Exception):
    """A candidate output that cannot be judged; the message is the one-line reason."""


class _Missing(Unusable):
    """The candidate has no array for an output."""


@dataclass
class RoutingFlips:
    """Near-ties a candidate decided the other way: the tokens and experts involved."""

    tokens: set
    experts: set


# ---------------------------------------------------------------------- candidates
class Candidate:
    """The outputs of one case from a candidate directory: a case layout
    (tensors.safetensors) or NAME.npy / NAME.bin files named after the outputs."""

    def __init__(self, path: str):
        self.path = path
        self._tensors = None
        self._error = None
        if not os.path.isdir(path):
            self._error = f"candidate {path}: no such directory"
        elif os.path.isfile(os.path.join(path, TENSORS_NAME)):
            try:
                self._tensors = read_tensors_file(os.path.join(path, TENSORS_NAME))
            except GoldenError as exc:
                self._error = str(exc)

    def get(self, name: str, dtype: np.dtype, shape: tuple) -> np.ndarray:
        """The candidate's array for output `name` (Unusable when missing or unreadable)."""
        if self._error:
            raise Unusable(self._error)
        if self._tensors is not None:
            if name not in self._tensors:
                raise _Missing(f"candidate {os.path.join(self.path, TENSORS_NAME)} has no "
                               f"tensor {name}")
            return self._tensors[name]
        npy, bin_ = (os.path.join(self.path, f"{name}.{kind}") for kind in EXPORTS)
        if os.path.isfile(npy):
            try:
                return np.load(npy, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise Unusable(f"{npy}: not a readable .npy file ({exc})") from None
        if os.path.isfile(bin_):
            size = os.path.getsize(bin_)
            count = int(np.prod(shape, dtype=np.int64))
            if size != count * dtype.itemsize:
                raise Unusable(f"{bin_} has {size} bytes but the golden {name} is "
                               f"{list(shape)} of {dtype.name} = {count * dtype.itemsize} bytes")
            return np.fromfile(bin_, dtype=dtype.newbyteorder("<") if dtype != BF16
                               else np.dtype("<u2")).view(dtype).reshape(shape)
        raise _Missing(f"candidate {self.path} has no {name}.npy or {name}.bin")


def as_golden_dtype(a: np.ndarray, dtype: np.dtype, name: str, cast: bool) -> np.ndarray:
    """The candidate array in the golden's dtype, or Unusable. bfloat16 may come as raw
    uint16 bits (or the void dtype np.save writes for ml_dtypes); integer outputs accept
    any integer dtype; other float dtypes are rounded only with cast=True."""
    a = np.asarray(a)
    if a.dtype == dtype:
        return a
    if dtype == BF16 and (a.dtype == np.uint16 or (a.dtype.kind == "V" and a.dtype.itemsize == 2)):
        return a.view(BF16)
    if dtype.kind in "iu" and a.dtype.kind in "iu":
        return a.astype(np.int64)
    is_float_like = a.dtype.kind == "f" or a.dtype == BF16
    if cast and dtype.kind != "i" and is_float_like:
        return a.astype(dtype)
    hint = " (pass --cast to round a float candidate to it)" if is_float_like else ""
    raise Unusable(f"{name}: candidate dtype {a.dtype.name}, golden dtype {dtype.name}{hint}")


# ---------------------------------------------------------------------- metrics
def ulp_distance(c: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Units in the last place between c and g, in their (shared) dtype; uint64. Integers:
    |c - g|. NaN positions give 0 (they are judged separately)."""
    if c.dtype.kind in "iu":
        return np.abs(c.astype(np.int64) - g.astype(np.int64)).astype(np.uint64)
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[c.dtype.itemsize]
    sign = np.uint64(1) << np.uint64(8 * c.dtype.itemsize - 1)
    cb = c.view(bits).astype(np.uint64)
    gb = g.view(bits).astype(np.uint64)
    cs, gs = (cb & sign) != 0, (gb & sign) != 0
    cm, gm = cb & ~sign, gb & ~sign
    same = np.where(cm >= gm, cm - gm, gm - cm)
    out = np.where(cs == gs, same, cm + gm)       # across zero: distance through +-0
    nan = np.isnan(c.astype(np.float64)) | np.isnan(g.astype(np.float64))
    return np.where(nan, np.uint64(0), out)


def _abs_err(c64: np.ndarray, g64: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        d = np.abs(c64 - g64)
    same = (c64 == g64) | (np.isnan(c64) & np.isnan(g64))
    return np.where(same, 0.0, np.where(np.isnan(d), np.inf, d))


def cosine(c64: np.ndarray, g64: np.ndarray) -> float:
    """cos(c, g) in float64; 1 when both are zero, 0 when one is."""
    nc, ng = np.linalg.norm(c64), np.linalg.norm(g64)
    if not (np.isfinite(nc) and np.isfinite(ng)):
        return float("nan")
    if nc == 0 and ng == 0:
        return 1.0
    if nc == 0 or ng == 0:
        return 0.0
    return float(np.dot(c64, g64) / (nc * ng))


def metrics(c: np.ndarray, g: np.ndarray, rtol: float, atol: float) -> dict:
    """The report's numbers for candidate c against golden g (same shape and dtype)."""
    c64, g64 = c.astype(np.float64).reshape(-1), g.astype(np.float64).reshape(-1)
    err = _abs_err(c64, g64)
    tiny = float(ml_dtypes.finfo(g.dtype).tiny) if is_float(g.dtype) else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = err / np.maximum(np.abs(g64), tiny)
    rel = np.where(err == 0, 0.0, rel)
    with np.errstate(invalid="ignore"):
        mismatch = ~((err == 0) | (err <= atol + rtol * np.abs(g64)))   # NaN == NaN: no error
    n = int(err.size)
    worst = int(np.argmax(err)) if n else 0
    ulps = ulp_distance(c.reshape(-1), g.reshape(-1))
    out = {"elements": n,
           "max_abs_err": float(err.max()) if n else 0.0,
           "max_rel_err": float(rel.max()) if n else 0.0,
           "mismatches": int(mismatch.sum()),
           "mismatch_ratio": float(mismatch.sum() / n) if n else 0.0,
           "rtol": rtol, "atol": atol,
           "cosine": cosine(c64, g64),
           "max_ulp": int(ulps.max()) if n else 0,
           "worst_index": [int(i) for i in np.unravel_index(worst, g.shape)] if n else [],
           "worst_candidate": float(c64[worst]) if n else None,
           "worst_golden": float(g64[worst]) if n else None}
    if g.dtype.name in ULP_THRESHOLDS:
        limit = ULP_THRESHOLDS[g.dtype.name]
        out["ulp_threshold"] = limit
        out["over_ulp_threshold"] = int((ulps > limit).sum())
    return out


# ---------------------------------------------------------------------- criteria
def judge_allclose(m: dict) -> tuple:
    ok = m["mismatches"] == 0
    why = (f"{m['mismatches']} of {m['elements']} elements ({100 * m['mismatch_ratio']:.3g}%) "
           f"exceed atol + rtol*|golden| (rtol={m['rtol']:g}, atol={m['atol']:g})")
    return ok, ("all within atol + rtol*|golden|" if ok else why), {}


def judge_exact(m: dict) -> tuple:
    ok = m["mismatches"] == 0 and m["max_abs_err"] == 0
    return ok, ("all equal" if ok else f"{m['mismatches']} of {m['elements']} elements differ"), {}


def judge_routing(c, g, near_tie, mode: str) -> tuple:
    """Expert ids: equal everywhere ("exact"), or everywhere but at near-ties
    ("tie-tolerant"). Returns (ok, why, detail, flipped [T, G] bool)."""
    differ = c.astype(np.int64) != g.astype(np.int64)
    at_ties = differ & near_tie
    n, n_ties, n_at = int(differ.sum()), int(near_tie.sum()), int(at_ties.sum())
    detail = {"mode": mode, "differ": n, "differ_at_near_ties": n_at, "near_ties": n_ties}
    if n == 0:
        return True, f"all equal ({n_ties} near-ties)", detail, differ
    if mode == "tie-tolerant" and n == n_at:
        return (True, f"{n} choices differ, all at near-ties ({n_ties} near-ties in all); the "
                      "routing-dependent outputs of those tokens and experts are excluded",
                detail, differ)
    return (False, f"{n} of {differ.size} choices differ, {n - n_at} of them not at a near-tie "
                   f"({n_ties} near-ties; --routing {mode})", detail, differ)


def judge_double_thousandth(c, g, opts: Options) -> tuple:
    abs_t = DT_THRESHOLD if opts.atol is None else opts.atol
    rel_t = DT_THRESHOLD if opts.rtol is None else opts.rtol
    c64, g64 = c.astype(np.float64).reshape(-1), g.astype(np.float64).reshape(-1)
    err = _abs_err(c64, g64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = err / np.maximum(np.abs(c64), np.abs(g64))
    rel = np.where(err == 0, 0.0, np.where(np.isnan(rel), np.inf, rel))
    bad = int(((err > abs_t) & (rel > rel_t)).sum())
    limit = DT_FRACTION.get(g.dtype.name, 1e-4)
    frac = bad / max(err.size, 1)
    ok = frac <= limit
    detail = {"threshold_abs": abs_t, "threshold_rel": rel_t, "bad": bad, "bad_fraction": frac,
              "allowed_fraction": limit}
    return ok, (f"{bad} elements ({100 * frac:.3g}%) exceed both abs {abs_t:g} and rel "
                f"{rel_t:g}; allowed {100 * limit:g}%"), detail


def judge_ascend(c, ref) -> tuple:
    c64, r64 = c.astype(np.float64).reshape(-1), ref.astype(np.float64).reshape(-1)
    err = _abs_err(c64, r64)
    cos = cosine(c64, r64)
    max_abs = float(err.max()) if err.size else 0.0
    detail = {"cosine": cos, "max_abs_err": max_abs}
    if not cos > ASCEND_COSINE:
        return False, f"cosine {cos:.6f} is not above {ASCEND_COSINE}", detail
    if max_abs < ASCEND_MAX_ABS:
        return True, f"max abs error {max_abs:.3g} < {ASCEND_MAX_ABS:g}", detail
    small = np.abs(r64) < ASCEND_SMALL_VALUE
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(small, err, err / np.abs(r64))
    fractions = {f"{t:g}": float((rel > t).mean()) for t in ASCEND_LEVELS}
    detail["fractions_over"] = fractions
    bad = [f"{100 * f:.3g}% over {float(t) * 100:g}%" for t, f in fractions.items()
           if not f < float(t)]
    if bad:
        return False, "relative error: " + ", ".join(bad), detail
    return True, "relative-error fractions within 1% / 0.1% / 0.01%", detail


def judge_k_error(c, g, ref, k: float, atol: float) -> tuple:
    r64 = ref.astype(np.float64).reshape(-1)
    err_c = float(_abs_err(c.astype(np.float64).reshape(-1), r64).max()) if r64.size else 0.0
    err_s = float(_abs_err(g.astype(np.float64).reshape(-1), r64).max()) if r64.size else 0.0
    bound = k * err_s + atol
    ok = err_c <= bound
    detail = {"k": k, "candidate_err": err_c, "spec_err": err_s, "floor": atol, "bound": bound,
              "ratio": (err_c / err_s) if err_s > 0 else (0.0 if err_c == 0 else float("inf"))}
    return ok, (f"max |c-ref64| {err_c:.3g} {'<=' if ok else '>'} {k:g} x spec's "
                f"{err_s:.3g} + {atol:g}"), detail


def judge_ulp(c, g, max_ulp: int, max_fraction: float) -> tuple:
    ulps = ulp_distance(c.reshape(-1), g.reshape(-1))
    n = int(ulps.size)
    differ, over = int((ulps > 0).sum()), int((ulps > max_ulp).sum())
    allowed = int(np.ceil(max_fraction * n))
    ok = over == 0 and differ <= allowed
    detail = {"max_ulp": max_ulp, "max_fraction": max_fraction, "differ": differ,
              "allowed_to_differ": allowed, "over_max_ulp": over,
              "worst_ulp": int(ulps.max()) if n else 0}
    why = (f"{differ} of {n} elements differ from the golden (allowed {allowed}), "
           f"{over} by more than {max_ulp} ulp")
    return ok, why, detail


# ---------------------------------------------------------------------- one output
def _entry_fields(case: LoadedCase, entry) -> tuple:
    """(name, dtype, shape, stored criterion, tolerance) of an output entry; Unusable with
    one line when the manifest entry is malformed."""
    if not isinstance(entry, dict):
        raise Unusable(f"manifest: a tensors entry is {type(entry).__name__}, not an object")
    name = entry.get("name")
    if not isinstance(name, str) or name not in case.tensors:
        raise Unusable(f"manifest: output entry {name!r} names no tensor of the case")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
        raise Unusable(f"manifest: {name}: shape {shape!r} is not a list of integers")
    try:
        dtype = dtype_from_name(entry.get("dtype"))
    except GoldenError as exc:
        raise Unusable(f"manifest: {name}: {exc}") from None
    stored = entry.get("criterion") or {"name": "allclose"}
    if not isinstance(stored, dict) or stored.get("name") not in CRITERIA + ("exact",):
        raise Unusable(f"manifest: {name}: unknown criterion {stored!r} (known: "
                       f"{', '.join(CRITERIA + ('exact',))})")
    if "k" in stored and not _is_number(stored["k"]):
        raise Unusable(f"manifest: {name}: criterion k {stored['k']!r} is not a number")
    if "max_ulp" in stored and (not isinstance(stored["max_ulp"], int) or
                                isinstance(stored["max_ulp"], bool) or stored["max_ulp"] < 0):
        raise Unusable(f"manifest: {name}: criterion max_ulp {stored['max_ulp']!r} is not a "
                       "non-negative integer")
    if "max_fraction" in stored and not (_is_number(stored["max_fraction"]) and
                                         0 <= stored["max_fraction"] <= 1):
        raise Unusable(f"manifest: {name}: criterion max_fraction {stored['max_fraction']!r} "
                       "is not a number in [0, 1]")
    tol = entry.get("tolerance") or {"rtol": 0.0, "atol": 0.0}
    if (not isinstance(tol, dict)
            or not all(_is_number(tol.get(key)) for key in ("rtol", "atol"))):
        raise Unusable(f"manifest: {name}: tolerance {tol!r} needs numeric rtol and atol")
    routing = entry.get("routing")
    if routing not in (None, "rows", "expert", "selection"):
        raise Unusable(f"manifest: {name}: unknown routing dependence {routing!r}")
    return name, dtype, tuple(shape), stored, tol


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _expert_of(name: str) -> int | None:
    """e of an output named [layers.I.]experts.e.WHAT."""
    parts = name.split(".")
    for i in range(len(parts) - 2):
        if parts[i] == "experts" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def compare_output(case: LoadedCase, entry: dict, cand: Candidate, opts: Options,
                   flips: RoutingFlips | None = None) -> dict:
    """One output judged. `flips`: near-ties the candidate's routing decided the other way
    (tie-tolerant mode), filled in by the routing output and used by those after it."""
    label = entry.get("name") if isinstance(entry, dict) else None
    try:
        name, dtype, shape, stored, tol = _entry_fields(case, entry)
    except Unusable as exc:
        return {"name": str(label), "verdict": "unusable", "reason": str(exc)}
    result = {"name": name, "dtype": entry["dtype"], "shape": list(shape)}
    g = case.tensors[name]
    routing = entry.get("routing")
    if flips and routing == "selection" and (flips.tokens or flips.experts):
        return {**result, "verdict": "excluded",
                "reason": "the candidate decided a near-tie the other way, so its dispatch "
                          "differs (see expert_ids)"}
    if flips and routing == "expert" and _expert_of(name) in flips.experts:
        return {**result, "verdict": "excluded",
                "reason": "the candidate routed other tokens to this expert (see expert_ids)"}
    try:
        c = as_golden_dtype(cand.get(name, dtype, shape), dtype, name, opts.cast)
        if tuple(c.shape) != shape:
            raise Unusable(f"{name}: candidate shape {list(c.shape)}, golden shape {list(shape)}")
        if is_float(dtype):
            cn, gn = np.isnan(c.astype(np.float64)), np.isnan(g.astype(np.float64))
            extra = cn & ~gn
            if extra.any():
                first = [int(i) for i in np.unravel_index(int(np.argmax(extra)), shape)]
                raise Unusable(f"{name}: candidate has {int(extra.sum())} NaN where the golden "
                               f"has none (first at index {first})")
    except _Missing as exc:
        if entry.get("optional"):
            return {**result, "verdict": "not given", "reason": f"optional output ({exc})"}
        return {**result, "verdict": "unusable", "reason": str(exc)}
    except Unusable as exc:
        return {**result, "verdict": "unusable", "reason": str(exc)}

    note = None
    excluded_rows = None
    if flips and routing == "rows" and flips.tokens and g.ndim >= 1:
        excluded_rows = np.zeros(g.shape[0], bool)
        excluded_rows[[t for t in flips.tokens if t < g.shape[0]]] = True
        mask = excluded_rows.reshape((-1,) + (1,) * (g.ndim - 1))
        c = np.where(mask, g, c)   # excluded rows carry no error
        note = (f"{int(excluded_rows.sum())} token rows excluded (routed the other way at a "
                "near-tie)")
    rtol = tol["rtol"] if opts.rtol is None else opts.rtol
    atol = tol["atol"] if opts.atol is None else opts.atol
    m = metrics(c, g, rtol, atol)
    ref_name = stored.get("reference", name + REF_SUFFIX)
    ref = case.tensors.get(ref_name)
    if stored.get("near_ties"):
        near = case.tensors.get(stored["near_ties"])
        if near is None or near.shape != g.shape:
            return {**result, "verdict": "unusable",
                    "reason": f"manifest: {name}: near-tie tensor {stored['near_ties']} is "
                              "missing or misshaped"}
        ok, why, detail, flipped = judge_routing(c, g, near != 0, opts.routing)
        if flips is not None and flipped.any():
            # the experts a differing choice touches hold other tokens than the golden's:
            # their outputs cannot be compared (when the routing fails, it is the verdict)
            flips.experts.update(int(e) for e in np.concatenate([c[flipped], g[flipped]]))
            if ok:  # tie-tolerant, every difference at a near-tie: leave those rows out
                rows = np.flatnonzero(flipped.any(axis=tuple(range(1, flipped.ndim))))
                flips.tokens.update(int(t) for t in rows)
        return {**result, "verdict": "pass" if ok else "fail", "criterion": "routing",
                "reason": why, "metrics": m, "criterion_detail": detail}
    if not is_float(dtype):          # integers: exact, or within max_ulp where stated
        crit = "ulp" if stored["name"] == "ulp" and opts.criterion is None else "exact"
    else:
        crit = opts.criterion or stored["name"]
        if crit == "exact":
            crit = "allclose"
    if crit == "k-error" and ref is None:
        crit, note = "allclose", f"no {ref_name} in the golden: allclose used instead of k-error"
    if crit == "exact":
        ok, why, detail = judge_exact(m)
    elif crit == "allclose":
        ok, why, detail = judge_allclose(m)
    elif crit == "double-thousandth":
        ok, why, detail = judge_double_thousandth(c, g, opts)
    elif crit == "ulp":
        fields = {**ULP_DEFAULTS, **{k: v for k, v in stored.items() if k in ULP_DEFAULTS}}
        ok, why, detail = judge_ulp(c, g, fields["max_ulp"], float(fields["max_fraction"]))
    elif crit == "ascend":
        target = ref if ref is not None else g
        ok, why, detail = judge_ascend(c, target)
        detail["against"] = ref_name if ref is not None else "golden output"
    else:  # k-error (criteria names were checked in _entry_fields and by argparse)
        k = opts.k if opts.k is not None else stored.get("k", DEFAULT_K)
        ok, why, detail = judge_k_error(c, g, ref, float(k), atol)
    if m["max_abs_err"] == float("inf") and ok:
        ok, why = False, "candidate has Inf where the golden is finite"
    out = {**result, "verdict": "pass" if ok else "fail", "criterion": crit, "reason": why,
           "metrics": m, "criterion_detail": detail}
    if note:
        out["note"] = note
    return out


# ---------------------------------------------------------------------- cases and paths
def compare_case(case_path: str, cand_path: str, opts: Options) -> dict:
    """One golden case against one candidate directory."""
    try:
        case = load_case(case_path)
    except GoldenError as exc:
        return {"case": os.path.basename(os.path.normpath(case_path)), "golden": case_path,
                "candidate": cand_path, "verdict": "unusable", "reason": f"golden: {exc}",
                "outputs": []}
    cand = Candidate(cand_path)
    entries = case.entries("output")
    flips = RoutingFlips(set(), set())

    def routes(e) -> bool:
        return isinstance(e, dict) and isinstance(e.get("criterion"), dict) \
            and bool(e["criterion"].get("near_ties"))
    # routing outputs first: what they decided at near-ties says what the others exclude
    judged = {id(e): compare_output(case, e, cand, opts, flips) for e in entries if routes(e)}
    judged.update({id(e): compare_output(case, e, cand, opts, flips)
                   for e in entries if not routes(e)})
    outputs = [judged[id(e)] for e in entries]
    verdict = worst([o["verdict"] for o in outputs]) if outputs else "unusable"
    out = {"case": case.name, "operator": case.manifest.get("operator"),
           "numerics": (case.manifest.get("numerics") or {}).get("mode"),
           "golden": case_path, "candidate": cand_path, "verdict": verdict, "outputs": outputs}
    if not outputs:
        out["reason"] = "the golden case has no outputs"
    return out


def worst(verdicts) -> str:
    """The worst verdict of those judged ("pass" when none was)."""
    judged = [v for v in verdicts if v not in NOT_JUDGED]
    return max(judged, key=VERDICTS.index) if judged else "pass"


def compare_paths(golden: str, candidate: str, opts: Options | None = None) -> dict:
    """The full report of GOLDEN (a case or a directory of cases) against CANDIDATE (the same
    layout, or NAME.npy / NAME.bin files). Path problems give verdict "unusable"."""
    opts = opts or Options()
    if opts.criterion is not None and opts.criterion not in CRITERIA:
        raise GoldenError(f"--criterion {opts.criterion!r}: choose from {', '.join(CRITERIA)}")
    if opts.routing not in ROUTING_MODES:
        raise GoldenError(f"--routing {opts.routing!r}: choose from {', '.join(ROUTING_MODES)}")
    report = {"golden": golden, "candidate": candidate,
              "options": {k: v for k, v in vars(opts).items() if v not in (None, False)}}
    try:
        rels = find_cases(golden)
    except GoldenError as exc:
        return {**report, "verdict": "unusable", "reason": f"golden: {exc}", "cases": []}
    if not rels:
        return {**report, "verdict": "unusable",
                "reason": f"golden: {golden} holds no case (no manifest.json)", "cases": []}
    if not os.path.isdir(candidate):
        return {**report, "verdict": "unusable",
                "reason": f"candidate: {candidate}: no such directory", "cases": []}
    cases = [compare_case(os.path.normpath(os.path.join(golden, r)),
                          os.path.normpath(os.path.join(candidate, r)), opts) for r in rels]
    outputs = [o for c in cases for o in c["outputs"]]
    report.update(verdict=worst([c["verdict"] for c in cases]), cases=cases,
                  summary={v.replace(" ", "_"): sum(o["verdict"] == v for o in outputs)
                           for v in VERDICTS + NOT_JUDGED})
    report["summary"]["cases"] = len(cases)
    return report


# ---------------------------------------------------------------------- text report
def _g(x) -> str:
    return "-" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def _short(o: dict) -> str:
    """The criterion column: its name and the number it turned on."""
    d, crit = o.get("criterion_detail") or {}, o["criterion"]
    if crit == "k-error":
        return f"k-error {d['ratio']:.2f}x (k={d['k']:g})"
    if crit == "double-thousandth":
        return f"double-thousandth {100 * d['bad_fraction']:.3g}%"
    if crit == "ascend":
        return f"ascend cos={d['cosine']:.4f}"
    if crit == "routing":
        return f"routing {d['mode']} ({d['differ']} differ)"
    return crit


def format_report(report: dict) -> str:
    """A readable table per case (reasons spelled out for outputs that do not pass) and one
    verdict line."""
    lines = []
    header = ("output", "dtype", "shape", "max_abs", "max_rel", "mismatch", "cosine", "ulp",
              "worst", "criterion", "verdict")
    for case in report.get("cases", []):
        lines.append(f"case {case['case']} ({case.get('operator') or '?'}, "
                     f"{case.get('numerics') or '?'}): {case['verdict'].upper()}")
        if case.get("reason"):
            lines.append(f"  {case['reason']}")
        rows, notes = [header], []
        for o in case["outputs"]:
            if o["verdict"] in ("unusable",) + NOT_JUDGED:
                notes.append(f"  {o['name']}: {o['verdict'].upper()}: {o['reason']}")
                continue
            m = o["metrics"]
            rows.append((o["name"], o["dtype"], "x".join(map(str, o["shape"])) or "scalar",
                         f"{m['max_abs_err']:.3g}", f"{m['max_rel_err']:.3g}",
                         f"{m['mismatches']} ({100 * m['mismatch_ratio']:.2g}%)",
                         f"{m['cosine']:.6f}", str(m["max_ulp"]),
                         ",".join(map(str, m["worst_index"])), _short(o),
                         o["verdict"].upper()))
            if o["verdict"] != "pass" or o.get("note"):
                notes.append(f"  {o['name']}: {o['criterion']}: {o['reason']}; worst element "
                             f"[{','.join(map(str, m['worst_index']))}] candidate "
                             f"{_g(m['worst_candidate'])}, golden {_g(m['worst_golden'])}"
                             + (f" ({o['note']})" if o.get("note") else ""))
        if len(rows) > 1:
            widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
            for r in rows:
                lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        lines.extend(notes)
    lines.append(verdict_line(report))
    return "\n".join(lines)


def verdict_line(report: dict) -> str:
    verdict = report["verdict"].upper()
    if "summary" not in report:
        return f"verdict: {verdict}: {report.get('reason', '')}"
    s = report["summary"]
    parts = [f"{s['pass']} passed", f"{s['fail']} failed"]
    if s["unusable"]:
        parts.append(f"{s['unusable']} unusable")
    judged = sum(s[v] for v in VERDICTS)
    others = [f"{s[k]} {v}" for v in NOT_JUDGED if s[(k := v.replace(' ', '_'))]]
    bad = [c["case"] for c in report["cases"] if c["verdict"] != "pass"]
    tail = f"; not passing: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}" if bad else ""
    return (f"verdict: {verdict} ({', '.join(parts)} of {judged} outputs "
            f"in {s['cases']} case{'s' if s['cases'] != 1 else ''}"
            f"{'; ' + ', '.join(others) if others else ''}{tail})")


__all__ = ["Options", "Candidate", "compare_paths", "compare_case", "compare_output",
           "format_report", "verdict_line", "metrics", "ulp_distance", "cosine",
           "judge_k_error", "judge_ascend", "judge_double_thousandth", "judge_routing",
           "EXIT_CODES", "ROUTING_MODES", "RoutingFlips"]
