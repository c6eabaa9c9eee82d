"""Base vectors by modality: the named type that loaded embeddings travel as.

``ModalityVectors(ids, array)``: row ``i`` of ``array`` is the embedding of item
``ids[i]``. A fit, a refit and a snapshot write load every modality once
(:func:`load_vectors`) and pass the result around as ``Vectors`` (a dict by modality).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from .corpus import IMAGE, MODALITIES, TEXT
from .errors import InvalidArgument

if TYPE_CHECKING:
    from .store import BaseStore


@dataclass(frozen=True)
class ModalityVectors:
    """One modality's embedded items, in index order."""

    ids: list[str]
    array: np.ndarray
    max_seq: int = 0  # the catalog write sequence of the newest of these vectors

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.array):
            raise InvalidArgument(f"{len(self.ids)} item ids for {len(self.array)} vectors")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.array.shape[1]) if self.array.ndim == 2 else 0

    @cached_property
    def rows(self) -> dict[str, int]:
        """item id -> row."""
        return {item_id: row for row, item_id in enumerate(self.ids)}

    @classmethod
    def empty(cls, dim: int = 0) -> ModalityVectors:
        return cls([], np.zeros((0, dim), np.float32))


Vectors = dict[str, ModalityVectors]


def load_vectors(store: BaseStore) -> Vectors:
    """Every embedded item of both modalities, as float32."""
    return {modality: store.load(modality) for modality in MODALITIES}


def base_dim(vectors: Vectors) -> int:
    """The base embedding size (0 while nothing is embedded): a corpus of texts alone, or
    of images alone, still has one."""
    return max(v.dim for v in vectors.values())


def other_modality(modality: str) -> str:
    return TEXT if modality == IMAGE else IMAGE


__all__ = ["ModalityVectors", "Vectors", "base_dim", "load_vectors", "other_modality"]
