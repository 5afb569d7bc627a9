"""The golden case format: one directory per case, `manifest.json` + `tensors.safetensors`.

golden/README.md documents the format for readers in other languages. In short:

    CASE/manifest.json          what the case is (operator, parameters, numerics, seed,
                                command) and, per tensor: name, role, dtype, shape, sha256 of
                                the raw little-endian bytes, tolerance and criterion
    CASE/tensors.safetensors    every tensor, bfloat16/float16 stored as such (BF16/F16),
                                integer ids as I64, int8/int32 (W8A8) as I8/I32
    CASE/NAME.npy, NAME.bin     optional exports (`--export npy,bin`): .npy, and headerless
                                little-endian row-major .bin (bfloat16 as raw uint16 bits)

Roles: "input" (what the operator is given), "output" (what it must produce, computed by the
spec in the case's numerics mode), "reference" (`NAME.ref64`: the same output computed in
float64 from the same rounded inputs, for the "k x the low-precision error" criterion).

A case directory is written under a temporary name and renamed into place, so a reader sees
a complete case or none. The files depend only on the command's options: no time stamps.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from .. import numerics
from ..errors import CheckpointError, RefimplError
from ..io.safetensors_io import DTYPES as _DTYPE_BY_CODE
from ..io.safetensors_io import read_safetensors, write_safetensors

FORMAT_NAME = "refimpl-golden"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSORS_NAME = "tensors.safetensors"
ROLES = ("input", "output", "reference")
#: suffix of the float64 reference of an output
REF_SUFFIX = ".ref64"
EXPORTS = ("npy", "bin")

#: dtype name -> safetensors dtype code (all little-endian)
SAFETENSORS_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32",
                     "float64": "F64", "int64": "I64", "int32": "I32", "int8": "I8"}

#: torch.testing.assert_close defaults by dtype (GOLDEN-PRACTICE.md): (rtol, atol)
DEFAULT_TOLERANCES = {"float16": (1e-3, 1e-5), "bfloat16": (1.6e-2, 1e-5),
                      "float32": (1.3e-6, 1e-5), "float64": (1e-7, 1e-7)}
#: default k of the k-error criterion (FlashAttention's tests use 2)
DEFAULT_K = 2.0
CRITERIA = ("allclose", "double-thousandth", "ascend", "k-error", "ulp")
#: defaults of the ulp criterion's fields (a manifest states its own)
ULP_DEFAULTS = {"max_ulp": 1, "max_fraction": 1.0}

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class GoldenError(RefimplError):
    """A golden case or candidate is missing, corrupt or does not match its manifest."""


# ---------------------------------------------------------------------- dtypes and bytes
def dtype_name(dtype) -> str:
    """'bfloat16', 'float16', 'float32', 'float64', 'int64', 'int32' or 'int8'."""
    name = np.dtype(dtype).name
    if name not in SAFETENSORS_CODES:
        raise GoldenError(f"dtype {name} cannot be stored in a golden case (supported: "
                          f"{', '.join(SAFETENSORS_CODES)})")
    return name


def dtype_from_name(name: str) -> np.dtype:
    if name not in SAFETENSORS_CODES:
        raise GoldenError(f"unknown dtype {name!r} in a manifest (supported: "
                          f"{', '.join(SAFETENSORS_CODES)})")
    return _DTYPE_BY_CODE[SAFETENSORS_CODES[name]]


def is_float(dtype) -> bool:
    return np.dtype(dtype).name in DEFAULT_TOLERANCES


def raw_bytes(array: np.ndarray) -> memoryview:
    """The array's bytes, row-major, little-endian (what .bin files and sha256 hold)."""
    a = np.ascontiguousarray(array)
    if sys.byteorder == "big" or a.dtype.byteorder == ">":  # pragma: no cover - big-endian
        a = a.byteswap().view(a.dtype.newbyteorder("<"))
    return memoryview(a.reshape(-1).view(np.uint8))


