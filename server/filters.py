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
from collections.abc import Callable, Iterable, Sequence
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
        """``metadata``: one dict per row."""
        self._build(len(metadata), None, list(metadata))

    @classmethod
    def from_catalog(cls, catalog: Catalog, ids: Sequence[str] | np.ndarray) -> Columns:
        """The columns of the items ``ids`` (row-aligned; an id the catalog does not hold has
        no values). The metadata comes back as plain tuples, in index order when the ids are
        a snapshot's (no id lookups then), is parsed by one json.loads of all of it, and a
        field's values are handled once per distinct value, or by numpy when they are all
        integers (sqlite3.Row objects, a json.loads per item and per-row Python in each field
        took 16-19 s at 1M items)."""
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        rows, texts = _metadata_texts(catalog, ids)
        try:
            items = json.loads("[" + ",".join(texts) + "]")
        except ValueError:  # an unreadable item: read them one by one, it reads as {}
            items = [_loads(text) for text in texts]
        columns = cls.__new__(cls)
        columns._build(len(ids), rows, items)
        return columns

    def _build(self, rows: int, at: np.ndarray | None, items: list) -> None:
        """The columns of ``items`` (metadata dicts) found at ``at`` of ``rows`` rows (None:
        one item per row, in order)."""
        self.rows = rows
        self.numbers: dict[str, np.ndarray] = {}
        self.codes: dict[str, np.ndarray] = {}
        self.vocab: dict[str, list[str]] = {}
        self.kinds: dict[str, str] = {}  # NUMBER when every value is a JSON number, else TEXT_KIND
        if not all(item.__class__ is dict for item in items):
            items = [item if isinstance(item, dict) else {} for item in items]
        for name in sorted(set().union(*items)):
            column = _column([item.get(name) for item in items])
            if column is None:  # no text, number or true/false in any item
                continue
            kind, vocab, code_of, number_of, first = column
            numbers, codes = np.full(rows, np.nan), np.full(rows, -1, np.int32)
            where = slice(None) if at is None else at
            numbers[where], codes[where] = number_of[first], code_of[first]
            self.kinds[name], self.vocab[name], self.numbers[name], self.codes[name] = kind, vocab, numbers, codes

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
        if c.numeric:  # NaN (no number) compares false: no isnan pass over the column
            with np.errstate(invalid="ignore"):
                if c.min is not None and c.max is not None:
                    return (numbers >= c.min) & (numbers <= c.max)
                return numbers >= c.min if c.min is not None else numbers <= c.max
        low = 0 if c.min_text is None else bisect.bisect_left(vocab, c.min_text)
        high = len(vocab) if c.max_text is None else bisect.bisect_right(vocab, c.max_text)
        return (codes >= low) & (codes < high)


def _code(vocab: list[str], value: str) -> int | None:
    i = bisect.bisect_left(vocab, value)
    return i if i < len(vocab) and vocab[i] == value else None


_columns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_columns_lock = threading.Lock()


def columns_of(owner: object, build: Callable[[], Columns]) -> Columns:
    """The Columns of an immutable item set (a snapshot index, a delta), built once with
    ``build()`` (e.g. :meth:`Columns.from_catalog`) and kept as long as ``owner`` lives."""
    with _columns_lock:
        found = _columns.get(owner)
    if found is None:
        found = build()
        with _columns_lock:
            _columns[owner] = found
    return found


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


_SCALARS = (str, int, float, bool)  # what json.loads makes of text, numbers, true and false
_LOOKUP_IDS = 50_000  # more ids than this: all items read in index order (a snapshot's), not looked up by id


def _column(values: list) -> tuple[str, list[str], np.ndarray, np.ndarray, np.ndarray] | None:
    """(kind, vocab, code of each distinct value, number of each, each value's distinct
    index) of one field's values (None where an item lacks it); None when no value is a
    scalar. Codes are -1 and numbers NaN for the values that are not scalars."""
    classes = set(map(type, values))
    if int in classes and classes <= {int, type(None)}:  # the common numeric field: numpy finds the distinct values
        present = np.fromiter((v is not None for v in values), bool, len(values))
        try:
            ints = np.asarray(values if present.all() else [v for v in values if v is not None], dtype=np.int64)
        except OverflowError:
            pass
        else:
            distinct, inverse = np.unique(ints, return_inverse=True)
            texts = [str(v) for v in distinct.tolist()]  # json.dumps of an int
            vocab = sorted(texts)
            index = {t: i for i, t in enumerate(vocab)}
            code_of = np.asarray([*(index[t] for t in texts), -1], np.int32)  # the last: missing
            number_of = np.append(distinct.astype(np.float64), np.nan)
            first = np.full(len(values), len(distinct), np.int64)
            first[present] = inverse.reshape(-1)
            return NUMBER, vocab, code_of, number_of, first
    if not classes <= set(_SCALARS) | {type(None)}:  # lists, objects: not filterable
        values = [v if v.__class__ in _SCALARS else None for v in values]
        classes = set(map(type, values))
    if not classes - {type(None)}:
        return None
    seen: dict = {}
    if classes <= {str, type(None)}:
        first = np.fromiter((seen.setdefault(v, len(seen)) for v in values), np.int64, len(values))
        kept: list = list(seen)
    else:  # (type, value): 1, 1.0 and True are one key in a dict
        first = np.fromiter((seen.setdefault((v.__class__, v), len(seen)) for v in values), np.int64, len(values))
        kept = [v for _, v in seen]
    shown: list[str | None] = [_text(v) for v in kept]
    vocab = sorted({t for t in shown if t is not None})
    index = {t: i for i, t in enumerate(vocab)}
    code_of = np.asarray([-1 if t is None else index[t] for t in shown], np.int32)
    number_of = np.asarray([_nan_if_none(_number(v)) for v in kept], np.float64)
    numeric = all(v.__class__ in (int, float) for v in kept if v is not None)
    return (NUMBER if numeric else TEXT_KIND), vocab, code_of, number_of, first


def _metadata_texts(catalog: Catalog, ids: list[str]) -> tuple[np.ndarray | None, list[str]]:
    """(rows, metadata JSON) of the items ``ids`` the catalog holds; rows None when they
    are all of them, in order (a snapshot's ids: the catalog's index order, checked)."""
    cursor = catalog.db().cursor()
    cursor.row_factory = None  # plain tuples
    fetched: Iterable[tuple[str, str]]
    if len(ids) > _LOOKUP_IDS:
        first = cursor.execute("SELECT modality FROM items WHERE id = ?", (ids[0],)).fetchone()
        fetched = cursor.execute(
            "SELECT id, metadata FROM items WHERE modality = ? AND shard IS NOT NULL ORDER BY shard, row",
            (first[0] if first else "",),
        ).fetchall()
        if len(fetched) == len(ids) and [item_id for item_id, _ in fetched] == ids:
            return None, [text for _, text in fetched]
        fetched = cursor.execute("SELECT id, metadata FROM items")  # not in index order: look each id up
    else:
        chunks = [ids[i : i + 500] for i in range(0, len(ids), 500)]
        fetched = [
            found
            for chunk in chunks
            for found in cursor.execute(
                f"SELECT id, metadata FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk
            )
        ]
    row_of = {item_id: row for row, item_id in enumerate(ids)}
    rows, texts = [], []
    for item_id, text in fetched:
        row = row_of.get(item_id)
        if row is not None:
            rows.append(row)
            texts.append(text)
    return np.asarray(rows, np.int64), texts


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return {}


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
