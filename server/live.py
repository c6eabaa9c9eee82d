"""The live view's lifecycle: load the snapshot CURRENT names, watch it, swap it in.

A search reads :attr:`LiveView.snapshot` once and uses only that snapshot, so swapping in
a new one (a refit, a rollback, a re-index noticed by the watcher) never mixes two
snapshots in one answer and never makes a search wait.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from xmodal.indexer.encoder import Encoder
from xmodal.indexer.errors import FailedPrecondition
from xmodal.indexer.snapshot import DataDir, Snapshot

log = logging.getLogger(__name__)


class LiveView:
    """The snapshot one server answers from, swapped by one reference assignment."""

    def __init__(self, data: DataDir, encoder: Encoder):
        self.data = data
        self.encoder = encoder
        self._snapshot: Snapshot | None = None
        self._swap_lock = threading.Lock()
        self._listeners: list[Callable[[Snapshot | None], None]] = []
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def live(self) -> Snapshot:
        """The live snapshot.

        Raises:
            FailedPrecondition: none is loaded yet.
        """
        snapshot = self._snapshot
        if snapshot is None:
            raise FailedPrecondition(
                "no snapshot is loaded: index a corpus into the server's data directory "
                "(`xmodal index CORPUS --data DIR`); the server picks it up without a restart"
            )
        return snapshot

    def on_swap(self, listener: Callable[[Snapshot | None], None]) -> None:
        """Call ``listener(snapshot)`` after every swap (health status, metrics)."""
        self._listeners.append(listener)
        listener(self._snapshot)

    def clean_debris(self) -> list[Path]:
        """Remove temporary files of interrupted snapshot writes; log what was removed."""
        removed = self.data.clean()
        for path in removed:
            log.warning("removed debris of an unfinished write: %s", path.name)
        return removed

    def load_current(self) -> bool:
        """Load the snapshot CURRENT names if it is not the live one; True on a swap.

        Raises:
            FailedPrecondition: the snapshot was built with another encoder.
        """
        wanted = self.data.current_id()
        if wanted is None or (self._snapshot is not None and self._snapshot.id == wanted):
            return False
        return self.load_snapshot(wanted)

    def load_snapshot(self, snapshot_id: str) -> bool:
        """Make ``snapshot_id`` the live snapshot (CURRENT is not touched).

        Raises:
            NotFound: no such snapshot. FailedPrecondition: built with another encoder.
        """
        with self._swap_lock:
            if self._snapshot is not None and self._snapshot.id == snapshot_id:
                return False
            snapshot = self.open_snapshot(snapshot_id)
            self._snapshot = snapshot  # the swap: one reference assignment
            log.info("live snapshot is now %s (%s head, %s)", snapshot.id, snapshot.head.kind, snapshot.manifest.counts)
        for listener in self._listeners:
            listener(snapshot)
        return True

    def open_snapshot(self, snapshot_id: str) -> Snapshot:
        """Load a snapshot and check that this server can serve it (without swapping).

        Raises:
            NotFound: no such snapshot. FailedPrecondition: another encoder or dimension.
        """
        snapshot = Snapshot(self.data.snapshots / snapshot_id)
        if snapshot.encoder != self.encoder.identity:
            raise FailedPrecondition(
                f"snapshot {snapshot_id} was built with encoder {snapshot.encoder}, but this server runs "
                f"{self.encoder.identity}: start the server with the model the data directory was indexed with"
            )
        if snapshot.manifest.base_dim != self.encoder.dim:
            raise FailedPrecondition(
                f"snapshot {snapshot_id} expects {snapshot.manifest.base_dim}-d base "
                f"vectors, the encoder makes {self.encoder.dim}-d"
            )
        return snapshot

    def watch(self, interval: float = 2.0) -> None:
        """Poll CURRENT in a background thread and swap when it changes."""

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.load_current()
                except Exception:  # noqa: BLE001 - keep serving the old snapshot, say why
                    log.exception("could not load the snapshot CURRENT names; still serving the previous one")

        self._watcher = threading.Thread(target=loop, name="xmodal-snapshot-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
