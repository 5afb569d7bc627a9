"""Run a checkpoint larger than memory: memory-mapped shards, one layer at a time.

    model = refimpl.io.streaming.load_streamed("ckpt/", numerics="bf16", progress=True)
    logits = model.forward(ids)          # [T, V]; model.stats has per-layer times and memory

`load_streamed` reads the headers only (validated as `refimpl.io.checkpoint.load_weights`) and
builds a `StreamedModel`: a lazy `refimpl.Model` whose weights are a `StreamedWeights`
mapping of the memory-mapped tensors. During a forward

* each tensor is read from the file (page cache) when an operator uses it; MoE experts are
  asked for only when routing selected them (`refimpl.ops.moe_block`), so an unselected
  expert is never read; in the numerics of the stored dtype nothing is converted, and
  `refimpl.ops.linear` converts an oversized weight (the LM head) a block of rows at a time;
* each tensor is checked for NaN/Inf the first time it is used (instead of the whole file
  before the first token, as `load_model` does), unless `allow_nonfinite`;
* after a layer, its pages are unmapped from the process (`madvise(MADV_DONTNEED)`): the
  file-backed resident set stays about one layer, and the kernel may drop them from the page
  cache; the next layer's dense weights are announced with `MADV_WILLNEED`, so the disk reads
  ahead while the current layer computes;
* a progress bar per layer goes to stderr (when it is a terminal, or when asked).

Memory is read from /proc/self/status: `memory_status()` (RssAnon, RssFile, VmHWM ...),
`PeakSampler` (peaks of a process, sampled by a thread), `resident_bytes(array)` (pages of an
array mapped in this process, from /proc/self/pagemap). Linux only; elsewhere they report
nothing and the model still runs.
"""

from __future__ import annotations

import mmap
import re
import sys
import threading
import time
from collections.abc import Mapping

import numpy as np

from ..errors import CheckpointError
from ..model import Model
from ..numerics import storage_dtype
from .checkpoint import check_all_finite, load_weights

PAGE = mmap.PAGESIZE
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.\d+)\.")
#: /proc/<pid>/status fields reported by `memory_status`, and the keys they get
STATUS_FIELDS = {"RssAnon": "rss_anon", "RssFile": "rss_file", "RssShmem": "rss_shmem",
                 "VmRSS": "vm_rss", "VmHWM": "vm_hwm"}


