"""The safetensors file format, read by memory map and written one tensor at a time.

Layout of a ``.safetensors`` file (https://github.com/huggingface/safetensors):

    [8 bytes]  N, unsigned 64-bit little-endian: the length of the header
    [N bytes]  JSON object: name -> {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]},
               plus an optional "__metadata__": {str: str}; padded with spaces
    [rest]     the tensor bytes, little-endian, row-major; a tensor's bytes are
               data[b:e] counted from the end of the header, and the tensors tile the data
               section in order with no gap and no overlap.

`read_safetensors` validates the header and returns each tensor as a read-only view of one
memory map of the file (BF16 viewed as ``ml_dtypes.bfloat16``): nothing is read until it is
used, and a tensor used in its stored dtype is never copied into anonymous memory.
`write_safetensors` writes the header first, then asks for each tensor just before writing
it, so a checkpoint larger than memory can be written; it writes to a temporary name and
renames.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys

import ml_dtypes
import numpy as np

from ..errors import CheckpointError

#: safetensors dtype code -> numpy dtype (little-endian)
DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),  # token ids and expert ids in golden cases; int64 deq_scale
    "I32": np.dtype("<i4"),  # quant_bias of W8A8 checkpoints
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),    # W8A8 weights and input offsets, C8 caches
    "U8": np.dtype("u1"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CODES = {dt: code for code, dt in DTYPES.items()}
#: refuse headers larger than this (the reference implementation's limit is 100 MB)
MAX_HEADER_BYTES = 100_000_000


def dtype_code(dtype) -> str:
    """The safetensors code ('BF16', 'F16', 'F32', 'I8', ...) of a numpy dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _CODES:
        raise CheckpointError(f"dtype {dtype.name} cannot be written to safetensors by refimpl "
                              f"(supported: {', '.join(d.name for d in _CODES)})")
    return _CODES[dtype]


