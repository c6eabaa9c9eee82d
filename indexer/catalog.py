"""The catalog: one SQLite database (WAL) per data directory, the source of truth.

Tables: items, pairs, snapshots, meta. Every write is one transaction, so a crash
leaves either the old or the new state. Connections are per thread.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

from .corpus import IMAGE, MODALITIES, TEXT, CorpusItem, CorpusPair
from .errors import FailedPrecondition

SCHEMA_VERSION = 1
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    modality TEXT NOT NULL CHECK (modality IN ('image', 'text')),
    text TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    content_hash TEXT NOT NULL,
    shard INTEGER,            -- base/<modality>/shard-<n>.npy holding its base vector
    row INTEGER,              -- row in that shard
    error TEXT,               -- why it could not be embedded (undecodable image)
    added_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_pending ON items (modality, shard);
CREATE TABLE IF NOT EXISTS pairs (
    image_id TEXT NOT NULL REFERENCES items(id),
    text_id TEXT NOT NULL REFERENCES items(id),
    split TEXT NOT NULL CHECK (split IN ('train', 'val', 'test')),
    PRIMARY KEY (image_id, text_id)
);
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
CREATE TABLE IF NOT EXISTS refit_runs (
    id TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    parent_id TEXT,
    snapshot_id TEXT,
    before TEXT NOT NULL DEFAULT '{}',
    after TEXT NOT NULL DEFAULT '{}',
    message TEXT NOT NULL DEFAULT '',
    feedback_events INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    parent_id TEXT,
    manifest TEXT NOT NULL
);
"""


def split_for(image_id: str, fractions: Sequence[float] = SPLIT_FRACTIONS) -> str:
    """Deterministic split of a pair, by its image id: every text of one image lands in
    the same split, so no image is both trained on and tested on."""
    bucket = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big") / 2**64
    if bucket < fractions[0]:
        return "train"
    if bucket < fractions[0] + fractions[1]:
        return "val"
    return "test"


