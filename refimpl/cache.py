"""The key/value cache that decoding appends to."""

from __future__ import annotations

import numpy as np


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

    def nbytes(self) -> int:
        """Bytes held by the cached positions (not the spare capacity)."""
        per_position = int(np.prod(self._shape)) * self._dtype.itemsize
        return 2 * len(self._k) * self.length * per_position