# ---------------------------------------------------------------------- memory accounting
def memory_status(pid="self") -> dict:
    """Resident memory of a process in bytes, from /proc/<pid>/status.

    rss_anon: anonymous (heap, NumPy arrays); rss_file: file-backed pages mapped in (the
    checkpoint's pages, the libraries); vm_rss = rss_anon + rss_file + rss_shmem; vm_hwm: the
    peak of vm_rss. {} where /proc is not available (or the process has ended).
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            lines = fh.readlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        field, _, value = line.partition(":")
        if field in STATUS_FIELDS:
            out[STATUS_FIELDS[field]] = int(value.split()[0]) * 1024  # reported in kB
    return out


def memory_line(status: dict | None = None) -> str:
    """'peak RSS 3.1 GiB (VmHWM), now RssAnon 312 MiB, RssFile 1.5 GiB' ('' without /proc)."""
    m = memory_status() if status is None else status
    if "vm_hwm" not in m:
        return ""
    return (f"peak RSS {format_size(m['vm_hwm'])} (VmHWM), now RssAnon "
            f"{format_size(m.get('rss_anon', 0))}, RssFile {format_size(m.get('rss_file', 0))}")


def reset_peak(pid="self") -> bool:
    """Reset the process's VmHWM to its current RSS (writes 5 to /proc/<pid>/clear_refs);
    False where that is not possible."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """The largest values of `memory_status(pid)` seen by a thread polling every `interval`
    seconds (and once at start and stop).

        with PeakSampler() as peaks:
            model.forward(ids)
        peaks.peak["rss_anon"]

    The kernel keeps only the peak of the total (VmHWM); the anonymous and file-backed peaks
    come from sampling, so a temporary that lives for less than `interval` can be missed.
    """

    def __init__(self, pid="self", interval: float = 0.005):
        self.pid, self.interval = pid, interval
        self.peak: dict = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = None

    def sample(self) -> dict:
        status = memory_status(self.pid)
        for key, value in status.items():
            self.peak[key] = max(value, self.peak.get(key, 0))
        self.samples += 1
        return status

    def _run(self):
        while not self._stop.wait(self.interval):
            if not self.sample():
                return  # the process has ended

    def start(self) -> "PeakSampler":
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self.peak

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------- mapped pages
def _mapped_span(array):
    """(mmap object, start, end): the byte range [start, end) of the memory map that `array`
    views, or None when the array is not a view of an `mmap.mmap`."""
    if not isinstance(array, np.ndarray):
        return None
    base, root = array, None
    while isinstance(base, np.ndarray):
        root, base = base, base.base
    if isinstance(base, memoryview):  # np.frombuffer(mmap) keeps a memoryview of the map
        base = base.obj
    if not isinstance(base, mmap.mmap) or root is None or array.size == 0:
        return None
    low, high = np.lib.array_utils.byte_bounds(array)
    origin = np.lib.array_utils.byte_bounds(root)[0]
    return base, low - origin, high - origin


def _advise(array, advice) -> int:
    span = _mapped_span(array)
    if span is None or advice is None:
        return 0
    mapped, start, end = span
    first = start // PAGE * PAGE                   # madvise wants a page-aligned start
    mapped.madvise(advice, first, end - first)
    return end - first


def release(array) -> int:
    """Unmap the pages of a memory-mapped array from this process (madvise MADV_DONTNEED).

    The data stays in the file (and in the page cache while the kernel keeps it); the next
    access maps it in again. Whole pages are released, so a page shared with a neighbouring
    tensor is released too (and mapped again if that tensor is used). Returns the bytes
    advised (0 for an array that is not memory-mapped).
    """
    return _advise(array, getattr(mmap, "MADV_DONTNEED", None))


#: bytes per MADV_WILLNEED call: the kernel reads at most its readahead window (a few MiB)
#: per call, so a larger range is announced in pieces
PREFETCH_CHUNK = 8 * 2**20


def prefetch(array) -> int:
    """Ask the kernel to read a memory-mapped array's pages into the page cache without
    mapping them (madvise MADV_WILLNEED, PREFETCH_CHUNK bytes per call). The calls return
    once the reads are queued, which can take a while when the disk's queue is full: see
    `Prefetcher` for doing it on a thread. Returns the bytes advised."""
    span = _mapped_span(array)
    advice = getattr(mmap, "MADV_WILLNEED", None)
    if span is None or advice is None:
        return 0
    mapped, start, end = span
    first = start // PAGE * PAGE
    for offset in range(first, end, PREFETCH_CHUNK):
        mapped.madvise(advice, offset, min(PREFETCH_CHUNK, end - offset))
    return end - first


class Prefetcher:
    """A daemon thread running the jobs handed to `submit`, in order: reading the next layer
    ahead while this one computes (madvise holds the GIL only per call; NumPy releases it)."""

    def __init__(self):
        import queue

        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                job()
            except Exception:  # noqa: BLE001 - a read-ahead is advice: the forward reports errors
                pass
            finally:
                self._queue.task_done()

    def submit(self, job) -> None:
        """Run job() on the thread (its exceptions are dropped)."""
        self._queue.put(job)

    def wait(self) -> None:
        """Until everything submitted has been advised."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


def resident_bytes(array) -> int | None:
    """Bytes of the pages covering a memory-mapped array that are mapped in this process now
    (present bits of /proc/self/pagemap). None where pagemap is not readable or the array is
    not memory-mapped. Pages may sit in the page cache without being mapped here."""
    span = _mapped_span(array)
    if span is None:
        return None
    low, high = np.lib.array_utils.byte_bounds(array)
    first, last = low // PAGE, (high - 1) // PAGE
    try:
        with open("/proc/self/pagemap", "rb") as fh:
            fh.seek(first * 8)
            raw = fh.read((last - first + 1) * 8)
    except OSError:
        return None
    entries = np.frombuffer(raw, dtype="<u8")
    return int(np.count_nonzero(entries >> np.uint64(63))) * PAGE


