"""The key/value caches: `KVCache` (one sequence, contiguous, what `Model.forward` appends
to) and `PagedKVCache` (many sequences in blocks, what `Model.step` serves a batch from)."""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .ops.serving import reshape_and_cache


class KVCache:
    """Per-layer keys and values after RoPE, [S, Hkv, D] each, grown by doubling.

    `forward` appends each layer's new keys/values with `append` and calls `advance` once the
    whole step is done, so `length` is the number of positions already cached.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype,
                 capacity: int = 64):
        self.length = 0
        self._shape = (num_kv_heads, head_dim)
        self._dtype = np.dtype(dtype)
        self._k = [np.empty((capacity, *self._shape), self._dtype) for _ in range(num_layers)]
        self._v = [np.empty((capacity, *self._shape), self._dtype) for _ in range(num_layers)]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray):
        """Store k, v [T, Hkv, D] after the cached positions; return all keys and values
        [length + T, Hkv, D] (views, valid until the next append)."""
        end = self.length + k.shape[0]
        if end > self._k[layer].shape[0]:
            capacity = max(end, 2 * self._k[layer].shape[0])
            for store in (self._k, self._v):
                grown = np.empty((capacity, *self._shape), self._dtype)
                grown[: self.length] = store[layer][: self.length]
                store[layer] = grown
        self._k[layer][self.length:end] = k
        self._v[layer][self.length:end] = v
        return self._k[layer][:end], self._v[layer][:end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (speculative decoding rolls the cache back
        past the first rejected draft token); the next append writes there."""
        if not 0 <= length <= self.length:
            raise InputError(f"KV cache: cannot truncate {self.length} cached positions to "
                             f"{length}")
        self.length = length

    def nbytes(self) -> int:
        """Bytes held by the cached positions (not the spare capacity)."""
        per_position = int(np.prod(self._shape)) * self._dtype.itemsize
        return 2 * len(self._k) * self.length * per_position