def sha256_of(array: np.ndarray) -> str:
    """sha256 (hex) of the raw little-endian bytes of the array."""
    return hashlib.sha256(raw_bytes(array)).hexdigest()


def default_tolerance(dtype) -> dict:
    """{"rtol", "atol"}: torch assert_close's defaults for float dtypes, exact for integers."""
    name = np.dtype(dtype).name
    rtol, atol = DEFAULT_TOLERANCES.get(name, (0.0, 0.0))
    return {"rtol": rtol, "atol": atol}


def bin_description(dtype) -> str:
    """How to read a tensor's headerless .bin file."""
    name = dtype_name(dtype)
    if name == "bfloat16":
        return ("bfloat16 as raw uint16 bits, little-endian (float32 value = bits << 16)")
    return f"{name}, little-endian"


def npy_array(array: np.ndarray) -> np.ndarray:
    """What the .npy export holds: the array itself, bfloat16 as its raw uint16 bits."""
    return array.view(np.uint16) if array.dtype == np.dtype(ml_dtypes.bfloat16) else array


# ---------------------------------------------------------------------- cast points
def cast_points(operators) -> dict:
    """{operator: text} from THE cast-point table, `refimpl.numerics.CAST_POINTS`."""
    missing = [op for op in operators if op not in numerics.CAST_POINTS]
    if missing:  # a builder names an operator the table lacks; tests catch this
        raise RuntimeError(f"refimpl.numerics.CAST_POINTS has no row {missing}")
    return {op: numerics.cast_point_text(op) for op in operators}


def numerics_entry(mode: str, operators) -> dict:
    """The manifest's "numerics" object of a mode and the operators a case uses."""
    storage = numerics.storage_dtype(mode)
    return {"mode": mode, "storage_dtype": storage.name,
            "accumulation_dtype": numerics.accum_dtype(storage).name,
            "round": "round to nearest even to the storage dtype, continue from that value",
            "cast_points": cast_points(operators)}


# ---------------------------------------------------------------------- safetensors
def write_tensors_file(path: str, tensors: list) -> None:
    """Write [(name, array)] as a safetensors file (tensors ordered by alignment, largest
    itemsize first, then as given, so each starts aligned; header padded to 8 bytes)."""
    order = sorted(range(len(tensors)), key=lambda i: (-tensors[i][1].dtype.itemsize, i))
    arrays = {tensors[i][0]: tensors[i][1] for i in order}
    specs = {name: (a.shape, a.dtype) for name, a in arrays.items()}
    write_safetensors(path, specs, arrays.__getitem__, metadata={"format": FORMAT_NAME})


def read_tensors_file(path: str) -> dict:
    """name -> array of a safetensors file (BF16/F16/F32/F64/I64/I32); GoldenError (one line
    naming the file) when it is missing, truncated or its header is corrupt."""
    try:
        return read_safetensors(path)
    except CheckpointError as exc:
        raise GoldenError(str(exc)) from None


# ---------------------------------------------------------------------- cases
@dataclass
class Tensor:
    """One tensor of a case. `criterion` (outputs only): {"name": ..., "k": ...};
    `produced_by`: {"op": ..., "args": [...]} for outputs of an operator boundary."""

    name: str
    array: np.ndarray
    role: str
    criterion: dict | None = None
    produced_by: dict | None = None
    note: str | None = None
    tolerance: dict | None = None
    routing: str | None = None   # "rows" | "expert": depends on the expert selection
    optional: bool = False       # an output a candidate may leave out


@dataclass
class Case:
    """A case before it is written: a name, the manifest fields and its tensors."""

    name: str
    operator: str
    description: str
    parameters: dict
    numerics: dict
    seed: int | None
    source: dict
    command: str
    criterion: dict
    tensors: list = field(default_factory=list)

    def add(self, name, array, role, **kw) -> "Tensor":
        t = Tensor(name, np.ascontiguousarray(array), role, **kw)
        self.tensors.append(t)
        return t