# ---------------------------------------------------------------------- the weights
class StreamedWeights(Mapping):
    """name -> memory-mapped tensor, recording which tensors are read and releasing their pages.

    `counts[name]` is how many times the tensor was asked for (`in`, iteration and `len` do
    not count): a test can see that only the routed experts were read. With `check_finite`
    each tensor is checked for NaN/Inf (`refimpl.io.checkpoint.check_all_finite`, a block at a
    time) the first time it is asked for. With `release_pages`, the pages the check read are
    released after it (the embedding's check reads the whole table; the lookup needs T rows),
    and asking for an expert releases the previous expert's pages (the MoE block runs one
    selected expert at a time), so the file-backed resident set holds one expert, not all the
    layer's. Releasing is never needed for correctness: a released page is mapped again from
    the file when read.
    """

    def __init__(self, arrays: dict, check_finite: bool = True, release_pages: bool = True):
        self.arrays = arrays
        self.check_finite, self.release_pages = check_finite, release_pages
        self.counts: dict = {}
        self.checked: set = set()
        self._checking: dict = {}    # name -> Event while the read-ahead thread checks it
        self._layers: dict = {}
        self._experts: dict = {}     # 'model.layers.i.mlp.experts.e' -> its tensor names
        self._expert = None          # the expert asked for last
        self.globals: list = []      # embedding, final norm, LM head
        for name in arrays:
            m = _LAYER_RE.match(name)
            if m:
                self._layers.setdefault(int(m.group(1)), []).append(name)
            else:
                self.globals.append(name)
            m = _EXPERT_RE.match(name)
            if m:
                self._experts.setdefault(m.group(1), []).append(name)

    def __getitem__(self, name):
        array = self.arrays[name]
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.check_finite and name not in self.checked:
            busy = self._checking.get(name)
            if busy is not None:  # the read-ahead thread is checking it: wait, do not redo
                busy.wait()
        if self.check_finite and name not in self.checked:
            check_all_finite({name: array})
            self.checked.add(name)
            if self.release_pages:
                release(array)
        m = _EXPERT_RE.match(name)
        if m and self.release_pages:
            if self._expert not in (None, m.group(1)):
                self.release(self._experts[self._expert])
            self._expert = m.group(1)
        return array

    def __contains__(self, name):
        return name in self.arrays

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self):
        return len(self.arrays)

    def expert_names(self, prefix: str) -> list:
        """The tensor names of one expert, e.g. prefix 'model.layers.0.mlp.experts.5'."""
        return list(self._experts.get(prefix, ()))

    def layer_names(self, i: int) -> list:
        """The tensor names of layer i (model.layers.{i}.*)."""
        return list(self._layers.get(i, ()))

    def release(self, names) -> int:
        """`release` the pages of these tensors; bytes advised."""
        return sum(release(self.arrays[n]) for n in names)

    def release_layer(self, i: int) -> int:
        return self.release(self.layer_names(i))

    def release_all(self) -> int:
        return self.release(self.arrays)

    def read_ahead(self, names) -> None:
        """Prepare tensors before they are asked for (run on the `Prefetcher` thread): announce
        all their pages (`prefetch`), then check each not yet checked for NaN/Inf and release
        the pages the check read. A tensor that fails the check is left unchecked, so asking
        for it raises the error in the forward."""
        for name in names:
            prefetch(self.arrays[name])
        if not self.check_finite:
            return
        for name in names:
            if name in self.checked or name in self._checking:
                continue
            self._checking[name] = threading.Event()
            try:
                check_all_finite({name: self.arrays[name]})
                self.checked.add(name)
                if self.release_pages:
                    release(self.arrays[name])
            except CheckpointError:
                pass
            finally:
                self._checking.pop(name).set()