class QuantKVCache(KVCache):
    """The C8 cache (an int8 KV cache, DEPLOYMENT.md section 4): keys and values stored as
    `refimpl.ops.kv_quantize` (per-channel symmetric int8, kv_cache_scale [Hkv*D] per layer),
    read back as `kv_dequantize` in the activation dtype. As vllm-ascend serves it: a
    prefill from an empty cache attends to its unquantised keys and values (and stores them
    quantised); a decode step (one token) attends to the dequantised cache, its own key
    included. A multi-token step after cached positions (chunked prefill, a prefix-cache
    hit) is refused: vllm-ascend implements no C8 path for it either."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype,
                 k_scales, v_scales, capacity: int = 64):
        super().__init__(num_layers, num_kv_heads, head_dim, np.int8, capacity)
        self.activation_dtype = np.dtype(dtype)
        self.k_scales, self.v_scales = list(k_scales), list(v_scales)    # [Hkv*D] each

    def append(self, layer: int, k: np.ndarray, v: np.ndarray):
        from .ops.quant import kv_dequantize, kv_quantize

        T, start = k.shape[0], self.length
        if start and T > 1:
            raise InputError(f"C8 KV cache: a {T}-token step after {start} cached positions "
                             "(chunked prefill or a prefix-cache hit) is not implemented")
        k_all, v_all = super().append(layer, kv_quantize(k, self.k_scales[layer]),
                                      kv_quantize(v, self.v_scales[layer]))
        if start == 0:
            return k, v                                        # prefill: unquantised
        dt = self.activation_dtype
        return (kv_dequantize(k_all, self.k_scales[layer], dt),
                kv_dequantize(v_all, self.v_scales[layer], dt))


class PagedKVCache:
    """Keys and values of many sequences in fixed-size blocks, as a paged-attention server
    holds them (vLLM's layout, DEPLOYMENT.md section 2).

    Per layer i: `key_cache[i]`, `value_cache[i]` [num_blocks, block_size, Hkv, D], keys after
    RoPE. Position p of a sequence lives in block `block_table(seq)[p // block_size]` at offset
    `p % block_size` (slot = block * block_size + offset). Blocks come from a free list, in
    `order` (default: ascending ids) and then as freed: `free(seq)` puts a sequence's blocks
    at the front, so they are the next handed out and tables interleave and reorder as
    sequences come and go. Every slot starts as NaN, so a read outside a block table shows.

    `reserve(seq, n)` makes room for a sequence's next n positions (a new sequence starts
    empty) and returns their slots; `advance(seq, n)` records them as cached once a step has
    written every layer. Lengths, tables and the free list are plain Python state.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype,
                 num_blocks: int, block_size: int = 128, order=None):
        if not isinstance(num_blocks, int) or num_blocks < 1 or not isinstance(block_size, int) \
                or block_size < 1:
            raise InputError(f"a paged cache needs positive integer num_blocks and block_size, "
                             f"got {num_blocks!r} and {block_size!r}")
        order = list(range(num_blocks)) if order is None else [int(b) for b in order]
        if sorted(order) != list(range(num_blocks)):
            raise InputError(f"order must be a permutation of the {num_blocks} block ids")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.key_cache = [np.full(shape, np.nan, dtype) for _ in range(num_layers)]
        self.value_cache = [np.full(shape, np.nan, dtype) for _ in range(num_layers)]
        self._free = order
        self._tables: dict = {}
        self._lengths: dict = {}

    # ------------------------------------------------------------------ bookkeeping
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def sequences(self) -> list:
        return list(self._tables)

    def length(self, seq) -> int:
        """Positions cached for `seq` (0 for a sequence the cache does not hold)."""
        return self._lengths.get(seq, 0)

    def block_table(self, seq) -> np.ndarray:
        """The blocks of `seq` in position order. # -> int32 [blocks]"""
        return np.array(self._tables.get(seq, []), np.int32)

    def block_tables(self, seqs) -> np.ndarray:
        """Tables of several sequences, padded with -1. # -> int32 [B, max_blocks]"""
        rows = [self._tables.get(s, []) for s in seqs]
        out = np.full((len(rows), max([1] + [len(r) for r in rows])), -1, np.int32)
        for b, r in enumerate(rows):
            out[b, :len(r)] = r
        return out

    def blocks_needed(self, seq, n: int) -> int:
        """New blocks `reserve(seq, n)` would take."""
        have = len(self._tables.get(seq, []))
        return max(0, -(-(self.length(seq) + n) // self.block_size) - have)

    def reserve(self, seq, n: int) -> np.ndarray:
        """Blocks for positions length .. length + n - 1 of `seq`, taken from the free list;
        their slots. InputError (and nothing taken) when the free list is too short.
        # -> int64 [n]"""
        need = self.blocks_needed(seq, n)
        if need > len(self._free):
            raise InputError(f"paged cache full: sequence {seq!r} needs {need} more blocks of "
                             f"{self.block_size}, {len(self._free)} free")
        table = self._tables.setdefault(seq, [])
        self._lengths.setdefault(seq, 0)
        table.extend(self._free[:need])
        del self._free[:need]
        p = np.arange(self.length(seq), self.length(seq) + n)
        return np.array(table, np.int64)[p // self.block_size] * self.block_size + \
            p % self.block_size

    def advance(self, seq, n: int) -> None:
        self._lengths[seq] = self.length(seq) + n

    def free(self, seq) -> None:
        """Forget `seq`; its blocks go to the front of the free list (their slots keep their
        old contents until written again)."""
        if seq not in self._tables:
            raise InputError(f"the paged cache holds no sequence {seq!r}")
        self._free[:0] = self._tables.pop(seq)
        del self._lengths[seq]

    # ------------------------------------------------------------------ data
    def write(self, layer: int, k: np.ndarray, v: np.ndarray, slots) -> None:
        """Store keys and values [T, Hkv, D] at their slots (`refimpl.ops.reshape_and_cache`,
        in place)."""
        reshape_and_cache(k, v, self.key_cache[layer], self.value_cache[layer], slots,
                          inplace=True)

    def nbytes(self) -> int:
        """Bytes of the caches' storage (every block, used or not)."""
        return sum(a.nbytes for a in self.key_cache + self.value_cache)