def tensor_entry(t: Tensor, export=()) -> dict:
    if t.role not in ROLES:
        raise ValueError(f"unknown role {t.role!r}")
    if not _NAME_RE.match(t.name):
        raise ValueError(f"tensor name {t.name!r} is not a plain file name")
    entry = {"name": t.name, "role": t.role, "dtype": dtype_name(t.array.dtype),
             "shape": [int(s) for s in t.array.shape], "sha256": sha256_of(t.array)}
    if t.role == "output":
        entry["tolerance"] = t.tolerance or default_tolerance(t.array.dtype)
    if t.role == "output":
        entry["criterion"] = t.criterion or ({"name": "allclose"} if is_float(t.array.dtype)
                                             else {"name": "exact"})
    if t.routing:
        entry["routing"] = t.routing
    if t.optional:
        entry["optional"] = True
    if t.produced_by:
        entry["produced_by"] = t.produced_by
    if t.note:
        entry["note"] = t.note
    if export:
        entry["files"] = {kind: f"{t.name}.{kind}" for kind in EXPORTS if kind in export}
        if "npy" in export:
            entry["npy_dtype"] = npy_array(t.array).dtype.name
        if "bin" in export:
            entry["bin_dtype"] = bin_description(t.array.dtype)
    return entry


def build_manifest(case: Case, export=()) -> dict:
    from .. import __version__

    names = [t.name for t in case.tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"case {case.name}: duplicate tensor names")
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "case": case.name,
        "operator": case.operator, "description": case.description,
        "parameters": case.parameters, "numerics": case.numerics, "seed": case.seed,
        "source": case.source, "refimpl_version": __version__, "command": case.command,
        "criterion": case.criterion,
        "byte_order": "little-endian, row-major (C order)",
        "tensors_file": TENSORS_NAME,
    }
    if export:
        manifest["export"] = {
            "npy": "NAME.npy: NumPy .npy of the tensor; bfloat16 stored as its raw uint16 bits",
            "bin": "NAME.bin: headerless raw bytes, little-endian, row-major; element type "
                   "from the tensor's dtype (bfloat16 as raw uint16 bits); shape from 'shape'",
        }
        manifest["export"] = {k: v for k, v in manifest["export"].items() if k in export}
    manifest["tensors"] = [tensor_entry(t, export) for t in case.tensors]
    return manifest


def manifest_text(manifest: dict) -> str:
    """The manifest as JSON text: objects indented one space per level, lists of scalars
    (shapes, token ids) on one line; ASCII only; a trailing newline."""
    return _json(manifest, 0) + "\n"