# ---------------------------------------------------------------------- progress
def format_size(nbytes) -> str:
    """'312 MiB' below 1 GiB, else '2.9 GiB'."""
    if nbytes < 2**30:
        return f"{nbytes / 2**20:.0f} MiB"
    return f"{nbytes / 2**30:.1f} GiB"


def format_duration(seconds: float) -> str:
    """'12.3 s' below a minute, '3.1 min' below an hour, else '1.2 h'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_progress(done: int, total: int, elapsed: float, memory: dict | None = None,
                    width: int = 20, label: str = "layer") -> str:
    """One progress line, e.g.
    'layer  3/48 [#-------------------]   6% 12.3 s, ~3.1 min left | anon 312 MiB, file 2.9 GiB'
    (the estimate assumes the remaining steps take as long as the done ones on average)."""
    total = max(total, 1)
    filled = width * done // total
    line = (f"{label} {done:>{len(str(total))}}/{total} [{'#' * filled}{'-' * (width - filled)}]"
            f" {100 * done // total:3d}% {format_duration(elapsed)}")
    if 0 < done < total:
        line += f", ~{format_duration(elapsed / done * (total - done))} left"
    if memory and "rss_anon" in memory:
        line += (f" | anon {format_size(memory['rss_anon'])}, "
                 f"file {format_size(memory.get('rss_file', 0))}")
    return line


class ProgressBar:
    """A per-layer progress line on a stream (default stderr).

    enabled None: only when the stream is a terminal. On a terminal the line is redrawn in
    place ('\\r') and erased at the end; otherwise (asked for, e.g. in a log) each step is
    one line. `clock` and `memory` are injectable for tests.
    """

    def __init__(self, total: int, stream=None, enabled: bool | None = None,
                 label: str = "layer", clock=time.perf_counter, memory=memory_status):
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.enabled = self.tty if enabled is None else bool(enabled)
        self.total, self.label, self.clock, self.memory = total, label, clock, memory
        self.start_time = None
        self._width = 0

    def start(self) -> None:
        self.start_time = self.clock()
        self.update(0)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        if self.start_time is None:
            self.start_time = self.clock()
        line = format_progress(done, self.total, self.clock() - self.start_time,
                               self.memory() if self.memory else None, label=self.label)
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """Erase the line on a terminal (nothing to do in a log)."""
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


# ---------------------------------------------------------------------- the model
class StreamedModel(Model):
    """A lazy `refimpl.Model` over `StreamedWeights` that releases each layer's pages after
    the layer, reads ahead on a thread (the next layer's dense weights when a layer starts,
    the selected experts as soon as the MoE block has routed), and draws a progress bar.

    progress: None (a bar when stderr is a terminal), True (always, on `progress_stream`),
    False (never). After each forward `stats` holds 'layer_seconds', 'head_seconds' (final
    norm and LM head), 'seconds' and 'memory' (memory_status() after each layer).
    """

    def __init__(self, config, weights: StreamedWeights, numerics: str = "bf16",
                 backend: str = "numpy", progress: bool | None = None, release: bool = True,
                 prefetch: bool = True, progress_stream=None, quant: dict | None = None):
        given = weights  # a plain dict is checked against the config, as Model does
        if not isinstance(weights, StreamedWeights):
            weights = StreamedWeights(weights)
        super().__init__(config, weights.arrays, numerics=numerics, backend=backend,
                         lazy=True, check=given is not weights, quant=quant)
        self.weights = weights
        weights.release_pages = release
        self.progress, self.progress_stream = progress, progress_stream
        self.prefetch = prefetch
        self._prefetcher = None
        self.stats: dict = {"layer_seconds": [], "memory": []}
        self._bar = None
        self._mark = time.perf_counter()

    def forward(self, token_ids, cache=None, taps=None, last_only: bool = False,
                progress=None, expert_ids=None) -> np.ndarray:
        n = self.config.num_hidden_layers
        self._bar = (None if self.progress is False else
                     ProgressBar(n, stream=self.progress_stream, enabled=self.progress))
        self.stats = {"layer_seconds": [], "memory": []}
        start = self._mark = time.perf_counter()
        self._read_ahead(self._dense_names(0))
        if self._bar:
            self._bar.start()
        try:
            logits = super().forward(token_ids, cache, taps, last_only, progress, expert_ids)
        finally:
            if self.weights.release_pages:
                self.weights.release(self.weights.globals)
            if self._bar:
                self._bar.finish()
        end = time.perf_counter()
        self.stats["head_seconds"] = end - self._mark
        self.stats["seconds"] = end - start
        return logits

    def layer(self, i, x, cos, sin, cache=None, record=None, expert_ids=None):
        """`Model.layer`, then release its pages and account for it."""
        self._read_ahead(self._dense_names(i + 1))
        y = super().layer(i, x, cos, sin, cache, self._routing_hook(i, record), expert_ids)
        if self.weights.release_pages:
            self.weights.release_layer(i)
        now = time.perf_counter()
        self.stats["layer_seconds"].append(now - self._mark)
        self.stats["memory"].append(memory_status())
        self._mark = now
        if self._bar:
            self._bar.update(i + 1)
        return y

    def _read_ahead(self, names) -> None:
        """Have these tensors read (and checked) ahead on the prefetch thread."""
        if not self.prefetch or not names:
            return
        if self._prefetcher is None:
            self._prefetcher = Prefetcher()
        self._prefetcher.submit(lambda: self.weights.read_ahead(names))

    def _dense_names(self, i: int) -> list:
        """Layer i's tensors other than routed experts; for i = layers, the LM head."""
        c = self.config
        if i == c.num_hidden_layers:
            return ["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"]
        return [n for n in self.weights.layer_names(i) if ".mlp.experts." not in n]

    def _routing_hook(self, i: int, record):
        """A `record` for layer i that, when the MoE block reports its routing
        (expert_ids), reads the selected experts ahead, and passes everything on to
        `record` (the taps) if there is one."""
        if not self.prefetch:
            return record
        prefix = f"model.layers.{i}.mlp.experts."

        def hook(name, array):
            if name == "expert_ids":
                self._read_ahead([n for e in np.unique(array)
                                  for n in self.weights.expert_names(f"{prefix}{int(e)}")])
            if record:
                record(name, array)
        return hook

    def __repr__(self):
        return "Streamed" + super().__repr__()


