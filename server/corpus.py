"""Corpus writes on a running server: UpsertItems and DeleteItems.

A batch is checked whole, encoded, then applied in one catalog transaction (after its base
shard and image files are on disk), so it is applied whole or not at all and is durable
when the call returns. The live view then serves the new items from a delta beside the
snapshot and hides deleted or replaced ones with an IDSelector (see :mod:`.live`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from xmodal.indexer.catalog import Catalog, next_seq, split_for, text_hash
from xmodal.indexer.clinical import key_for, load_settings, read_clinical
from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.encoder import Encoder
from xmodal.indexer.errors import InvalidArgument, XmodalError
from xmodal.indexer.feedback import FeedbackLog
from xmodal.indexer.images import decode_image
from xmodal.indexer.snapshot import DataDir
from xmodal.indexer.store import BaseStore, write_blob

from .limits import Limits
from .live import LiveView

if TYPE_CHECKING:
    from .compaction import Compactor

log = logging.getLogger(__name__)
MAX_ID_CHARS = 512
BLOB_WRITERS = 4

TOMBSTONES = """
CREATE TABLE IF NOT EXISTS tombstones (
    id TEXT PRIMARY KEY,       -- a deleted item: hidden from every snapshot that still holds it
    seq INTEGER NOT NULL,
    deleted_at REAL NOT NULL
);
"""


def tombstoned(catalog: Catalog) -> set[str]:
    catalog.ensure_schema(TOMBSTONES)
    if catalog.read_only and not catalog.has_table("tombstones"):  # a primary that never served
        return set()
    return {r[0] for r in catalog.db().execute("SELECT id FROM tombstones")}


@dataclass
class NewItem:
    """One item of an upsert batch, as the servicer hands it over."""

    item_id: str
    text: str | None = None
    image: bytes | None = None
    metadata: dict = field(default_factory=dict)
    pair_id: str = ""
    source: str = ""
    picture: Image.Image | None = None  # a DICOM image, as read (windowed) for the encoder
    stored: bytes | None = None  # what blobs/ keeps for GetItems, when not the bytes sent (a DICOM's copy)

    @property
    def modality(self) -> str:
        return IMAGE if self.image is not None else TEXT

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.image).hexdigest() if self.image is not None else text_hash(self.text or "")


def _blob_name(item: NewItem) -> str:
    return hashlib.sha256(item.stored).hexdigest() if item.stored is not None else item.content_hash


def _changed(stored, item: NewItem) -> bool:
    """New content, or new metadata (which filters read beside the vector): re-embedded."""
    return bool(
        stored["content_hash"] != item.content_hash or stored["metadata"] != json.dumps(item.metadata, sort_keys=True)
    )


def parse_metadata(item_id: str, value: str) -> dict:
    """metadata_json of an item: empty, or a JSON object."""
    if not value.strip():
        return {}
    try:
        metadata = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"item {item_id!r}: metadata_json is not JSON ({exc.msg})") from None
    if not isinstance(metadata, dict):
        raise InvalidArgument(f"item {item_id!r}: metadata_json must be a JSON object, got {type(metadata).__name__}")
    return metadata


def check_item_id(item_id: str, where: str = "item id") -> None:
    if not item_id.strip():
        raise InvalidArgument(f"{where} is empty: every item needs an id")
    if len(item_id) > MAX_ID_CHARS:
        raise InvalidArgument(f"{where} {item_id[:40]!r}... is {len(item_id)} characters, over {MAX_ID_CHARS}")
    if any(unicodedata.category(c) == "Cc" for c in item_id):
        raise InvalidArgument(f"{where} {item_id!r} holds control characters: use printable ids")


class CorpusWrites:
    """Upserts and deletes for one server, one batch at a time."""

    def __init__(
        self, data: DataDir, catalog: Catalog, store: BaseStore, encoder: Encoder, view: LiveView, limits: Limits
    ):
        self.data, self.catalog, self.store, self.encoder = data, catalog, store, encoder
        self.view, self.limits = view, limits
        # image files are written (and fsynced) in parallel while the encoder runs: one at a
        # time, their fsyncs took longer than encoding the batch (bench/live.py)
        self._blob_writer = ThreadPoolExecutor(BLOB_WRITERS, thread_name_prefix="xmodal-blobs")
        self.compactor: Compactor | None = None  # set by the engine: purges and first snapshots
        self._key: bytes | None = None  # the DICOM id key, read when a DICOM image first comes
        catalog.ensure_schema(TOMBSTONES)
        FeedbackLog(catalog)  # its table: deletes forget the events that used an item

    # -- upserts ---------------------------------------------------------------------------
    def upsert(self, items: list[NewItem]) -> dict[str, int]:
        """Add or replace items; returns counts (added, changed, unchanged, pairs_added).

        Raises:
            InvalidArgument, ResourceExhausted: naming the offending item; nothing applied.
            FailedPrecondition: no snapshot is loaded yet.
        """
        self._read_dicom(items)
        self._check_batch(items)
        if self.view.peek() is None and self.compactor is not None:
            self.compactor.first_snapshot()  # an empty data directory: start with an identity head
        self.view.live()
        with self.view.write_lock:
            known = self.catalog.get_items([i.item_id for i in items] + [i.pair_id for i in items if i.pair_id])
            self._check_pairs(items, known)
            fresh = [i for i in items if i.item_id not in known or _changed(known[i.item_id], i)]
            vectors, blobs = self._encode(fresh)
            counts = self._apply(items, fresh, vectors, known, blobs)
        log.info("upserted %d item(s): %s", len(items), counts)
        return counts

    def _read_dicom(self, items: list[NewItem]) -> None:
        """DICOM images (the DICM preamble) are read here, before anything else: their pixels
        for the encoder, their allowlisted attributes under the item's own metadata, a
        de-identified copy for GetItems, and an id derived from the file when none was sent."""
        settings = None
        for n, item in enumerate(items):
            if item.image is None or item.image[128:132] != b"DICM":
                continue
            settings = settings or load_settings(self.catalog)
            try:
                read = read_clinical(item.image, settings, self._dicom_key(), max_pixels=self.limits.max_pixels)
            except XmodalError as exc:  # unreadable, no pixels, missing codec, burned in, too large
                raise type(exc)(f"item {item.item_id or f'#{n + 1} of the batch'!r}: {exc}") from None
            item.item_id = item.item_id or read.item_id
            item.metadata = {**read.metadata, **item.metadata}
            item.picture, item.stored = read.image, read.deidentified

    def _dicom_key(self) -> bytes:
        if self._key is None:
            self._key = key_for(self.data.root)
        return self._key

    def _check_batch(self, items: list[NewItem]) -> None:
        if not items:
            raise InvalidArgument("items is empty: send at least one item")
        self.limits.at_most("max_upsert_items", len(items), "items in one call", "send smaller batches")
        seen: set[str] = set()
        for item in items:
            check_item_id(item.item_id)
            if item.item_id in seen:
                raise InvalidArgument(f"item {item.item_id!r} appears twice in the batch")
            seen.add(item.item_id)
            self._check_content(item)

    def _check_content(self, item: NewItem) -> None:
        if (item.text is None) == (item.image is None):
            raise InvalidArgument(f"item {item.item_id!r} needs exactly one of text or image")
        if item.text is not None:
            if not item.text.strip():
                raise InvalidArgument(f"item {item.item_id!r}: text is empty")
            self.limits.at_most("max_text_chars", len(item.text), "characters", f"shorten the text of {item.item_id!r}")
        else:
            self.limits.at_most(
                "max_image_bytes", len(item.image or b""), "bytes", f"send a smaller image as {item.item_id!r}"
            )
        if len(item.source) > 1000:
            raise InvalidArgument(f"item {item.item_id!r}: source is longer than 1000 characters")

    def _check_pairs(self, items: list[NewItem], known: dict) -> None:
        """An id keeps its modality; a pair_id names an item of the other modality, in this
        batch or already stored."""
        batch = {i.item_id: i.modality for i in items}
        for item in items:
            stored = known.get(item.item_id)
            if stored is not None and stored["modality"] != item.modality:
                raise InvalidArgument(
                    f"item {item.item_id!r} is already stored as {stored['modality']}: delete it "
                    f"before storing {item.modality} under its id"
                )
            if not item.pair_id:
                continue
            modality = batch.get(item.pair_id) or (known[item.pair_id]["modality"] if item.pair_id in known else None)
            if modality is None:
                raise InvalidArgument(f"item {item.item_id!r}: pair_id {item.pair_id!r} is not a known item")
            if modality == item.modality:
                raise InvalidArgument(
                    f"item {item.item_id!r}: pair_id {item.pair_id!r} is another {modality}; "
                    "a pair joins an image and a text"
                )

    def _encode(self, items: list[NewItem]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Base vectors of the items to (re)embed, by modality, in the items' order; and the
        image files (item id -> path under the data directory), written while the encoder
        runs once every image has decoded."""
        texts = [i.text or "" for i in items if i.modality == TEXT]
        images = []
        for item in items:
            if item.modality == IMAGE:
                try:
                    images.append(item.picture or decode_image(item.image or b"", max_pixels=self.limits.max_pixels))
                except XmodalError as exc:  # undecodable, or past the pixel limit
                    raise type(exc)(f"item {item.item_id!r}: {exc}") from None
        # one writer per file: the bytes sent, content-addressed, or a DICOM's de-identified copy
        names = {i.item_id: _blob_name(i) for i in items if i.image is not None}
        unique = {names[i.item_id]: i.stored if i.stored is not None else i.image for i in items if i.image is not None}
        written = {h: self._blob_writer.submit(self._write_blob, data, h) for h, data in unique.items()}
        vectors = {
            TEXT: self.encoder.encode_texts(texts) if texts else np.zeros((0, self.encoder.dim), np.float32),
            IMAGE: self.encoder.encode_images(images),
        }
        paths = {h: future.result() for h, future in written.items()}
        return vectors, {item_id: paths[name] for item_id, name in names.items()}

    def _write_blob(self, data: bytes, content_hash: str) -> str:
        """Image bytes under blobs/, content-addressed; returns the path relative to the data directory."""
        return write_blob(self.data.root, data, content_hash)

    def _apply(
        self,
        items: list[NewItem],
        fresh: list[NewItem],
        vectors: dict[str, np.ndarray],
        known: dict,
        blobs: dict[str, str],
    ) -> dict:
        """Shards (and blobs) first, then one catalog transaction, then the live view."""
        with self.store.lock():  # no compaction drops the new shards before the catalog names them
            shards = {m: self.store.write_shard(m, vectors[m]) if len(vectors[m]) else None for m in (IMAGE, TEXT)}
            counts = self._commit(items, fresh, known, blobs, shards)
        by_modality = {m: [i.item_id for i in fresh if i.modality == m] for m in (IMAGE, TEXT)}
        self.view.apply_upsert({m: (by_modality[m], vectors[m]) for m in (IMAGE, TEXT)})
        return counts

    def _commit(
        self, items: list[NewItem], fresh: list[NewItem], known: dict, blobs: dict[str, str], shards: dict
    ) -> dict:
        placed: dict[str, tuple[int | None, int]] = {}
        for modality in (IMAGE, TEXT):
            for row, item in enumerate(i for i in fresh if i.modality == modality):
                placed[item.item_id] = (shards[modality], row)
        counts = {"added": 0, "changed": 0, "unchanged": len(items) - len(fresh), "pairs_added": 0}
        with self.catalog.tx() as db:
            seq = next_seq(db)
            for item in fresh:
                counts["changed" if item.item_id in known else "added"] += 1
                shard, row = placed[item.item_id]
                db.execute(
                    "INSERT INTO items (id, modality, text, source, metadata, content_hash, shard, row, error, "
                    "added_at, seq, blob) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?) ON CONFLICT(id) DO UPDATE "
                    "SET modality=excluded.modality, text=excluded.text, source=excluded.source, "
                    "metadata=excluded.metadata, content_hash=excluded.content_hash, shard=excluded.shard, "
                    "row=excluded.row, error=NULL, seq=excluded.seq, blob=excluded.blob",
                    (
                        item.item_id,
                        item.modality,
                        item.text or "",
                        item.source,
                        json.dumps(item.metadata, sort_keys=True),
                        item.content_hash,
                        shard,
                        row,
                        time.time(),
                        seq,
                        blobs.get(item.item_id),
                    ),
                )
                db.execute("DELETE FROM tombstones WHERE id = ?", (item.item_id,))
            counts["pairs_added"] = self._add_pairs(db, items)
        return counts

    @staticmethod
    def _add_pairs(db, items: list[NewItem]) -> int:
        added = 0
        for item in items:
            if item.pair_id:
                image_id, text_id = (
                    (item.item_id, item.pair_id) if item.modality == IMAGE else (item.pair_id, item.item_id)
                )
                added += db.execute(
                    "INSERT OR IGNORE INTO pairs (image_id, text_id, split) VALUES (?, ?, ?)",
                    (image_id, text_id, split_for(image_id)),
                ).rowcount
        return added

    # -- deletes ---------------------------------------------------------------------------
    def delete(self, item_ids: list[str], *, purge: bool = False) -> tuple[list[str], list[str]]:
        """Delete items: gone from the catalog (with the feedback events that used them) and
        hidden from every snapshot at once; with ``purge``, also erased from every file of
        the data directory before this returns (a compaction), else at the next compaction.

        Returns:
            (deleted ids, unknown ids).

        Raises:
            InvalidArgument: no ids, an empty id. ResourceExhausted: too many ids.
        """
        if not item_ids:
            raise InvalidArgument("item_ids is empty: pass the ids to delete")
        self.limits.at_most("max_upsert_items", len(item_ids), "ids in one call", "send smaller batches")
        for item_id in item_ids:
            check_item_id(item_id)
        with self.view.write_lock:
            deleted = self._delete_rows(list(dict.fromkeys(item_ids)))
            if self.view.peek() is not None:
                self.view.apply_delete(deleted)
        log.info("deleted %d item(s)%s", len(deleted), " (purging)" if purge else "")
        if purge and self.compactor is not None:
            self.compactor.compact("purge")
        return deleted, [i for i in dict.fromkeys(item_ids) if i not in set(deleted)]

    def _delete_rows(self, item_ids: list[str]) -> list[str]:
        with self.catalog.tx() as db:
            marks = ",".join("?" * len(item_ids))
            existing = [r[0] for r in db.execute(f"SELECT id FROM items WHERE id IN ({marks})", item_ids)]
            if existing:
                seq = next_seq(db)
                marks = ",".join("?" * len(existing))
                db.execute(f"DELETE FROM pairs WHERE image_id IN ({marks}) OR text_id IN ({marks})", existing * 2)
                db.execute(f"DELETE FROM items WHERE id IN ({marks})", existing)
                FeedbackLog.forget(db, existing)
                now = time.time()
                db.executemany(
                    "INSERT OR REPLACE INTO tombstones (id, seq, deleted_at) VALUES (?, ?, ?)",
                    [(i, seq, now) for i in existing],
                )
        return existing


__all__ = ["CorpusWrites", "NewItem", "check_item_id", "parse_metadata", "tombstoned"]
