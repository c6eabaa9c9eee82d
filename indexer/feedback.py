"""Feedback events as training and validation data.

A feedback event (stored by the server's SubmitFeedback) holds the query's base embedding,
the items a user confirmed and, optionally, the items they marked as wrong. Refits
(server/refit.py) and offline fits (:mod:`.adapt`: ``xmodal fit``, ``xmodal index``)
both train on the training slice of the events and validate on the held-out slice, so a
re-indexed or refitted head keeps what users taught it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .catalog import Catalog, text_hash
from .corpus import IMAGE, TEXT
from .errors import NotFound
from .evaluate import retrieval_metrics
from .heads import Head
from .train import PairSet, item_key
from .vectors import ModalityVectors, Vectors, other_modality

FEEDBACK_VAL_FRACTION = 0.2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    query_kind TEXT NOT NULL CHECK (query_kind IN ('text', 'image', 'item_id')),
    query_modality TEXT NOT NULL CHECK (query_modality IN ('image', 'text')),
    query_text TEXT NOT NULL DEFAULT '',   -- the text, or the item id for item_id queries
    query_embedding BLOB NOT NULL,         -- the query's base embedding, float32
    relevant TEXT NOT NULL,                -- JSON list of item ids
    irrelevant TEXT NOT NULL DEFAULT '[]', -- JSON list of item ids
    weight REAL NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    split TEXT NOT NULL CHECK (split IN ('train', 'val'))
);
CREATE INDEX IF NOT EXISTS feedback_created ON feedback (created_at);
"""


