"""The catalog: one SQLite database (WAL) per data directory, the source of truth.

Tables: items, pairs, snapshots, meta. Other parts keep their own tables in the same
database through :meth:`Catalog.ensure_schema`: feedback events
(xmodal.indexer.feedback.FeedbackLog) and refit runs (xmodal.server.runs.RefitRuns).
Every write is one transaction, so a crash leaves either the old or the new state. Connections are per thread.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .corpus import IMAGE, MODALITIES, TEXT, CorpusItem, CorpusPair
from .errors import FailedPrecondition

if TYPE_CHECKING:
    from .manifest import Manifest

SCHEMA_VERSION = 1
READ_ONLY_REFRESH_S = 1.0  # a read-only catalog's connections are re-opened this often
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    modality TEXT NOT NULL CHECK (modality IN ('image', 'text')),
    text TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',  -- shown to clients: relative to the corpus root, never a server path
    metadata TEXT NOT NULL DEFAULT '{}',
    content_hash TEXT NOT NULL,
    shard INTEGER,            -- base/<modality>/shard-<n>.npy holding its base vector
    row INTEGER,              -- row in that shard
    error TEXT,               -- why it could not be embedded (undecodable image)
    added_at REAL NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,  -- when its base vector was written (catalog-wide order)
    blob TEXT,                -- the file under the data directory GetItems returns (upserted bytes, DICOM copies)
    path TEXT                 -- an indexed image file's own path, read by the server only
);
CREATE INDEX IF NOT EXISTS items_pending ON items (modality, shard);
CREATE TABLE IF NOT EXISTS pairs (
    image_id TEXT NOT NULL REFERENCES items(id),
    text_id TEXT NOT NULL REFERENCES items(id),
    split TEXT NOT NULL CHECK (split IN ('train', 'val', 'test')),
    PRIMARY KEY (image_id, text_id)
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
    """Thread-safe access to catalog.sqlite (one connection per thread).

    ``read_only`` (a read-only replica's catalog) never writes: no schema, no pragmas that
    write. While a primary runs (the WAL file exists) it reads as any WAL reader does, which
    means taking read-marks in the primary's shared-memory index (``-shm``); when none runs
    it opens the file immutable, so not a byte changes. Its connections are re-opened at
    least every :data:`READ_ONLY_REFRESH_S` seconds, and at once when a primary appears.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._local = threading.local()
        self._open: list[sqlite3.Connection] = []  # every thread's, for close_all
        self._open_lock = threading.Lock()
        if read_only:
            if not self.path.is_file():
                raise FailedPrecondition(
                    f"no catalog in {self.path.parent.name!r}: a read-only replica serves a data directory a "
                    "primary has written (index it, or serve it once without --read-only)"
                )
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self.db()
        db.executescript(_SCHEMA)  # idempotent; executescript commits on its own
        _add_missing_columns(db)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- connections -------------------------------------------------------------
    def db(self) -> sqlite3.Connection:
        if self.read_only:
            return self._read_only_db()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA secure_delete=ON")  # erased rows leave zeros, not their bytes
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._open_lock:
                self._open.append(conn)
        return conn

    def _read_only_db(self) -> sqlite3.Connection:
        live = self.path.with_name(self.path.name + "-wal").exists()  # a primary has it open
        conn = getattr(self._local, "conn", None)
        stale = conn is not None and time.monotonic() - self._local.opened > READ_ONLY_REFRESH_S
        if conn is not None and (stale or self._local.live != live):
            conn.close()
            conn = None
        if conn is None:
            mode = "mode=ro" if live else "immutable=1"
            conn = sqlite3.connect(
                f"file:{self.path}?{mode}", uri=True, timeout=30, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA query_only=ON")
            conn.row_factory = sqlite3.Row
            self._local.conn, self._local.live, self._local.opened = conn, live, time.monotonic()
        return conn

    def has_table(self, name: str) -> bool:
        return (
            self.db().execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
            is not None
        )

    def close_all(self) -> None:
        """Close every thread's connection (a stopping server): the last one to close lets
        SQLite fold the WAL into the database and remove it."""
        with self._open_lock:
            connections, self._open = self._open, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.ProgrammingError:
                pass
        self._local = threading.local()

    def checkpoint(self, timeout: float = 30.0) -> None:
        """Copy the WAL into the database and truncate it to zero bytes, so that no earlier
        version of an erased row survives in it. Retries while readers hold old frames.

        Raises:
            FailedPrecondition: readers kept the WAL busy for ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            busy, _, _ = self.db().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return
            if time.monotonic() > deadline:
                raise FailedPrecondition("could not truncate the catalog's WAL: readers kept it busy; try again")
            time.sleep(0.05)

    def tx(self) -> _Transaction:
        return _Transaction(self.db())

    def ensure_schema(self, sql: str) -> None:
        """Create the tables another part owns (idempotent: CREATE ... IF NOT EXISTS); a
        read-only catalog creates nothing (the primary made them)."""
        if not self.read_only:
            self.db().executescript(sql)

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
                values = (
                    item.modality,
                    item.text,
                    item.source,
                    json.dumps(item.metadata, sort_keys=True),
                    content_hash,
                    item.path or None,
                )
                if row is None:
                    db.execute(
                        "INSERT INTO items (modality, text, source, metadata, content_hash, path, id, added_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (*values, item.id, now),
                    )
                    counts["added"] += 1
                elif row[0] != content_hash:
                    db.execute(
                        "UPDATE items SET modality=?, text=?, source=?, metadata=?, content_hash=?, path=?, "
                        "shard=NULL, row=NULL, error=NULL, blob=NULL WHERE id=?",
                        (*values, item.id),
                    )
                    counts["changed"] += 1
                else:
                    # same content: the corpus may have moved, or a catalog from before sources were relative
                    db.execute(
                        "UPDATE items SET source=?, path=? WHERE id=?", (item.source, item.path or None, item.id)
                    )
                    counts["unchanged"] += 1
        return counts

    def add_pairs(self, pairs: Iterable[CorpusPair]) -> int:
        added = 0
        with self.tx() as db:
            for pair in pairs:
                cur = db.execute(
                    "INSERT OR IGNORE INTO pairs (image_id, text_id, split) VALUES (?, ?, ?)",
                    (pair.image_id, pair.text_id, pair.split or split_for(pair.image_id)),
                )
                added += cur.rowcount
        return added

    def pending(self, modality: str) -> list[sqlite3.Row]:
        """Items of a modality without a base vector and without a recorded failure."""
        return (
            self.db()
            .execute(
                "SELECT id, text, source, path FROM items WHERE modality = ? AND shard IS NULL AND error IS NULL "
                "ORDER BY id",
                (modality,),
            )
            .fetchall()
        )

    def set_embedded(self, shard: int, ids: Sequence[str]) -> None:
        with self.tx() as db:
            seq = next_seq(db)
            db.executemany(
                f"UPDATE items SET shard = ?, row = ?, seq = {seq} WHERE id = ?",
                [(shard, row, item_id) for row, item_id in enumerate(ids)],
            )

    def move_rows(self, shard: int, ids: Sequence[str]) -> None:
        """Point items at their rows in a rewritten shard (their ``seq`` stays: the vectors
        did not change)."""
        with self.tx() as db:
            db.executemany(
                "UPDATE items SET shard = ?, row = ? WHERE id = ?", [(shard, row, i) for row, i in enumerate(ids)]
            )

    def set_blobs(self, blobs: dict[str, str]) -> None:
        """Point items at the files under the data directory that GetItems returns for them."""
        with self.tx() as db:
            db.executemany("UPDATE items SET blob = ? WHERE id = ?", [(blob, i) for i, blob in blobs.items()])

    def set_failed(self, failures: dict[str, str]) -> None:
        with self.tx() as db:
            db.executemany("UPDATE items SET error = ? WHERE id = ?", [(err, i) for i, err in failures.items()])

    def failed(self, modality: str = IMAGE) -> list[tuple[str, str]]:
        return [
            (r[0], r[1])
            for r in self.db().execute(
                "SELECT id, error FROM items WHERE modality = ? AND error IS NOT NULL ORDER BY id", (modality,)
            )
        ]

    def embedded(self, modality: str, after_seq: int = -1) -> list[tuple[str, int, int, int]]:
        """(id, shard, row, seq) of every embedded item of a modality (written after
        ``after_seq``), in index order."""
        return [
            (r[0], r[1], r[2], r[3])
            for r in self.db().execute(
                "SELECT id, shard, row, seq FROM items WHERE modality = ? AND shard IS NOT NULL AND seq > ? "
                "ORDER BY shard, row",
                (modality, after_seq),
            )
        ]

    def used_shards(self, modality: str) -> set[int]:
        return {
            r[0]
            for r in self.db().execute(
                "SELECT DISTINCT shard FROM items WHERE modality = ? AND shard IS NOT NULL", (modality,)
            )
        }

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
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += self.db().execute(f"SELECT {columns} FROM items WHERE id IN ({marks})", chunk).fetchall()
        return rows

    def get_items(self, ids: Sequence[str]) -> dict[str, sqlite3.Row]:
        """Rows for the given ids (missing ids are simply absent)."""
        return {
            row["id"]: row
            for row in self._rows_by_id("id, modality, text, source, metadata, content_hash, blob, path", ids)
        }

    # -- snapshots --------------------------------------------------------------------
    def record_snapshot(self, manifest: Manifest) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO snapshots (id, created_at, parent_id, manifest) VALUES (?, ?, ?, ?)",
                (manifest.id, manifest.created_at, manifest.parent_id, json.dumps(manifest.to_dict())),
            )

    def item_rows(self, ids: Sequence[str]) -> dict[str, tuple[str, int | None, int | None]]:
        """id -> (modality, shard, row) for the given ids that exist."""
        return {r[0]: (r[1], r[2], r[3]) for r in self._rows_by_id("id, modality, shard, row", ids)}


def next_seq(db: sqlite3.Connection) -> int:
    """The next value of the catalog-wide write sequence (inside a write transaction): items
    embedded later have a larger ``seq``, so a snapshot knows which items it predates."""
    db.execute("INSERT OR IGNORE INTO meta VALUES ('seq', '0')")
    db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'seq'")
    return int(db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Catalogs made before the live corpus lack items.seq and items.blob; before DICOM, items.path."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(items)")}
    for name, declaration in (("seq", "INTEGER NOT NULL DEFAULT 0"), ("blob", "TEXT"), ("path", "TEXT")):
        if name not in columns:
            db.execute(f"ALTER TABLE items ADD COLUMN {name} {declaration}")


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
