"""The base store: the frozen encoder's normalised embeddings in append-only fp16 shards.

Layout: ``base/<modality>/shard-<n>.npy`` (N x dim, float16). Which item sits in which
row is recorded in the catalog (items.shard, items.row), written after the shard file has
been moved into place; a shard file no catalog row points at is debris of an interrupted
run and is removed by :meth:`BaseStore.clean`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .catalog import Catalog
from .corpus import MODALITIES
from .errors import InvalidArgument
from .vectors import ModalityVectors

_SHARD = re.compile(r"^shard-(\d{6})\.npy$")


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary name, fsync, then os.replace: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class BaseStore:
    def __init__(self, root: str | Path, catalog: Catalog):
        self.root = Path(root)
        self.catalog = catalog

    def folder(self, modality: str) -> Path:
        return self.root / modality

    def shard_path(self, modality: str, shard: int) -> Path:
        return self.folder(modality) / f"shard-{shard:06d}.npy"

    def _shard_numbers(self, modality: str) -> list[int]:
        folder = self.folder(modality)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SHARD.match(p.name)))

    def clean(self) -> list[Path]:
        """Remove temporary files and shards that no catalog row refers to; return them."""
        removed = []
        for modality in MODALITIES:
            folder = self.folder(modality)
            if not folder.is_dir():
                continue
            used = self.catalog.used_shards(modality)
            for path in folder.iterdir():
                match = _SHARD.match(path.name)
                if path.name.endswith(".tmp") or (match and int(match.group(1)) not in used):
                    path.unlink()
                    removed.append(path)
        return removed

    def append(self, modality: str, ids: list[str], vectors: np.ndarray) -> int:
        """Write one new shard and record its rows in the catalog; returns its number."""
        if len(ids) != len(vectors):
            raise InvalidArgument(f"{len(ids)} ids for {len(vectors)} vectors: pass one id per vector row")
        shard = self.write_shard(modality, vectors)
        self.catalog.set_embedded(shard, ids)
        return shard

    def write_shard(self, modality: str, vectors: np.ndarray) -> int:
        """Write one new shard file (not yet referenced by the catalog: debris until a
        catalog transaction points rows at it); returns its number."""
        folder = self.folder(modality)
        folder.mkdir(parents=True, exist_ok=True)
        numbers = self._shard_numbers(modality)
        shard = (max(numbers) + 1) if numbers else 0
        atomic_save_npy(self.shard_path(modality, shard), np.asarray(vectors, dtype=np.float16))
        return shard

    def vector(self, modality: str, shard: int, row: int) -> np.ndarray:
        """One base vector (float32) by its shard and row."""
        return np.asarray(
            np.load(self.shard_path(modality, shard), mmap_mode="r", allow_pickle=False)[row], dtype=np.float32
        )

    def load(self, modality: str, after_seq: int = -1) -> ModalityVectors:
        """All embedded items of a modality (written after ``after_seq``): ids and float32
        base vectors (N x dim)."""
        return self.load_rows(modality, self.catalog.embedded(modality, after_seq))

    def load_rows(self, modality: str, rows: list[tuple[str, int, int, int]]) -> ModalityVectors:
        """The base vectors of catalog rows (id, shard, row, seq)."""
        if not rows:
            return ModalityVectors.empty()
        shards: dict[int, np.ndarray] = {}
        for _, shard, _, _ in rows:
            if shard not in shards:
                shards[shard] = np.load(self.shard_path(modality, shard), mmap_mode="r", allow_pickle=False)
        dim = next(iter(shards.values())).shape[1]
        out = np.empty((len(rows), dim), np.float32)
        for i, (_, shard, row, _) in enumerate(rows):
            out[i] = shards[shard][row]
        return ModalityVectors([r[0] for r in rows], out, max_seq=max(r[3] for r in rows))