class FeedbackLog:
    """The feedback events of a catalog: written by the server, read by every fit."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        catalog.ensure_schema(_SCHEMA)

    def add(
        self,
        *,
        feedback_id: str,
        query_kind: str,
        query_modality: str,
        query_text: str,
        embedding: np.ndarray,
        relevant: Sequence[str],
        irrelevant: Sequence[str],
        weight: float,
        source: str,
        split: str,
    ) -> None:
        """Store one feedback event; durable (WAL, synchronous=FULL) when this returns.

        Raises:
            NotFound: an item it names was deleted meanwhile (checked in the same
                transaction, so no event outlives the erasure of an item it uses).
        """
        blob = np.ascontiguousarray(embedding, dtype=np.float32).tobytes()
        named = list(dict.fromkeys([*relevant, *irrelevant, *([query_text] if query_kind == "item_id" else [])]))
        with self.catalog.tx() as db:
            marks = ",".join("?" * len(named))
            present = {r[0] for r in db.execute(f"SELECT id FROM items WHERE id IN ({marks})", named)}
            if len(present) != len(named):
                gone = [i for i in named if i not in present]
                raise NotFound(f"unknown item id(s) in feedback: {', '.join(repr(i) for i in gone[:10])}")
            db.execute(
                "INSERT INTO feedback (id, created_at, query_kind, query_modality, query_text, query_embedding, "
                "relevant, irrelevant, weight, source, split) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    feedback_id,
                    time.time(),
                    query_kind,
                    query_modality,
                    query_text,
                    blob,
                    json.dumps(list(relevant)),
                    json.dumps(list(irrelevant)),
                    float(weight),
                    source,
                    split,
                ),
            )

    @staticmethod
    def forget(db: sqlite3.Connection, item_ids: Sequence[str]) -> int:
        """Delete (inside the caller's transaction) every event that used one of
        ``item_ids`` as its query or among its answers; returns how many."""
        forgotten = 0
        for start in range(0, len(item_ids), 300):
            chunk = list(item_ids[start : start + 300])
            marks = ",".join("?" * len(chunk))
            forgotten += db.execute(
                f"DELETE FROM feedback WHERE (query_kind = 'item_id' AND query_text IN ({marks})) "
                f"OR EXISTS (SELECT 1 FROM json_each(feedback.relevant) WHERE value IN ({marks})) "
                f"OR EXISTS (SELECT 1 FROM json_each(feedback.irrelevant) WHERE value IN ({marks}))",
                chunk * 3,
            ).rowcount
        return forgotten

    @staticmethod
    def forget_unknown(db: sqlite3.Connection) -> int:
        """Delete (inside the caller's transaction) every event that names an item the
        catalog no longer holds; returns how many."""
        return db.execute(
            "DELETE FROM feedback WHERE (query_kind = 'item_id' AND query_text NOT IN (SELECT id FROM items)) "
            "OR EXISTS (SELECT 1 FROM json_each(feedback.relevant) WHERE value NOT IN (SELECT id FROM items)) "
            "OR EXISTS (SELECT 1 FROM json_each(feedback.irrelevant) WHERE value NOT IN (SELECT id FROM items))"
        ).rowcount

    def events(self) -> list[sqlite3.Row]:
        return self.catalog.db().execute("SELECT * FROM feedback ORDER BY created_at, id").fetchall()

    def ids(self) -> set[str]:
        return {r[0] for r in self.catalog.db().execute("SELECT id FROM feedback")}

    def count(self, since: float | None = None) -> int:
        db = self.catalog.db()
        if since is None:
            return db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
        return db.execute("SELECT COUNT(*) FROM feedback WHERE created_at > ?", (since,)).fetchone()[0]


def feedback_split(query_key: str, val_fraction: float = FEEDBACK_VAL_FRACTION) -> str:
    """Deterministic slice of feedback held out for validating refits, keyed on the query.

    Keyed on what was asked (not on the random feedback id), so the same query confirmed
    twice never lands in both slices (no leak from training into validation), and the
    same feedback gives the same slices on every run.
    """
    bucket = int.from_bytes(hashlib.sha256(query_key.encode()).digest()[:8], "big") / 2**64
    return "val" if bucket < val_fraction else "train"


def feedback_query_key(kind: str, content: str | bytes) -> str:
    """What a feedback query is, for :func:`feedback_split`: the text (case and spacing
    folded), the item id, or the sha256 of the image bytes."""
    if kind == "text":
        return "text:" + " ".join(str(content).lower().split())
    if kind == "image":
        return "image:" + hashlib.sha256(content if isinstance(content, bytes) else content.encode()).hexdigest()
    return f"{kind}:{content!s}"


def event_query_key(event) -> str:
    """:func:`feedback_query_key` of a stored event (image bytes are not stored: each image
    query is its own)."""
    if event["query_kind"] == "image":
        return "image-event:" + event["id"]
    return feedback_query_key(event["query_kind"], event["query_text"])


def split_events(catalog: Catalog) -> tuple[list, list]:
    """(training slice, held-out slice) of the catalog's feedback events."""
    events = FeedbackLog(catalog).events()
    return [e for e in events if e["split"] == "train"], [e for e in events if e["split"] == "val"]


def feedback_pairs(
    catalog: Catalog, events, vectors: Vectors, weight_scale: float = 1.0
) -> tuple[PairSet | None, str | None]:
    """Feedback events -> (image, text) pairs of base vectors, and the queries' main modality.

    An event whose query and relevant item are of different modalities gives one pair per
    relevant item; same-modality confirmations are kept in the catalog but not trained on.
    Its irrelevant items of the relevant items' modality become hard negatives of each of
    those pairs. Keys are :func:`item_key`s, in the corpus pairs' key space: a confirmed
    image is the same group as that image in the corpus pairs, a typed query that equals a
    caption the same group as that caption.

    Args:
        events: feedback rows of the catalog (usually one slice of them).
        vectors: the store's base vectors.
        weight_scale: multiplies each event's own weight.
    """
    builder = _FeedbackPairs(_text_hashes(catalog, events), weight_scale)
    for event in events:
        builder.add(event, vectors[other_modality(event["query_modality"])])
    return builder.pair_set()


class _FeedbackPairs:
    """Accumulates the pairs and hard negatives of feedback events, in one key space."""

    def __init__(self, text_hashes: dict[str, str], weight_scale: float):
        self.text_hashes, self.weight_scale = text_hashes, weight_scale
        self.image: list[np.ndarray] = []
        self.text: list[np.ndarray] = []
        self.image_keys: list[int] = []
        self.text_keys: list[int] = []
        self.weights: list[float] = []
        self.hard: list[np.ndarray] = []
        self.hard_rows: list[int] = []
        self.hard_is_image: list[bool] = []
        self.modality_counts = {IMAGE: 0, TEXT: 0}

    def key_of(self, modality: str, item_id: str) -> int:
        return item_key("image", item_id) if modality == IMAGE else item_key("text", self.text_hashes[item_id])

    def query_key(self, event) -> int:
        if event["query_kind"] == "item_id":
            return self.key_of(event["query_modality"], event["query_text"])
        if event["query_kind"] == "text":
            return item_key("text", text_hash(event["query_text"]))
        return item_key("query-image", event["id"])

    def add(self, event, gallery: ModalityVectors) -> None:
        """One pair per relevant item of the other modality, with the event's wrong items
        of that modality as its hard negatives."""
        query_modality = event["query_modality"]
        query = np.frombuffer(event["query_embedding"], dtype=np.float32)
        query_key = self.query_key(event)
        relevant = [i for i in json.loads(event["relevant"]) if i in gallery.rows]
        irrelevant = dict.fromkeys(json.loads(event["irrelevant"] or "[]"))
        wrong = [gallery.rows[i] for i in irrelevant if i in gallery.rows and i not in relevant]
        for item in relevant:
            target = gallery.array[gallery.rows[item]]
            self.modality_counts[query_modality] += 1
            if query_modality == TEXT:
                self._pair(target, query, self.key_of(IMAGE, item), query_key)
            else:
                self._pair(query, target, query_key, self.key_of(TEXT, item))
            self.weights.append(event["weight"] * self.weight_scale)
            for row in wrong:
                self.hard.append(gallery.array[row])
                self.hard_rows.append(len(self.image) - 1)
                self.hard_is_image.append(query_modality == TEXT)

    def _pair(self, image: np.ndarray, text: np.ndarray, image_key: int, text_key: int) -> None:
        self.image.append(image)
        self.text.append(text)
        self.image_keys.append(image_key)
        self.text_keys.append(text_key)

    def pair_set(self) -> tuple[PairSet | None, str | None]:
        if not self.image:
            return None, None
        main = max(self.modality_counts, key=lambda modality: self.modality_counts[modality])
        dim = len(self.image[0])
        pairs = PairSet(
            np.stack(self.image),
            np.stack(self.text),
            np.asarray(self.image_keys, np.int64),
            np.asarray(self.text_keys, np.int64),
            weights=np.asarray(self.weights, np.float32),
            hard=np.stack(self.hard) if self.hard else np.zeros((0, dim), np.float32),
            hard_rows=np.asarray(self.hard_rows, np.int64),
            hard_is_image=np.asarray(self.hard_is_image, bool),
        )
        return pairs, main


def _text_hashes(catalog: Catalog, events) -> dict[str, str]:
    """Content hashes of the text items named by feedback events (relevant, irrelevant, query)."""
    ids = set()
    for event in events:
        ids.update(json.loads(event["relevant"]))
        ids.update(json.loads(event["irrelevant"] or "[]"))
        if event["query_kind"] == "item_id":
            ids.add(event["query_text"])
    rows = catalog.get_items(sorted(ids))
    return {i: r["content_hash"] for i, r in rows.items() if r["modality"] == TEXT}


class HeldOutQuery(NamedTuple):
    modality: str  # of the query
    embedding: np.ndarray  # its base embedding
    relevant: set[int]  # gallery rows of every item any user confirmed for it


def held_out_queries(events, vectors: Vectors) -> list[HeldOutQuery]:
    """The distinct held-out queries as (query modality, base embedding, rows of every item
    any user confirmed for that query in the relevant items' modality). Built once per fit;
    :func:`feedback_recall` scores them every epoch."""
    queries: dict[str, HeldOutQuery] = {}
    for event in events:
        modality = event["query_modality"]
        gallery = vectors[other_modality(modality)]
        right = {gallery.rows[i] for i in json.loads(event["relevant"]) if i in gallery.rows}
        if not right:
            continue
        key = event_query_key(event)
        if key not in queries:
            queries[key] = HeldOutQuery(modality, np.frombuffer(event["query_embedding"], np.float32), set())
        queries[key].relevant.update(right)
    return list(queries.values())


def feedback_recall(head: Head, queries: list[HeldOutQuery], vectors: Vectors, k: int = 10) -> float | None:
    """Recall@k of the held-out feedback queries (from :func:`held_out_queries`): each one
    (through its query adapter) against the whole gallery of its relevant items' modality.
    The right answers of a query are every item any user confirmed for it (a vague query
    confirmed with several images has several right answers)."""
    if not queries:
        return None
    hits, total = 0.0, 0
    for modality in (IMAGE, TEXT):
        chosen = [q for q in queries if q.modality == modality]
        other = other_modality(modality)
        if not chosen or not len(vectors[other]):
            continue
        gallery = head.project(other, vectors[other].array)
        projected = head.project(modality, np.stack([q.embedding for q in chosen]), query=True)
        result = retrieval_metrics(projected, gallery, [q.relevant for q in chosen], ks=(k,))
        hits += result[f"recall@{k}"] * len(chosen)
        total += len(chosen)
    return hits / total if total else None


__all__ = [
    "FEEDBACK_VAL_FRACTION",
    "FeedbackLog",
    "HeldOutQuery",
    "event_query_key",
    "feedback_pairs",
    "feedback_query_key",
    "feedback_recall",
    "feedback_split",
    "held_out_queries",
    "split_events",
]
