"""The search engine: plain logic behind the gRPC servicer (no transport here).

It owns the encoder, the catalog and a reference to the live :class:`Snapshot`. A
search reads that reference once and uses only that snapshot, so swapping in a new
one (a refit, a rollback, a re-index noticed by the watcher) never mixes two snapshots
in one answer and never makes a search wait.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from xmodal.indexer.catalog import Catalog
from xmodal.indexer.corpus import IMAGE, MODALITIES, TEXT
from xmodal.indexer.encoder import Encoder
from xmodal.indexer.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from xmodal.indexer.feedback import feedback_query_key, feedback_split
from xmodal.indexer.images import DEFAULT_MAX_PIXELS, decode_image
from xmodal.indexer.snapshot import DataDir, Snapshot
from xmodal.indexer.store import BaseStore

log = logging.getLogger("xmodal.server")
VERSION = "0.1.0"


@dataclass(kw_only=True)
class Limits:
    """Request limits; past them a request gets RESOURCE_EXHAUSTED (k: INVALID_ARGUMENT)."""

    max_k: int = 1000
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_text_chars: int = 10_000
    max_items_per_request: int = 100
    max_feedback_ids: int = 100
    deadline_s: int = 30  # server-side cap on one search or feedback call

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"limit {name} must be a positive integer, got {value!r}")


@dataclass
class Hit:
    item_id: str
    score: float
    modality: str
    text: str
    source: str
    metadata: dict
    rank: int


@dataclass
class SearchResult:
    hits: list[Hit]
    snapshot_id: str
    timing: dict = field(default_factory=dict)  # encode_ms, head_ms, search_ms, total_ms


@dataclass
class ItemRecord:
    item_id: str
    modality: str
    text: str
    source: str
    metadata: dict
    content_hash: str
    image: bytes = b""


class SearchEngine:
    """Answers searches against the live snapshot of one data directory."""

    def __init__(self, data_dir: str | Path, encoder: Encoder, *, limits: Limits | None = None):
        self.data = DataDir(data_dir)
        self.data.root.mkdir(parents=True, exist_ok=True)
        self.encoder = encoder
        self.limits = limits or Limits()
        self.catalog = Catalog(self.data.catalog_path)
        self.store = BaseStore(self.data.base, self.catalog)
        self.started = time.time()
        self._snapshot: Snapshot | None = None
        self._swap_lock = threading.Lock()
        self._listeners: list[Callable[[Snapshot | None], None]] = []
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    # -- snapshots ---------------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def on_swap(self, listener: Callable[[Snapshot | None], None]) -> None:
        """Call ``listener(snapshot)`` after every swap (health status, metrics)."""
        self._listeners.append(listener)
        listener(self._snapshot)

    def clean_debris(self) -> list[Path]:
        """Remove temporary files of interrupted snapshot writes; log what was removed."""
        removed = self.data.clean()
        for path in removed:
            log.warning("removed debris of an unfinished write: %s", path)
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
        """Make ``snapshot_id`` the live snapshot of this engine (CURRENT is not touched).

        Raises:
            NotFound: no such snapshot. FailedPrecondition: built with another encoder.
        """
        with self._swap_lock:
            if self._snapshot is not None and self._snapshot.id == snapshot_id:
                return False
            snapshot = self.open_snapshot(snapshot_id)
            self._snapshot = snapshot  # the swap: one reference assignment
            log.info("live snapshot is now %s (%s head, %s)", snapshot.id, snapshot.head.kind,
                     snapshot.manifest["counts"])
        for listener in self._listeners:
            listener(snapshot)
        return True

    def open_snapshot(self, snapshot_id: str) -> Snapshot:
        """Load a snapshot and check that this engine can serve it (without swapping).

        Raises:
            NotFound: no such snapshot. FailedPrecondition: another encoder or dimension.
        """
        snapshot = Snapshot(self.data.snapshots / snapshot_id)
        if snapshot.encoder != self.encoder.identity:
            raise FailedPrecondition(
                f"snapshot {snapshot_id} was built with encoder {snapshot.encoder}, but this server runs "
                f"{self.encoder.identity}: start the server with the model the data directory was indexed with"
            )
        if snapshot.manifest["base_dim"] != self.encoder.dim:
            raise FailedPrecondition(f"snapshot {snapshot_id} expects {snapshot.manifest['base_dim']}-d base "
                                     f"vectors, the encoder makes {self.encoder.dim}-d")
        return snapshot

    def watch(self, interval: float = 2.0) -> None:
        """Poll CURRENT in a background thread and swap when it changes."""
        def loop():
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

    def _live(self) -> Snapshot:
        snapshot = self._snapshot
        if snapshot is None:
            raise FailedPrecondition(
                f"no snapshot is loaded: index a corpus into {self.data.root} (`xmodal index CORPUS --data DIR`); "
                "the server picks it up without a restart"
            )
        return snapshot

    # -- queries ---------------------------------------------------------------------
    def query_vector(self, snapshot: Snapshot, *, text: str | None = None, image: bytes | None = None,
                     item_id: str | None = None) -> tuple[str, np.ndarray, dict]:
        """The adapted query vector (1, dim), its modality and the time spent per stage."""
        given = [name for name, value in (("text", text), ("image", image), ("item_id", item_id)) if value is not None]
        if len(given) != 1:
            raise InvalidArgument("a query needs exactly one of text, image or item_id"
                                  + (f" (got {', '.join(given)})" if given else ""))
        timing = {"encode_ms": 0.0, "head_ms": 0.0}
        if item_id is not None:
            if not item_id.strip():
                raise InvalidArgument("item_id is empty: pass the id of an indexed item")
            found = snapshot.find(item_id)
            if found is None:
                raise NotFound(f"no indexed item with id {item_id!r} in snapshot {snapshot.id}")
            modality, vector = found
            return modality, vector.reshape(1, -1), timing
        t0 = time.perf_counter()
        modality, base = self.encode_query(text=text, image=image)
        t1 = time.perf_counter()
        vector = snapshot.head.project(modality, base, query=True)
        t2 = time.perf_counter()
        timing["encode_ms"] = (t1 - t0) * 1e3
        timing["head_ms"] = (t2 - t1) * 1e3
        return modality, vector, timing

    def encode_query(self, *, text: str | None = None, image: bytes | None = None) -> tuple[str, np.ndarray]:
        """Validate a text or image query and return its modality and base embedding (1, dim)."""
        if text is not None:
            if not text.strip():
                raise InvalidArgument("query text is empty: send the words to search for")
            if len(text) > self.limits.max_text_chars:
                raise ResourceExhausted(f"query text has {len(text):,} characters, over the limit of "
                                        f"{self.limits.max_text_chars:,}")
            return TEXT, self.encoder.encode_texts([text])
        if image is None:
            raise InvalidArgument("a query needs text, image or item_id")
        if len(image) > self.limits.max_image_bytes:
            raise ResourceExhausted(f"image has {len(image):,} bytes, over the limit of {self.limits.max_image_bytes:,}")
        picture = decode_image(image, max_pixels=self.limits.max_pixels)
        return IMAGE, self.encoder.encode_images([picture])

    def submit_feedback(self, *, text: str | None = None, image: bytes | None = None, item_id: str | None = None,
                        relevant: list[str], irrelevant: list[str] | None = None, weight: float = 1.0,
                        source: str = "") -> str:
        """Record that ``relevant`` items answer a query. Durable when it returns.

        The query's base embedding is stored with the event, so refits never re-encode.

        Returns:
            The feedback id.

        Raises:
            InvalidArgument: no query or no relevant ids, empty ids, bad weight.
            NotFound: unknown item ids (all named). ResourceExhausted: too many ids.
        """
        irrelevant = list(irrelevant or [])
        relevant = list(relevant)
        given = [v for v in (text, image, item_id) if v is not None]
        if len(given) != 1:
            raise InvalidArgument("feedback needs exactly one query: text, image or item_id")
        if not relevant:
            raise InvalidArgument("feedback needs at least one relevant item id (the item the user confirmed)")
        if len(relevant) + len(irrelevant) > self.limits.max_feedback_ids:
            raise ResourceExhausted(f"{len(relevant) + len(irrelevant)} item ids in one feedback event, over the limit "
                                    f"of {self.limits.max_feedback_ids}")
        if any(not isinstance(i, str) or not i.strip() for i in relevant + irrelevant):
            raise InvalidArgument("an item id in relevant_ids or irrelevant_ids is empty")
        if weight == 0:
            weight = 1.0  # proto3's default: not set
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or not 0 < weight <= 100:
            raise InvalidArgument(f"weight must be a finite number in (0, 100], got {weight!r}")
        if len(source) > 200:
            raise InvalidArgument("source tag is longer than 200 characters")
        rows = self.catalog.item_rows(relevant + irrelevant + ([item_id] if item_id is not None else []))
        missing = [i for i in dict.fromkeys(relevant + irrelevant) if i not in rows]
        if missing:
            raise NotFound(f"unknown item id(s) in feedback: {', '.join(repr(m) for m in missing[:10])}")
        if item_id is not None:
            if not item_id.strip():
                raise InvalidArgument("item_id is empty: pass the id of an indexed item")
            if item_id not in rows:
                raise NotFound(f"unknown query item id {item_id!r}")
            modality, shard, row = rows[item_id]
            if shard is None:
                raise FailedPrecondition(f"item {item_id!r} has no embedding yet (not indexed, or undecodable)")
            base = self.store.vector(modality, shard, row)
            kind, query_text = "item_id", item_id
        else:
            modality, base = self.encode_query(text=text, image=image)
            kind, query_text = ("text", text) if text is not None else ("image", "")
        feedback_id = "fb-" + secrets.token_hex(8)
        self.catalog.add_feedback(feedback_id=feedback_id, query_kind=kind, query_modality=modality,
                                  query_text=query_text, embedding=np.asarray(base).reshape(-1), relevant=relevant,
                                  irrelevant=irrelevant, weight=float(weight), source=source,
                                  split=feedback_split(feedback_query_key(kind, image if kind == "image" else query_text)))
        return feedback_id

    def check_deadline(self, deadline: float | None, stage: str) -> None:
        """Raise DeadlineExceeded if ``deadline`` (time.monotonic) has passed."""
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(f"deadline passed during {stage}: retry, or give the call a longer deadline "
                                   f"(the server caps calls at {self.limits.deadline_s} s)")

    def search(self, *, text: str | None = None, image: bytes | None = None, item_id: str | None = None,
               target: str | None = None, k: int = 10, deadline: float | None = None) -> SearchResult:
        """Top-k items of ``target`` modality for one query.

        Args:
            text / image / item_id: exactly one query.
            target: "image" or "text"; None means the other modality than the query's.
            k: 1..limits.max_k.

        Raises:
            InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted.
        """
        started = time.perf_counter()
        if not isinstance(k, int) or k < 1 or k > self.limits.max_k:
            raise InvalidArgument(f"k must be between 1 and {self.limits.max_k}, got {k}")
        if target is not None and target not in MODALITIES:
            raise InvalidArgument(f"target modality must be image or text, got {target!r}")
        snapshot = self._live()  # read the reference once: this query sees one snapshot only
        self.check_deadline(deadline, "queueing")
        modality, vector, timing = self.query_vector(snapshot, text=text, image=image, item_id=item_id)
        self.check_deadline(deadline, "encoding")
        target = target or (TEXT if modality == IMAGE else IMAGE)
        index = snapshot.indexes[target]
        t0 = time.perf_counter()
        scores, rows = index.search(vector, k)
        timing["search_ms"] = (time.perf_counter() - t0) * 1e3
        pairs = [(index.ids[r], float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
        records = self.catalog.get_items([item for item, _ in pairs])
        hits = []
        for rank, (hit_id, score) in enumerate(pairs, start=1):
            row = records.get(hit_id)
            hits.append(Hit(
                item_id=hit_id, score=score, modality=target, rank=rank,
                text=row["text"] if row else "", source=row["source"] if row else "",
                metadata=json.loads(row["metadata"]) if row else {},
            ))
        timing["total_ms"] = (time.perf_counter() - started) * 1e3
        return SearchResult(hits, snapshot.id, timing)

    def get_items(self, item_ids: list[str], *, metadata_only: bool = False) -> list[ItemRecord]:
        """Items by id, with their content (image bytes or text) and metadata.

        Raises:
            InvalidArgument: no ids, or an empty id. ResourceExhausted: too many ids.
            NotFound: unknown ids (all of them are named).
        """
        if not item_ids:
            raise InvalidArgument("item_ids is empty: pass at least one item id")
        if len(item_ids) > self.limits.max_items_per_request:
            raise ResourceExhausted(f"{len(item_ids)} ids in one request, over the limit of "
                                    f"{self.limits.max_items_per_request}: split the request")
        if any(not item_id.strip() for item_id in item_ids):
            raise InvalidArgument("an item id is empty")
        rows = self.catalog.get_items(item_ids)
        missing = [item_id for item_id in item_ids if item_id not in rows]
        if missing:
            raise NotFound(f"unknown item id(s): {', '.join(repr(m) for m in missing[:10])}")
        out = []
        for item_id in item_ids:
            row = rows[item_id]
            record = ItemRecord(item_id, row["modality"], row["text"], row["source"], json.loads(row["metadata"]),
                                row["content_hash"])
            if row["modality"] == IMAGE and not metadata_only:
                try:
                    record.image = Path(row["source"]).read_bytes()
                except OSError:
                    raise NotFound(f"the image file of item {item_id!r} is no longer at {row['source']}") from None
            out.append(record)
        return out

    def status(self) -> dict:
        snapshot = self._snapshot
        counts = self.catalog.count_items()
        return {
            "serving": snapshot is not None,
            "snapshot": snapshot.manifest if snapshot else None,
            "counts": {m: {"catalog_items": counts[m], "indexed": len(snapshot.indexes[m]) if snapshot else 0}
                       for m in MODALITIES},
            "version": VERSION,
            "uptime_s": time.time() - self.started,
            "max_k": self.limits.max_k,
            "data_dir": str(self.data.root),
        }
