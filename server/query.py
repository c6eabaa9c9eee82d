"""The read path: encode a query, search the live snapshot, build the hits; item lookup."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xmodal.indexer.catalog import Catalog
from xmodal.indexer.clinical import load_settings
from xmodal.indexer.corpus import IMAGE, MODALITIES, TEXT
from xmodal.indexer.encoder import QueryEncoder
from xmodal.indexer.errors import DeadlineExceeded, InvalidArgument, NotFound
from xmodal.indexer.images import decode_image
from xmodal.indexer.snapshot import ModalityIndex

from . import metrics
from .batcher import MicroBatcher, QueryEncoding
from .embedding_cache import EmbeddingCache, image_key, text_key
from .filters import (
    Columns,
    Condition,
    FilterField,
    check_conditions,
    columns_of,
    declared_fields,
    filter_fields,
)
from .limits import Limits
from .live import DeltaIndex, LiveState, LiveView
from .masked import EXACT_FILTER_ROWS, SEARCH_THREADS, masked_search, search_threads


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


def shown_source(source: str) -> str:
    """An item's source as clients see it: relative to its corpus root. Catalogs written before
    sources were relative hold absolute server paths: only the file name of those is shown."""
    return Path(source).name if source.startswith("/") or (len(source) > 2 and source[1:3] in (":\\", ":/")) else source


def _scored(ids: Sequence[str] | np.ndarray, scores: np.ndarray, rows: np.ndarray) -> list[tuple[str, float]]:
    """(id, score) of found ``rows`` (-1: none)."""
    return [(str(ids[r]), float(s)) for r, s in zip(rows.tolist(), scores.tolist(), strict=True) if r >= 0]


class QueryPath:
    """Answers searches and item lookups from the live view (reads only)."""

    def __init__(
        self,
        view: LiveView,
        encoder: QueryEncoder,
        catalog: Catalog,
        limits: Limits,
        *,
        encoding: QueryEncoding | None = None,
    ):
        """``encoder`` encodes the queries (the server's torch encoder, or a faster runtime
        checked against it); ``encoding`` sets the micro-batching and the embedding cache."""
        self.view = view
        self.encoder = encoder
        self.catalog = catalog
        self.limits = limits
        self.exact_filter_rows = EXACT_FILTER_ROWS
        self.search_threads: int | None = SEARCH_THREADS  # FAISS threads per search (the engine sets it)
        self.encoding = encoding or QueryEncoding()
        self.cache = EmbeddingCache(self.encoding.cache_size)
        self._batchers = {
            TEXT: self._batcher(TEXT, lambda rows: self.encoder.encode_tokens(torch.stack(list(rows)))),
            IMAGE: self._batcher(IMAGE, lambda pixels: self.encoder.encode_image_tensors(torch.stack(list(pixels)))),
        }

    def _batcher(self, modality: str, encode) -> MicroBatcher:
        return MicroBatcher(
            encode,
            max_batch=self.encoding.max_batch,
            max_wait_ms=self.encoding.max_wait_ms,
            workers=getattr(self.encoder, "passes", 1),
            name=modality,
            on_batch=metrics.QUERY_BATCH.labels(modality).observe,
        )

    def query_vector(
        self, state: LiveState, *, text: str | None = None, image: bytes | None = None, item_id: str | None = None
    ) -> tuple[str, np.ndarray, dict]:
        """The adapted query vector (1, dim), its modality and the time spent per stage."""
        given = [name for name, value in (("text", text), ("image", image), ("item_id", item_id)) if value is not None]
        if len(given) != 1:
            raise InvalidArgument(
                "a query needs exactly one of text, image or item_id" + (f" (got {', '.join(given)})" if given else "")
            )
        timing = {"encode_ms": 0.0, "head_ms": 0.0}
        if item_id is not None:
            if not item_id.strip():
                raise InvalidArgument("item_id is empty: pass the id of an indexed item")
            found = state.find(item_id)
            if found is None:
                raise NotFound(f"no indexed item with id {item_id!r} in snapshot {state.snapshot.id}")
            modality, vector = found
            return modality, vector.reshape(1, -1), timing
        t0 = time.perf_counter()
        modality, base = self.encode_query(text=text, image=image)
        t1 = time.perf_counter()
        vector = state.snapshot.head.project(modality, base, query=True)
        t2 = time.perf_counter()
        timing["encode_ms"] = (t1 - t0) * 1e3
        timing["head_ms"] = (t2 - t1) * 1e3
        return modality, vector, timing

    def encode_query(self, *, text: str | None = None, image: bytes | None = None) -> tuple[str, np.ndarray]:
        """Validate a text or image query and return its modality and base embedding (1, dim):
        from the cache, else encoded in a micro-batch with the queries that arrive with it."""
        if text is not None:
            if not text.strip():
                raise InvalidArgument("query text is empty: send the words to search for")
            self.limits.at_most("max_text_chars", len(text), "characters", "shorten the query text")
            tokens = self.encoder.tokenize([text])[0]
            key = text_key(tokens.numpy())
            return TEXT, self._embedding(TEXT, key, lambda: tokens)
        if image is None:
            raise InvalidArgument("a query needs text, image or item_id")
        self.limits.at_most("max_image_bytes", len(image), "bytes", "send a smaller query image")
        # a DICOM query is windowed as the corpus was (the catalog's DICOM settings)
        window = load_settings(self.catalog).window if image[128:132] == b"DICM" else None

        def pixels():
            return self.encoder.image_tensor(decode_image(image, max_pixels=self.limits.max_pixels, window=window))

        return IMAGE, self._embedding(IMAGE, image_key(image, window), pixels)

    def _embedding(self, modality: str, key: bytes, model_input) -> np.ndarray:
        """The cached base embedding of ``key``, else ``model_input()`` encoded (and cached)."""
        identity = self.encoder.identity
        vector = self.cache.get(identity, modality, key)
        metrics.cache_lookup(modality, vector is not None, self.cache.hit_rate)
        if vector is None:
            vector = self._batchers[modality].encode_one(model_input())
            self.cache.put(identity, modality, key, vector)
        return np.array(vector, dtype=np.float32).reshape(1, -1)

    def check_deadline(self, deadline: float | None, stage: str) -> None:
        """Raise DeadlineExceeded if ``deadline`` (time.monotonic) has passed."""
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"deadline passed during {stage}: retry, or give the call a longer deadline "
                f"(the server caps calls at {self.limits.deadline_s} s)"
            )

    def search(
        self,
        *,
        text: str | None = None,
        image: bytes | None = None,
        item_id: str | None = None,
        target: str | None = None,
        k: int = 10,
        deadline: float | None = None,
        conditions: Sequence[Condition] = (),
    ) -> SearchResult:
        """Top-k items of ``target`` modality for one query.

        Args:
            text / image / item_id: exactly one query.
            target: "image" or "text"; None means the other modality than the query's.
            k: 1..limits.max_k.
            conditions: metadata conditions (AND) the hits must match (see .filters).

        Raises:
            InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted.
        """
        started = time.perf_counter()
        if not isinstance(k, int) or k < 1 or k > self.limits.max_k:
            raise InvalidArgument(f"k must be between 1 and {self.limits.max_k}, got {k}")
        if target is not None and target not in MODALITIES:
            raise InvalidArgument(f"target modality must be image or text, got {target!r}")
        state = self.view.state()  # read the reference once: this query sees one state only
        if conditions:
            check_conditions(conditions, self.filter_fields(state))
        self.check_deadline(deadline, "queueing")
        modality, vector, timing = self.query_vector(state, text=text, image=image, item_id=item_id)
        self.check_deadline(deadline, "encoding")
        target = target or (TEXT if modality == IMAGE else IMAGE)
        t0 = time.perf_counter()
        scored = self._top_k(state, target, vector, k, conditions)
        timing["search_ms"] = (time.perf_counter() - t0) * 1e3
        hits = self._hits(scored, target)
        timing["total_ms"] = (time.perf_counter() - started) * 1e3
        return SearchResult(hits, state.snapshot.id, timing)

    def _top_k(
        self, state: LiveState, target: str, vector: np.ndarray, k: int, conditions: Sequence[Condition] = ()
    ) -> list[tuple[str, float]]:
        """The snapshot's index (without hidden rows) and the delta, merged by score; with
        ``conditions``, only the items that match them. FAISS runs on ``search_threads``
        OpenMP threads here (default 1: one query does not gain from more on a busy server)."""
        index, delta = state.snapshot.indexes[target], state.deltas[target]
        with search_threads(getattr(self, "search_threads", SEARCH_THREADS)):
            if conditions:
                scored = self._filtered_snapshot(state, target, vector, k, conditions)
            else:
                excluding = state.selectors[target]
                scores, rows = index.search(vector, k, params=excluding.params if excluding else None)
                scored = _scored(index.ids, scores[0], rows[0])
            if len(delta):
                if conditions:
                    mask = self.delta_columns(delta).mask(conditions)
                    scored += _scored(delta.ids, *masked_search(delta.index, vector, k, mask))
                else:
                    d_scores, d_rows = delta.search(vector, k)
                    scored += _scored(delta.ids, d_scores[0], d_rows[0])
        scored.sort(key=lambda hit: -hit[1])
        return scored[:k]

    # -- filters -----------------------------------------------------------------------------
    def snapshot_columns(self, index: ModalityIndex) -> Columns:
        return columns_of(index, lambda: Columns.from_catalog(self.catalog, index.ids))

    def delta_columns(self, delta: DeltaIndex) -> Columns:
        return columns_of(delta, lambda: Columns.from_catalog(self.catalog, delta.ids))

    def filter_fields(self, state: LiveState) -> dict[str, FilterField]:
        """The fields a search on ``state`` may filter on (declared, else inferred)."""
        columns = [self.snapshot_columns(i) for i in state.snapshot.indexes.values()]
        columns += [self.delta_columns(d) for d in state.deltas.values() if len(d)]
        return filter_fields(columns, declared_fields(self.catalog))

    def _filtered_snapshot(
        self, state: LiveState, target: str, vector: np.ndarray, k: int, conditions: Sequence[Condition]
    ) -> list[tuple[str, float]]:
        """The k best snapshot items that match, by the index family's own way of searching
        a subset (see .masked: exact when few match or the index is flat; IVF probes the
        nearest lists holding matches; HNSW post-filters when many match)."""
        index = state.snapshot.indexes[target]
        mask = self.snapshot_columns(index).mask(conditions)
        mask[state.hidden_rows[target]] = False
        return _scored(index.ids, *masked_search(index, vector, k, mask, exact_rows=self.exact_filter_rows))

    def _hits(self, scored: list[tuple[str, float]], target: str) -> list[Hit]:
        """Ranked hits with their catalog rows (text, source, metadata)."""
        records = self.catalog.get_items([item for item, _ in scored])
        hits = []
        for rank, (hit_id, score) in enumerate(scored, start=1):
            row = records.get(hit_id)
            hits.append(
                Hit(
                    item_id=hit_id,
                    score=score,
                    modality=target,
                    rank=rank,
                    text=row["text"] if row else "",
                    source=shown_source(row["source"]) if row else "",
                    metadata=json.loads(row["metadata"]) if row else {},
                )
            )
        return hits

    def get_items(self, item_ids: list[str], *, metadata_only: bool = False) -> list[ItemRecord]:
        """Items by id, with their content (image bytes or text) and metadata.

        Raises:
            InvalidArgument: no ids, or an empty id. ResourceExhausted: too many ids.
            NotFound: unknown ids (all of them are named).
        """
        if not item_ids:
            raise InvalidArgument("item_ids is empty: pass at least one item id")
        self.limits.at_most("max_items_per_request", len(item_ids), "ids in one request", "split the request")
        if any(not item_id.strip() for item_id in item_ids):
            raise InvalidArgument("an item id is empty")
        rows = self.catalog.get_items(item_ids)
        missing = [item_id for item_id in item_ids if item_id not in rows]
        if missing:
            raise NotFound(f"unknown item id(s): {', '.join(repr(m) for m in missing[:10])}")
        out = []
        for item_id in item_ids:
            row = rows[item_id]
            record = ItemRecord(
                item_id,
                row["modality"],
                row["text"],
                shown_source(row["source"]),
                json.loads(row["metadata"]),
                row["content_hash"],
            )
            if row["modality"] == IMAGE and not metadata_only:
                # a blob: upserted bytes or a DICOM's de-identified copy; else the indexed file itself
                path = self.view.data.root / row["blob"] if row["blob"] else Path(row["path"] or row["source"])
                try:
                    record.image = path.read_bytes()
                except OSError:
                    raise NotFound(
                        f"the image file of item {item_id!r} ({shown_source(row['source'])} under the corpus) is "
                        "no longer readable on the server: re-index it, or delete the item"
                    ) from None
            out.append(record)
        return out
