"""A snapshot's manifest.json: one type, one reader, one writer.

The manifest says what a snapshot holds (encoder, dims, head, FAISS factory, counts,
held-out metrics, parent) so that a server can refuse one it cannot serve.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import FailedPrecondition, NotFound

MANIFEST_SCHEMA = 1
MANIFEST_NAME = "manifest.json"


@dataclass(kw_only=True)
class Manifest:
    """What one immutable snapshot holds (written once, never changed)."""

    id: str
    encoder: str
    base_dim: int
    dim: int
    head: dict[str, Any]  # kind, sha256 and the head's config
    # The factory the indexes were built with: the one asked for, or under ``auto`` what it
    # chose (``image=HNSW32,Flat text=Flat`` when the modalities differ).
    faiss_factory: str
    counts: dict[str, int]
    parent_id: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    indexes_from: str | None = None  # the snapshot whose index files were reused (query refits)
    # The catalog write sequence its indexes hold: items written later (upserts) are served
    # from a delta beside it. None in snapshots made before the live corpus.
    catalog_seq: int | None = None
    # What the indexes were asked to be (``auto`` or a FAISS factory string) and under which
    # memory budget (bytes); rewrites (compactions, refits) ask for the same. None in
    # snapshots made before ``auto``: then faiss_factory is what was asked for.
    factory_requested: str | None = None
    memory_budget: int | None = None
    # Per modality, the index chosen: {"requested", "factory", "reason", "params"}, params
    # being the search parameters tuned at build time (efSearch, nprobe, k_factor) with the
    # recall they reached. Empty in snapshots made before ``auto``.
    index: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    schema_version: int = MANIFEST_SCHEMA

    @property
    def head_kind(self) -> str:
        return str(self.head["kind"])

    @property
    def head_hash(self) -> str:
        return str(self.head["sha256"])

    @property
    def requested_factory(self) -> str:
        """The factory string a rewrite of this snapshot asks for (``auto`` or FAISS's)."""
        return self.factory_requested or self.faiss_factory

    def modality_factory(self, modality: str) -> str:
        """The FAISS factory ``modality``'s index was built with."""
        return str(self.index.get(modality, {}).get("factory") or self.faiss_factory)

    def search_params(self, modality: str) -> dict[str, Any]:
        """The search parameters tuned for ``modality``'s index ({} when none were)."""
        return dict(self.index.get(modality, {}).get("params") or {})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "manifest") -> Manifest:
        """Raises FailedPrecondition for another schema or missing fields."""
        if values.get("schema_version") != MANIFEST_SCHEMA:
            raise FailedPrecondition(
                f"{where} has schema {values.get('schema_version')}, this xmodal reads {MANIFEST_SCHEMA}"
            )
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in values.items() if k in known})
        except TypeError as exc:
            raise FailedPrecondition(f"{where} is incomplete: {exc}") from None

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest of a snapshot folder.

        Raises:
            NotFound: no manifest there. FailedPrecondition: unreadable or another schema.
        """
        path = Path(folder) / MANIFEST_NAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise NotFound(f"no snapshot {Path(folder).name!r}") from None
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FailedPrecondition(f"snapshot {Path(folder).name}: manifest.json is not JSON ({exc})") from None
        return cls.from_dict(values, where=f"snapshot {Path(folder).name}")

    def write(self, folder: str | Path) -> None:
        """Write manifest.json into ``folder`` and fsync it (the folder is fsynced by the caller)."""
        with open(Path(folder) / MANIFEST_NAME, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())


__all__ = ["MANIFEST_NAME", "MANIFEST_SCHEMA", "Manifest"]
