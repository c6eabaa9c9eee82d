"""Metadata filters: conditions on items' metadata, evaluated over arrays, not JSON.

A search may carry conditions (AND) on top-level metadata fields: ``any_of`` (equal to one
of some strings; a number by its value, so "2020" equals 2020), an inclusive numeric range
(``min``/``max``) or an inclusive string range (``min_text``/``max_text``, for ISO dates).
An item without the field does not match.

The metadata of a set of items (a snapshot's index, a delta) is turned once into
:class:`Columns`: per field a float64 array (NaN where the value is missing or not a
number) and an int32 array of codes into the sorted distinct strings (-1 where missing).
A condition is then a few vectorised comparisons over those arrays, giving a row mask.
Columns are built on the first filtered search over a snapshot index or a delta and kept
with it (both are immutable).

Filterable fields are the ones declared at index time (``--filter-fields``, kept in the
catalog) or, when none were declared, every field holding a scalar value (text, number or
true/false) in some item.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from xmodal.indexer.catalog import Catalog
from xmodal.indexer.errors import InvalidArgument

FILTER_FIELDS_META = "filter_fields"  # catalog meta key: the declared fields, a JSON list
NUMBER, TEXT_KIND = "number", "text"


@dataclass(frozen=True)
class Condition:
    """One condition on one metadata field (see the module)."""

    field: str
    any_of: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    min_text: str | None = None
    max_text: str | None = None

    @property
    def numeric(self) -> bool:
        return self.min is not None or self.max is not None

    @property
    def textual(self) -> bool:
        return self.min_text is not None or self.max_text is not None

    def check(self) -> None:
        """Raises InvalidArgument for an empty or contradictory condition."""
        where = f"filter on {self.field!r}"
        if not self.field.strip():
            raise InvalidArgument("a filter condition has no field: name a metadata field")
        kinds = sum((bool(self.any_of), self.numeric, self.textual))
        if kinds == 0:
            raise InvalidArgument(f"{where} is empty: give any_of, min/max or min_text/max_text")
        if kinds > 1:
            raise InvalidArgument(f"{where} mixes any_of, a numeric and a text range: use one per condition")
        for name in ("min", "max"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InvalidArgument(f"{where}: {name} must be a finite number, got {value}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise InvalidArgument(f"{where}: min {self.min:g} is above max {self.max:g}")
        if self.min_text is not None and self.max_text is not None and self.min_text > self.max_text:
            raise InvalidArgument(f"{where}: min_text {self.min_text!r} is after max_text {self.max_text!r}")


def _number(value) -> float | None:
    """The numeric value of a metadata value or query string, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _text(value) -> str | None:
    """The string form of a scalar metadata value (numbers as written in JSON), or None."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return None  # lists, objects, null: not filterable


class Columns:
    """The metadata of row-aligned items as arrays, one pair per field."""

    def __init__(self, metadata: Sequence[dict]):
        self.rows = len(metadata)
        values: dict[str, dict[int, object]] = {}
        for row, item in enumerate(metadata):
            for name, value in item.items():
                if _text(value) is not None:
                    values.setdefault(name, {})[row] = value
        self.numbers: dict[str, np.ndarray] = {}
        self.codes: dict[str, np.ndarray] = {}
        self.vocab: dict[str, list[str]] = {}
        self.kinds: dict[str, str] = {}  # NUMBER when every value is a JSON number, else TEXT_KIND
        for name, by_row in values.items():
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in by_row.values())
            self.kinds[name] = NUMBER if numeric else TEXT_KIND
            numbers = np.full(self.rows, np.nan)
            texts = {row: _text(v) for row, v in by_row.items()}
            vocab = sorted({t for t in texts.values() if t is not None})
            index = {t: i for i, t in enumerate(vocab)}
            codes = np.full(self.rows, -1, np.int32)
            for row, value in by_row.items():
                number = _number(value)
                if number is not None:
                    numbers[row] = number
                codes[row] = index[texts[row]]  # type: ignore[index]
            self.numbers[name], self.codes[name], self.vocab[name] = numbers, codes, vocab

    def mask(self, conditions: Iterable[Condition]) -> np.ndarray:
        """Rows that match every condition."""
        out = np.ones(self.rows, bool)
        for condition in conditions:
            out &= self._match(condition)
        return out

    def _match(self, c: Condition) -> np.ndarray:
        if c.field not in self.codes:
            return np.zeros(self.rows, bool)
        numbers, codes, vocab = self.numbers[c.field], self.codes[c.field], self.vocab[c.field]
        if c.any_of:
            wanted = [i for i in (_code(vocab, s) for s in c.any_of) if i is not None]
            hit = np.isin(codes, np.asarray(wanted, np.int32)) if wanted else np.zeros(self.rows, bool)
            targets = [n for n in (_number(s) for s in c.any_of) if n is not None]
            if targets:
                hit |= np.isin(numbers, np.asarray(targets))
            return hit
        if c.numeric:
            with np.errstate(invalid="ignore"):
                hit = ~np.isnan(numbers)
                if c.min is not None:
                    hit &= numbers >= c.min
                if c.max is not None:
                    hit &= numbers <= c.max
            return hit
        low = 0 if c.min_text is None else bisect.bisect_left(vocab, c.min_text)
        high = len(vocab) if c.max_text is None else bisect.bisect_right(vocab, c.max_text)
        return (codes >= low) & (codes < high)


def _code(vocab: list[str], value: str) -> int | None:
    i = bisect.bisect_left(vocab, value)
    return i if i < len(vocab) and vocab[i] == value else None


_columns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_columns_lock = threading.Lock()


def columns_of(owner: object, load_metadata) -> Columns:
    """The Columns of an immutable item set (a snapshot index, a delta), built once with
    ``load_metadata()`` (row-aligned dicts) and kept as long as ``owner`` lives."""
    with _columns_lock:
        found = _columns.get(owner)
    if found is None:
        found = Columns(load_metadata())
        with _columns_lock:
            _columns[owner] = found
    return found


def metadata_by_id(catalog: Catalog, ids: Sequence[str]) -> list[dict]:
    """Row-aligned metadata of ``ids`` from the catalog ({} for an id it does not hold)."""
    rows = catalog.get_items(ids) if len(ids) <= 50_000 else _all_metadata(catalog)
    return [json.loads(rows[i]["metadata"]) if i in rows else {} for i in ids]


def _all_metadata(catalog: Catalog) -> dict:
    return {r["id"]: r for r in catalog.db().execute("SELECT id, metadata FROM items")}


@dataclass(frozen=True)
class FilterField:
    name: str
    kind: str  # NUMBER or TEXT_KIND
    declared: bool


def filter_fields(columns: Iterable[Columns], declared: Sequence[str] | None) -> dict[str, FilterField]:
    """The filterable fields: ``declared`` ones, else every field some item holds a scalar
    in; a field is a NUMBER one when every value it holds is a number."""
    kinds: dict[str, str] = {}
    for cols in columns:
        for name, kind in cols.kinds.items():
            kinds[name] = NUMBER if kind == NUMBER and kinds.get(name, NUMBER) == NUMBER else TEXT_KIND
    if declared:
        return {name: FilterField(name, kinds.get(name, TEXT_KIND), True) for name in declared}
    return {name: FilterField(name, kind, False) for name, kind in sorted(kinds.items())}


def check_conditions(conditions: Sequence[Condition], fields: dict[str, FilterField]) -> None:
    """Raises InvalidArgument for an empty or contradictory condition, a field that is not
    filterable (naming the ones that are) or a range of the wrong kind."""
    for condition in conditions:
        condition.check()
        known = fields.get(condition.field)
        if known is None:
            listed = ", ".join(sorted(fields)) or "none (no item has text or numbers in its metadata)"
            raise InvalidArgument(f"field {condition.field!r} is not filterable; filterable fields: {listed}")
        if condition.textual and known.kind == NUMBER:
            raise InvalidArgument(
                f"field {condition.field!r} holds numbers: give a numeric range (min/max), not a text one"
            )
        if condition.numeric and known.kind == TEXT_KIND:
            raise InvalidArgument(
                f"field {condition.field!r} holds text: give a text range (min_text/max_text), not a numeric one"
            )


def declared_fields(catalog: Catalog) -> list[str] | None:
    value = catalog.get_meta(FILTER_FIELDS_META)
    return json.loads(value) if value else None


def declare_fields(catalog: Catalog, names: Sequence[str]) -> None:
    """Record the filterable fields (``xmodal index --filter-fields``)."""
    clean = [n.strip() for n in names if n.strip()]
    if not clean:
        raise InvalidArgument("--filter-fields is empty: name at least one metadata field")
    with catalog.tx() as db:
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (FILTER_FIELDS_META, json.dumps(sorted(set(clean)))))


__all__ = [
    "Columns",
    "Condition",
    "FilterField",
    "check_conditions",
    "columns_of",
    "declare_fields",
    "declared_fields",
    "filter_fields",
    "metadata_by_id",
]
