"""An LRU cache of query base embeddings (before the head, so refits do not invalidate it).

Keys: the encoder identity, the modality and what the encoder actually sees of the query:
a text's token ids (so texts that differ only in case, spacing or past the context length
share one entry: the tokenizer makes them the same input), an image's sha256 with the DICOM
window it is decoded with. An entry made by another encoder is never returned: the identity
is part of the key, and :meth:`EmbeddingCache.get` and :meth:`put` drop every entry when the
encoder identity they are called with changes.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

DEFAULT_CACHE_SIZE = 10_000  # entries; 512-d float32: about 20 MB


def text_key(tokens: np.ndarray) -> bytes:
    """The key of one text: its token ids, as the encoder sees them."""
    return hashlib.blake2b(np.ascontiguousarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


def image_key(image: bytes, window: Hashable = None) -> bytes:
    """The key of one image: its bytes' sha256 and the window it is decoded with."""
    digest = hashlib.sha256(image)
    digest.update(repr(window).encode())
    return digest.digest()


class EmbeddingCache:
    """A thread-safe LRU map (encoder identity, modality, key) -> base embedding (dim,).

    ``capacity`` 0 turns it off (every lookup a miss, nothing stored).
    """

    def __init__(self, capacity: int = DEFAULT_CACHE_SIZE):
        if capacity < 0:
            raise ValueError(f"cache capacity must not be negative, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, bytes], np.ndarray] = OrderedDict()
        self._identity: str | None = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _check_identity(self, identity: str) -> None:
        if identity != self._identity:  # another encoder: nothing cached is valid for it
            self._entries.clear()
            self._identity = identity

    def get(self, identity: str, modality: str, key: bytes) -> np.ndarray | None:
        """The cached embedding, or None (counted as a hit or a miss)."""
        with self._lock:
            self._check_identity(identity)
            vector = self._entries.get((modality, key)) if self.capacity else None
            if vector is None:
                self.misses += 1
                return None
            self._entries.move_to_end((modality, key))
            self.hits += 1
            return vector

    def put(self, identity: str, modality: str, key: bytes, vector: np.ndarray) -> None:
        if not self.capacity:
            return
        stored = np.array(vector, dtype=np.float32).reshape(-1)
        stored.setflags(write=False)  # shared by every caller that hits it
        with self._lock:
            self._check_identity(identity)
            self._entries[(modality, key)] = stored
            self._entries.move_to_end((modality, key))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    @property
    def hit_rate(self) -> float:
        """Hits over lookups since start (0.0 before the first lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