def read_header(path) -> tuple[dict, int, int]:
    """(entries, data_start, file_size) of a safetensors file, validated.

    entries maps tensor name -> (dtype, shape tuple, begin, end) with offsets counted from
    data_start, in file order. CheckpointError (one line naming the file) for a truncated
    file, a corrupt header, an unknown dtype, offsets that overlap, leave gaps, are out of
    order or run past the end of the file, bytes after the last tensor, or a byte count that
    is not shape x itemsize.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated file ({size} bytes, shorter than the "
                                      "8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupt header (header length {n} bytes is "
                                      f"over the {MAX_HEADER_BYTES}-byte limit)")
            if 8 + n > size:
                raise CheckpointError(f"{path}: truncated file (header length {n} bytes runs "
                                      f"past the end of the {size}-byte file)")
            raw = fh.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a safetensors file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt header (not valid JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header (a JSON object is expected, found "
                              f"{type(header).__name__})")
    data_start = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise CheckpointError(f"{path}: corrupt header (__metadata__ is not an object)")
            continue
        entries[name] = _entry(path, name, info)
    # The tensors must tile the data section in order: no overlap, no gap.
    ordered = sorted(entries.items(), key=lambda item: (item[1][2], item[1][3]))
    offset = 0
    for name, (_, _, begin, end) in ordered:
        if begin < offset:
            raise CheckpointError(f"{path}: corrupt header (tensor {name} data_offsets "
                                  f"[{begin}, {end}] overlap the previous tensor, which ends at "
                                  f"{offset})")
        if begin > offset:
            raise CheckpointError(f"{path}: corrupt header (tensor {name} data_offsets "
                                  f"[{begin}, {end}] leave a gap after byte {offset})")
        offset = end
    if data_start + offset > size:
        last = ordered[-1][0]
        raise CheckpointError(f"{path}: truncated file (tensor {last} ends at byte "
                              f"{data_start + offset} but the file has {size} bytes)")
    if data_start + offset < size:
        raise CheckpointError(f"{path}: corrupt file ({size - data_start - offset} bytes after "
                              "the last tensor's data; the tensors must end the file)")
    entries = {name: entry for name, entry in ordered}
    return entries, data_start, size


def _entry(path: str, name: str, info) -> tuple:
    """(dtype, shape, begin, end) of one header entry, validated."""
    def bad(msg):
        return CheckpointError(f"{path}: corrupt header (tensor {name}: {msg})")

    if not isinstance(info, dict):
        raise bad("entry is not an object")
    code = info.get("dtype")
    if code not in DTYPES:
        raise bad(f"unknown or unsupported dtype {code!r}; refimpl reads "
                  f"{', '.join(DTYPES)}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    offsets = info.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if end < begin:
        raise bad(f"data_offsets [{begin}, {end}] end before they begin")
    dtype = DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise bad(f"holds {end - begin} bytes but shape {shape} of {code} needs {expected}")
    return dtype, tuple(shape), begin, end


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors(path) -> dict:
    """name -> read-only array viewing a memory map of the file (no tensor data is read).

    Every array's base chain ends in the file's ``mmap.mmap``; BF16 tensors have dtype
    ``ml_dtypes.bfloat16``.
    """
    path = os.fspath(path)
    entries, data_start, size = read_header(path)
    if data_start == size:  # no tensor bytes at all (mmap cannot map an empty range)
        return {name: np.zeros(shape, dtype) for name, (dtype, shape, _, _) in entries.items()}
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # outlives the fd
    buffer = np.frombuffer(mapped, dtype=np.uint8)                   # [size] bytes, read-only
    out = {}
    for name, (dtype, shape, begin, end) in entries.items():
        raw = buffer[data_start + begin:data_start + end]
        out[name] = raw.view(dtype).reshape(shape)
    return out


def is_memory_mapped(array) -> bool:
    """True when the array's memory belongs to a memory-mapped file (base chain ends in an
    ``mmap.mmap``), i.e. it was not copied into anonymous memory."""
    base = array
    while base is not None:
        if isinstance(base, mmap.mmap):
            return True
        if isinstance(base, np.memmap) and getattr(base, "_mmap", None) is not None:
            return True
        base = getattr(base, "base", None) if isinstance(base, np.ndarray) else (
            base.obj if isinstance(base, memoryview) else None)
    return False


def write_safetensors(path, specs: dict, produce, metadata: dict | None = None) -> int:
    """Write a safetensors file; return its size in bytes.

    specs: name -> (shape, dtype), in the order the tensors are written. produce(name) is
    called once per tensor, just before it is written, and must return an array of exactly
    that shape and dtype (so only one tensor is held at a time). The header is padded with
    spaces to a multiple of 8 bytes, as the reference writer does, so every tensor starts
    8-byte aligned when the tensors before it are. The file is written to a temporary name,
    flushed to disk, and renamed.
    """
    path = os.fspath(path)
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, (shape, dtype) in specs.items():
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_code(dtype), "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for name, (shape, dtype) in specs.items():
                array = produce(name)
                if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                    raise CheckpointError(
                        f"tensor {name}: expected shape {list(shape)} of {np.dtype(dtype).name}, "
                        f"got {list(array.shape)} of {array.dtype.name}")
                fh.write(_little_endian_bytes(array))
                del array
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return 8 + len(raw) + offset


def _little_endian_bytes(array: np.ndarray):
    """A buffer of the array's bytes, row-major and little-endian, copied only if needed."""
    array = np.ascontiguousarray(array)
    if sys.byteorder == "big" or array.dtype.byteorder == ">":
        array = array.byteswap()  # pragma: no cover - big-endian hosts
    return array.reshape(-1).view(np.uint8)


__all__ = ["DTYPES", "dtype_code", "read_header", "read_safetensors", "is_memory_mapped",
           "write_safetensors", "MAX_HEADER_BYTES"]