class Catalog:
    """Thread-safe access to catalog.sqlite (one connection per thread)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self.db()
        db.executescript(_SCHEMA)  # idempotent; executescript commits on its own
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- connections -------------------------------------------------------------
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def tx(self):
        return _Transaction(self.db())

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- meta ----------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def bind_encoder(self, identity: str, *, model: str, pretrained: str | None) -> None:
        """Record the encoder on first use (with the model arguments, so that `xmodal serve`
        can default to them); refuse another one later (base vectors from two encoders
        cannot share an index)."""
        with self.tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'encoder'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('encoder', ?)", (identity,))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('model', ?)", (json.dumps([model, pretrained]),))
            elif row[0] != identity:
                raise FailedPrecondition(
                    f"this data directory was built with encoder {row[0]}, not {identity}: "
                    "use the same --model/--pretrained, or a new --data directory"
                )

    # -- items and pairs -------------------------------------------------------------
    def upsert_items(self, items: Iterable[tuple[CorpusItem, str]]) -> dict[str, int]:
        """Insert items with their content hashes; an item whose content changed is
        re-queued for embedding; an unchanged one is left alone. Returns counts."""
        counts = {"added": 0, "changed": 0, "unchanged": 0}
        now = time.time()
        with self.tx() as db:
            for item, content_hash in items:
                row = db.execute("SELECT content_hash FROM items WHERE id = ?", (item.id,)).fetchone()
                values = (item.modality, item.text, item.source, json.dumps(item.metadata, sort_keys=True), content_hash)
                if row is None:
                    db.execute(
                        "INSERT INTO items (modality, text, source, metadata, content_hash, id, added_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (*values, item.id, now))
                    counts["added"] += 1
                elif row[0] != content_hash:
                    db.execute(
                        "UPDATE items SET modality=?, text=?, source=?, metadata=?, content_hash=?, "
                        "shard=NULL, row=NULL, error=NULL WHERE id=?", (*values, item.id))
                    counts["changed"] += 1
                else:
                    counts["unchanged"] += 1
        return counts

    def add_pairs(self, pairs: Iterable[CorpusPair]) -> int:
        added = 0
        with self.tx() as db:
            for pair in pairs:
                cur = db.execute(
                    "INSERT OR IGNORE INTO pairs (image_id, text_id, split) VALUES (?, ?, ?)",
                    (pair.image_id, pair.text_id, pair.split or split_for(pair.image_id)))
                added += cur.rowcount
        return added

    def pending(self, modality: str) -> list[sqlite3.Row]:
        """Items of a modality without a base vector and without a recorded failure."""
        return self.db().execute(
            "SELECT id, text, source FROM items WHERE modality = ? AND shard IS NULL AND error IS NULL ORDER BY id",
            (modality,)).fetchall()

    def set_embedded(self, shard: int, ids: Sequence[str]) -> None:
        with self.tx() as db:
            db.executemany("UPDATE items SET shard = ?, row = ? WHERE id = ?",
                           [(shard, row, item_id) for row, item_id in enumerate(ids)])

    def set_failed(self, failures: dict[str, str]) -> None:
        with self.tx() as db:
            db.executemany("UPDATE items SET error = ? WHERE id = ?", [(err, i) for i, err in failures.items()])

    def failed(self, modality: str = IMAGE) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self.db().execute(
            "SELECT id, error FROM items WHERE modality = ? AND error IS NOT NULL ORDER BY id", (modality,))]

    def embedded(self, modality: str) -> list[tuple[str, int, int]]:
        """(id, shard, row) of every embedded item of a modality, in index order."""
        return [(r[0], r[1], r[2]) for r in self.db().execute(
            "SELECT id, shard, row FROM items WHERE modality = ? AND shard IS NOT NULL ORDER BY shard, row",
            (modality,))]

    def used_shards(self, modality: str) -> set[int]:
        return {r[0] for r in self.db().execute(
            "SELECT DISTINCT shard FROM items WHERE modality = ? AND shard IS NOT NULL", (modality,))}

    def count_items(self) -> dict[str, int]:
        counts = dict.fromkeys(MODALITIES, 0)
        for modality, n in self.db().execute("SELECT modality, COUNT(*) FROM items GROUP BY modality"):
            counts[modality] = n
        return counts

    def count_pairs(self) -> dict[str, int]:
        counts = {"train": 0, "val": 0, "test": 0}
        for split, n in self.db().execute("SELECT split, COUNT(*) FROM pairs GROUP BY split"):
            counts[split] = n
        return counts

    def pairs(self, split: str | None = None) -> list[tuple[str, str]]:
        query = "SELECT image_id, text_id FROM pairs"
        args: tuple = ()
        if split:
            query += " WHERE split = ?"
            args = (split,)
        return [(r[0], r[1]) for r in self.db().execute(query + " ORDER BY image_id, text_id", args)]

    def _rows_by_id(self, columns: str, ids: Sequence[str]) -> list[sqlite3.Row]:
        """Item rows for the given ids (unknown ids are simply absent), in chunks that stay
        under SQLite's limit on bound parameters."""
        ids = list(dict.fromkeys(ids))
        rows: list[sqlite3.Row] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows += self.db().execute(f"SELECT {columns} FROM items WHERE id IN ({marks})", chunk).fetchall()
        return rows

    def get_items(self, ids: Sequence[str]) -> dict[str, sqlite3.Row]:
        """Rows for the given ids (missing ids are simply absent)."""
        return {row["id"]: row for row in
                self._rows_by_id("id, modality, text, source, metadata, content_hash", ids)}

    # -- snapshots --------------------------------------------------------------------
    def record_snapshot(self, manifest: dict) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO snapshots (id, created_at, parent_id, manifest) VALUES (?, ?, ?, ?)",
                       (manifest["id"], manifest["created_at"], manifest.get("parent_id"), json.dumps(manifest)))


    # -- feedback ---------------------------------------------------------------------
    def add_feedback(self, *, feedback_id: str, query_kind: str, query_modality: str, query_text: str,
                     embedding, relevant: Sequence[str], irrelevant: Sequence[str], weight: float,
                     source: str, split: str) -> None:
        """Store one feedback event; durable (WAL, synchronous=FULL) when this returns."""
        import numpy as np

        blob = np.ascontiguousarray(embedding, dtype=np.float32).tobytes()
        with self.tx() as db:
            db.execute(
                "INSERT INTO feedback (id, created_at, query_kind, query_modality, query_text, query_embedding, "
                "relevant, irrelevant, weight, source, split) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (feedback_id, time.time(), query_kind, query_modality, query_text, blob, json.dumps(list(relevant)),
                 json.dumps(list(irrelevant)), float(weight), source, split))

    def feedback(self) -> list[sqlite3.Row]:
        return self.db().execute("SELECT * FROM feedback ORDER BY created_at, id").fetchall()

    def feedback_ids(self) -> set[str]:
        return {r[0] for r in self.db().execute("SELECT id FROM feedback")}

    def count_feedback(self, since: float | None = None) -> int:
        if since is None:
            return self.db().execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
        return self.db().execute("SELECT COUNT(*) FROM feedback WHERE created_at > ?", (since,)).fetchone()[0]

    # -- refit runs -----------------------------------------------------------------------
    def start_run(self, run_id: str, mode: str, parent_id: str | None) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO refit_runs (id, mode, state, started_at, parent_id) VALUES (?, ?, 'running', ?, ?)",
                       (run_id, mode, time.time(), parent_id))

    def finish_run(self, run_id: str, *, state: str, mode: str, snapshot_id: str | None = None,
                   before: dict | None = None, after: dict | None = None, message: str = "",
                   feedback_events: int = 0) -> None:
        with self.tx() as db:
            db.execute("UPDATE refit_runs SET state=?, mode=?, finished_at=?, snapshot_id=?, before=?, after=?, "
                       "message=?, feedback_events=? WHERE id=?",
                       (state, mode, time.time(), snapshot_id, json.dumps(before or {}), json.dumps(after or {}),
                        message, feedback_events, run_id))

    def runs(self, limit: int = 10) -> list[sqlite3.Row]:
        return self.db().execute("SELECT * FROM refit_runs ORDER BY started_at DESC LIMIT ?", (limit,)).fetchall()

    def interrupt_running_runs(self) -> list[str]:
        """Mark runs left 'running' by a crash as 'interrupted'; returns their ids."""
        with self.tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM refit_runs WHERE state = 'running'")]
            db.execute("UPDATE refit_runs SET state='interrupted', finished_at=?, "
                       "message='the server stopped before the run finished' WHERE state='running'", (time.time(),))
        return ids

    def last_run_started(self) -> float | None:
        row = self.db().execute("SELECT MAX(started_at) FROM refit_runs").fetchone()
        return row[0]

    def item_rows(self, ids: Sequence[str]) -> dict[str, tuple[str, int | None, int | None]]:
        """id -> (modality, shard, row) for the given ids that exist."""
        return {r[0]: (r[1], r[2], r[3]) for r in self._rows_by_id("id, modality, shard, row", ids)}


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT/ROLLBACK around a block (autocommit connections)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = ["Catalog", "split_for", "text_hash", "IMAGE", "TEXT"]
