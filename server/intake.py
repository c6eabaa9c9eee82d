"""Writes from clients: feedback events (and, next, corpus upserts and deletes)."""

from __future__ import annotations

import math
import secrets

import numpy as np

from xmodal.indexer.catalog import Catalog
from xmodal.indexer.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from xmodal.indexer.feedback import FeedbackLog, feedback_query_key, feedback_split
from xmodal.indexer.store import BaseStore

from .limits import Limits
from .query import QueryPath


class FeedbackIntake:
    """Validates feedback events and stores them durably with the query's base embedding."""

    def __init__(self, catalog: Catalog, store: BaseStore, queries: QueryPath, limits: Limits):
        self.catalog = catalog
        self.store = store
        self.queries = queries
        self.limits = limits
        self.log = FeedbackLog(catalog)

    def submit_feedback(
        self,
        *,
        text: str | None = None,
        image: bytes | None = None,
        item_id: str | None = None,
        relevant: list[str],
        irrelevant: list[str] | None = None,
        weight: float = 1.0,
        source: str = "",
    ) -> str:
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
        weight = self._check(text, image, item_id, relevant, irrelevant, weight, source)
        rows = self.catalog.item_rows(relevant + irrelevant + ([item_id] if item_id is not None else []))
        missing = [i for i in dict.fromkeys(relevant + irrelevant) if i not in rows]
        if missing:
            raise NotFound(f"unknown item id(s) in feedback: {', '.join(repr(m) for m in missing[:10])}")
        if item_id is not None:
            if not item_id.strip():
                raise InvalidArgument("item_id is empty: pass the id of an indexed item")
            if item_id not in rows:
                raise NotFound(f"unknown query item id {item_id!r}")
            found = self.store.item_vector(item_id)
            if found is None:
                raise FailedPrecondition(f"item {item_id!r} has no embedding yet (not indexed, or undecodable)")
            modality, base = found
            kind, query_text = "item_id", item_id
        else:
            modality, base = self.queries.encode_query(text=text, image=image)
            kind, query_text = ("text", text) if text is not None else ("image", "")
        key = feedback_query_key(kind, image if image is not None else query_text)
        feedback_id = "fb-" + secrets.token_hex(8)
        self.log.add(
            feedback_id=feedback_id,
            query_kind=kind,
            query_modality=modality,
            query_text=query_text,
            embedding=np.asarray(base).reshape(-1),
            relevant=relevant,
            irrelevant=irrelevant,
            weight=float(weight),
            source=source,
            split=feedback_split(key),
        )
        return feedback_id

    def _check(
        self,
        text: str | None,
        image: bytes | None,
        item_id: str | None,
        relevant: list[str],
        irrelevant: list[str],
        weight: float,
        source: str,
    ) -> float:
        """Validate an event's shape and limits; returns its weight (0, proto3's unset, is 1)."""
        given = [v for v in (text, image, item_id) if v is not None]
        if len(given) != 1:
            raise InvalidArgument("feedback needs exactly one query: text, image or item_id")
        if not relevant:
            raise InvalidArgument("feedback needs at least one relevant item id (the item the user confirmed)")
        if len(relevant) + len(irrelevant) > self.limits.max_feedback_ids:
            raise ResourceExhausted(
                f"{len(relevant) + len(irrelevant)} item ids in one feedback event, over the limit "
                f"of {self.limits.max_feedback_ids}"
            )
        if any(not isinstance(i, str) or not i.strip() for i in relevant + irrelevant):
            raise InvalidArgument("an item id in relevant_ids or irrelevant_ids is empty")
        if weight == 0:
            weight = 1.0  # proto3's default: not set
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or not 0 < weight <= 100:
            raise InvalidArgument(f"weight must be a finite number in (0, 100], got {weight!r}")
        if len(source) > 200:
            raise InvalidArgument("source tag is longer than 200 characters")
        return float(weight)