def load_streamed(path, numerics: str = "bf16", backend: str = "numpy",
                  layers: int | None = None, allow_nonfinite: bool = False,
                  progress: bool | None = None, release: bool = True,
                  prefetch: bool = True) -> StreamedModel:
    """A `StreamedModel` of a checkpoint directory: headers read and validated, no tensor
    data read (each tensor is checked for NaN/Inf when first used unless allow_nonfinite).
    Use the numerics of the stored dtype (bf16 for a bf16 checkpoint): then no weight is
    converted, and anonymous memory stays a small fraction of the checkpoint. A W8A8
    checkpoint (quant_model_description.json) streams too; numerics 'w8a8' is bf16 on one."""
    from ..quant.format import read_description

    quant = read_description(path)
    if numerics == "w8a8" and quant is not None:
        numerics = "bf16"
    storage_dtype(numerics)  # refuse an unknown mode before touching the files
    config, arrays = load_weights(path, layers=layers)
    weights = StreamedWeights(arrays, check_finite=not allow_nonfinite)
    return StreamedModel(config, weights, numerics=numerics, backend=backend,
                         progress=progress, release=release, prefetch=prefetch, quant=quant)


__all__ = ["load_streamed", "StreamedModel", "StreamedWeights", "ProgressBar",
           "PeakSampler", "format_progress", "memory_line", "format_size", "format_duration", "memory_status",
           "reset_peak", "release", "prefetch", "Prefetcher", "resident_bytes", "STATUS_FIELDS"]
