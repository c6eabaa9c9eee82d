"""Micro-batching of concurrent query encodes, and the server's query-encoding settings.

Concurrent searches used to take turns on the encoder's lock, one forward pass each. A
:class:`MicroBatcher` instead hands every waiting query to one forward pass: its worker
takes the first query, waits at most ``max_wait_ms`` for more (never past ``max_batch``),
and encodes them together, so 16 clients cost a few batched passes instead of 16 single
ones. A batch that fails is encoded again one query at a time, so a bad query fails alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from xmodal.indexer.errors import InvalidArgument

from .embedding_cache import DEFAULT_CACHE_SIZE

log = logging.getLogger(__name__)

IDLE_EXIT_S = 5.0  # a worker with nothing to do for this long ends (a new one starts on demand)


@dataclass(frozen=True)
class QueryEncoding:
    """How a server encodes queries (``xmodal serve`` flags).

    runtime: ``torch``, ``onnx`` or ``onnx-int8`` (ONNX Runtime on the CPU, checked against
        torch at start; see xmodal.indexer.onnx_encoder).
    max_batch: most queries of one modality encoded in one forward pass (1 = no batching).
    max_wait_ms: how long the first query of a batch waits for others to join it.
    cache_size: query embeddings kept in the LRU cache (0 = no cache).
    passes: forward passes of the query encoder in flight at once, each on its own batch
        (ONNX Runtime; the torch encoder runs one at a time whatever this says).
    """

    runtime: str = "torch"
    max_batch: int = 8
    max_wait_ms: float = 2.0
    cache_size: int = DEFAULT_CACHE_SIZE
    passes: int = 2

    def __post_init__(self):
        from xmodal.indexer.onnx_encoder import RUNTIMES

        if self.runtime not in RUNTIMES:
            raise InvalidArgument(f"query runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.max_batch < 1:
            raise InvalidArgument(f"max_batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise InvalidArgument(f"max_wait_ms must be between 0 and 1000, got {self.max_wait_ms}")
        if self.cache_size < 0:
            raise InvalidArgument(f"cache_size must not be negative, got {self.cache_size}")
        if not 1 <= self.passes <= 16:
            raise InvalidArgument(f"passes must be between 1 and 16, got {self.passes}")


class MicroBatcher:
    """Encodes items submitted from many threads in batches of up to ``max_batch``.

    Args:
        encode: items -> float32 (len(items), dim), one row per item in order.
        max_batch: 1 encodes each item in its caller's thread (no worker).
        max_wait_ms: how long a batch's first item waits for more.
        workers: batches encoded at once, each by its own worker thread (the encoder's
            ``passes``); a worker takes what waits when it is free, so under load
            every worker is busy and the queue drains into their next batches.
        on_batch: called with each batch's size (metrics).
    """

    def __init__(
        self,
        encode: Callable[[Sequence[Any]], np.ndarray],
        *,
        max_batch: int = 8,
        max_wait_ms: float = 2.0,
        workers: int = 1,
        name: str = "encode",
        on_batch: Callable[[int], None] | None = None,
    ):
        self.encode = encode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1e3
        self.workers = max(1, workers)
        self.name = name
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue[tuple[Any, Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = 0  # worker threads alive
        self._idle = 0  # of which waiting for a first item

    def submit(self, item: Any) -> Future:
        """A future of ``item``'s row (dim,)."""
        future: Future = Future()
        if self.max_batch <= 1:
            self._run([(item, future)])
            return future
        with self._lock:
            self._queue.put((item, future))
            if self._idle == 0 and self._running < self.workers:
                self._running += 1
                self._idle += 1
                name = f"xmodal-batch-{self.name}-{self._running}"
                threading.Thread(target=self._loop, name=name, daemon=True).start()
        return future

    def encode_one(self, item: Any, timeout: float | None = None) -> np.ndarray:
        """``item``'s row, waiting at most ``timeout`` seconds."""
        return self.submit(item).result(timeout)

    def _loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._running -= 1
                        self._idle -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
            batch = [first]
            until = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:  # everything already waiting joins without delay; then wait out the window
                    batch.append(self._queue.get_nowait())
                    continue
                except queue.Empty:
                    pass
                left = until - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
            try:
                self._run(batch)
            finally:
                with self._lock:
                    self._idle += 1

    def _run(self, batch: list[tuple[Any, Future]]) -> None:
        batch = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
        if not batch:
            return
        if self.on_batch is not None:
            self.on_batch(len(batch))
        try:
            rows = self.encode([item for item, _ in batch])
        except BaseException as exc:  # noqa: BLE001 - handed to the caller(s), never swallowed
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            log.info("a batch of %d %s queries failed (%s); encoding them one by one", len(batch), self.name, exc)
            for item, future in batch:  # each on its own: only the bad one fails
                try:
                    future.set_result(self.encode([item])[0])
                except BaseException as single:  # noqa: BLE001
                    future.set_exception(single)
            return
        for row, (_, future) in zip(rows, batch, strict=True):
            future.set_result(row)
