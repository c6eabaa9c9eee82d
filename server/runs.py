"""The refit runs table: the server's record of every refit, in the catalog database."""

from __future__ import annotations

import json
import sqlite3
import time

from xmodal.indexer.catalog import Catalog

_SCHEMA = """
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
"""


class RefitRuns:
    """Refit runs: started, finished (promoted / rejected / failed) or interrupted."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        catalog.ensure_schema(_SCHEMA)

    def start(self, run_id: str, mode: str, parent_id: str | None) -> None:
        with self.catalog.tx() as db:
            db.execute(
                "INSERT INTO refit_runs (id, mode, state, started_at, parent_id) VALUES (?, ?, 'running', ?, ?)",
                (run_id, mode, time.time(), parent_id),
            )

    def finish(
        self,
        run_id: str,
        *,
        state: str,
        mode: str,
        snapshot_id: str | None = None,
        before: dict | None = None,
        after: dict | None = None,
        message: str = "",
        feedback_events: int = 0,
    ) -> None:
        with self.catalog.tx() as db:
            db.execute(
                "UPDATE refit_runs SET state=?, mode=?, finished_at=?, snapshot_id=?, before=?, after=?, "
                "message=?, feedback_events=? WHERE id=?",
                (
                    state,
                    mode,
                    time.time(),
                    snapshot_id,
                    json.dumps(before or {}),
                    json.dumps(after or {}),
                    message,
                    feedback_events,
                    run_id,
                ),
            )

    def recent(self, limit: int = 10) -> list[sqlite3.Row]:
        """The newest runs first."""
        return (
            self.catalog.db().execute("SELECT * FROM refit_runs ORDER BY started_at DESC LIMIT ?", (limit,)).fetchall()
        )

    def get(self, run_id: str) -> sqlite3.Row | None:
        return self.catalog.db().execute("SELECT * FROM refit_runs WHERE id = ?", (run_id,)).fetchone()

    def interrupt_running(self) -> list[str]:
        """Mark runs left 'running' by a crash as 'interrupted'; returns their ids."""
        with self.catalog.tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM refit_runs WHERE state = 'running'")]
            db.execute(
                "UPDATE refit_runs SET state='interrupted', finished_at=?, "
                "message='the server stopped before the run finished' WHERE state='running'",
                (time.time(),),
            )
        return ids

    def last_started(self) -> float | None:
        row = self.catalog.db().execute("SELECT MAX(started_at) FROM refit_runs").fetchone()
        return row[0]