def _json(obj, level: int) -> str:
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(obj, dict) and obj:
        flat = json.dumps(obj, ensure_ascii=True, separators=(", ", ": "))
        if len(flat) <= 60 and not any(isinstance(v, (dict, list)) for v in obj.values()):
            return flat
        items = [f"{inner}{json.dumps(str(k))}: {_json(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        items = [inner + _json(v, level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=True, separators=(", ", ": "))


def write_case(out_dir: str, case: Case, export=()) -> str:
    """Write `out_dir/case.name/` atomically (temporary directory, then rename); an existing
    case directory of that name is replaced. Returns the case path."""
    export = tuple(export)
    for kind in export:
        if kind not in EXPORTS:
            raise GoldenError(f"--export {kind}: choose from {', '.join(EXPORTS)}")
    manifest = build_manifest(case, export)
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, case.name)
    token = secrets.token_hex(4)
    tmp = os.path.join(out_dir, f".{case.name}.tmp-{token}")
    os.mkdir(tmp)
    try:
        write_tensors_file(os.path.join(tmp, TENSORS_NAME),
                           [(t.name, t.array) for t in case.tensors])
        for t in case.tensors:
            if "npy" in export:
                np.save(os.path.join(tmp, f"{t.name}.npy"), npy_array(t.array),
                        allow_pickle=False)
            if "bin" in export:
                with open(os.path.join(tmp, f"{t.name}.bin"), "wb") as fh:
                    fh.write(raw_bytes(t.array))
        with open(os.path.join(tmp, MANIFEST_NAME), "w", encoding="ascii") as fh:
            fh.write(manifest_text(manifest))
        old = None
        if os.path.lexists(final):
            old = os.path.join(out_dir, f".{case.name}.old-{token}")
            os.rename(final, old)
        os.rename(tmp, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@dataclass
class LoadedCase:
    path: str
    manifest: dict
    tensors: dict  # name -> array

    @property
    def name(self) -> str:
        return self.manifest.get("case", os.path.basename(self.path))

    def entries(self, role=None) -> list:
        return [e for e in self.manifest["tensors"] if role is None or e["role"] == role]


def read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST_NAME)
    try:
        with open(file, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise GoldenError(f"{path}: no {MANIFEST_NAME} (not a golden case)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GoldenError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise GoldenError(f"{file}: not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GoldenError(f"{file}: format_version {manifest.get('format_version')!r}; this "
                          f"refimpl reads version {FORMAT_VERSION}")
    if not isinstance(manifest.get("tensors"), list):
        raise GoldenError(f"{file}: no \"tensors\" list")
    return manifest


def load_case(path: str, verify: bool = True) -> LoadedCase:
    """A case directory read back; with verify, every tensor's dtype, shape and sha256 are
    checked against the manifest (GoldenError naming the first that differs)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise GoldenError(f"{path}: no such golden case directory")
    manifest = read_manifest(path)
    tensors = read_tensors_file(os.path.join(path, manifest.get("tensors_file", TENSORS_NAME)))
    for i, entry in enumerate(manifest["tensors"]):
        if not isinstance(entry, dict):
            raise GoldenError(f"{path}: manifest tensors[{i}] is {type(entry).__name__}, not "
                              "an object")
        for key in ("name", "role", "dtype", "shape"):
            if key not in entry:
                raise GoldenError(f"{path}: manifest tensors[{i}] "
                                  f"({entry.get('name', 'unnamed')}) has no {key!r}")
        if entry["role"] not in ROLES:
            raise GoldenError(f"{path}: manifest tensors[{i}] ({entry['name']}): role "
                              f"{entry['role']!r} is not one of {', '.join(ROLES)}")
        name = entry.get("name")
        if name not in tensors:
            raise GoldenError(f"{path}: tensor {name} of the manifest is missing from "
                              f"{TENSORS_NAME}")
        a = tensors[name]
        if a.dtype.name != entry.get("dtype") or list(a.shape) != entry.get("shape"):
            raise GoldenError(f"{path}: tensor {name} is {list(a.shape)} of {a.dtype.name} but "
                              f"the manifest says {entry.get('shape')} of {entry.get('dtype')}")
        if verify and sha256_of(a) != entry.get("sha256"):
            raise GoldenError(f"{path}: tensor {name} does not match its sha256 in the "
                              "manifest (corrupt or edited file)")
    return LoadedCase(path, manifest, tensors)


def find_cases(path: str) -> list:
    """Case directories under `path` (itself if it is one), sorted, as paths relative to it
    ('.' for path itself)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise GoldenError(f"{path}: no such directory")
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return ["."]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if MANIFEST_NAME in files:
            found.append(os.path.relpath(root, path))
            dirs[:] = []
    return sorted(found)


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "TENSORS_NAME", "ROLES",
           "REF_SUFFIX", "EXPORTS", "CRITERIA", "ULP_DEFAULTS", "DEFAULT_TOLERANCES", "DEFAULT_K",
           "GoldenError", "Case", "Tensor", "LoadedCase", "write_case", "load_case",
           "find_cases", "read_manifest", "read_tensors_file", "write_tensors_file",
           "sha256_of", "raw_bytes", "default_tolerance", "cast_points", "numerics_entry",
           "dtype_from_name", "dtype_name", "is_float", "npy_array"]
