"""SearchClient: a typed Python client for the xmodal gRPC API (grpc + protobuf only)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xmodal.v1 import xmodal_pb2 as pb
from xmodal.v1 import xmodal_pb2_grpc as pb_grpc

from ._errors import InvalidArgument, Unavailable, XmodalError, map_errors

_MODALITY_NAMES = {pb.MODALITY_IMAGE: "image", pb.MODALITY_TEXT: "text", pb.MODALITY_UNSPECIFIED: "unspecified"}
_MODALITY_VALUES = {"image": pb.MODALITY_IMAGE, "text": pb.MODALITY_TEXT, None: pb.MODALITY_UNSPECIFIED}


@dataclass(frozen=True)
class Hit:
    item_id: str
    score: float
    modality: str  # "image" or "text"
    text: str
    source: str
    metadata: dict
    rank: int


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    snapshot_id: str
    timing: dict = field(default_factory=dict)

    def __iter__(self):
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)


@dataclass(frozen=True)
class Item:
    item_id: str
    modality: str
    text: str
    image: bytes
    source: str
    metadata: dict
    content_hash: str


@dataclass(frozen=True)
class RefitRun:
    run_id: str
    mode: str
    state: str  # running, promoted, rejected, failed, interrupted
    started_at: str
    duration_s: float
    before: dict
    after: dict
    snapshot_id: str
    message: str
    progress: str
    feedback_events: int


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    created_at: str
    head_kind: str
    parent_id: str
    encoder: str
    metrics: dict
    live: bool = False


@dataclass(frozen=True)
class NewItem:
    """One item to add to (or replace in) a running server's corpus: exactly one of ``text``
    or ``image`` (the encoded bytes, or a path the client reads). ``pair_id`` names an item of
    the other modality that this one describes (sent in the same call or earlier);
    ``source`` is shown in hits (say where the item came from, not a path on a server)."""

    item_id: str
    text: str | None = None
    image: bytes | str | Path | None = None
    metadata: dict | None = None
    pair_id: str = ""
    source: str = ""


@dataclass(frozen=True)
class UpsertResult:
    """What one UpsertItems call did: items new, replaced (same id, new content), already
    there as given, and pairs recorded."""

    added: int
    changed: int
    unchanged: int
    pairs_added: int
    item_ids: tuple[str, ...] = ()  # in request order; a DICOM image sent without an id gets a derived one


@dataclass(frozen=True)
class DeleteResult:
    """Ids that existed and are now deleted, and ids the server did not know (not an error)."""

    deleted_ids: list[str]
    unknown_ids: list[str]


@dataclass(frozen=True)
class CompactResult:
    """What a compaction did: the new live snapshot, and what it folded and erased."""

    snapshot_id: str
    folded_items: int
    erased_items: int
    rewritten_snapshots: int
    seconds: float


@dataclass(frozen=True)
class Status:
    serving: bool
    snapshot_id: str
    encoder: str
    head_kind: str
    counts: dict  # {"image": {"catalog_items": n, "indexed": n}, "text": {...}}
    version: str
    uptime_s: float
    max_k: int
    metrics: dict
    feedback_total: int = 0
    feedback_since_last_refit: int = 0
    refits: list = field(default_factory=list)  # RefitRun, most recent first
    # the live corpus: {"delta_items", "hidden_items", "pending_erasure",
    # "last_compaction_snapshot_id", "last_compaction_s"}
    live_corpus: dict = field(default_factory=dict)
    filter_fields: dict = field(default_factory=dict)  # name -> "number" or "text"
    raw: object = field(repr=False, default=None)


def _pem(value) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"cannot read the PEM file {str(value)!r} ({exc.strerror or exc}): pass the path of a "
            "certificate or key in PEM format"
        ) from None


def _query(text, image, item_id) -> pb.Query:
    if len([v for v in (text, image, item_id) if v is not None]) != 1:
        raise InvalidArgument("pass exactly one of text=, image= or item_id=")
    if image is not None:
        return pb.Query(image=_image_bytes(image))
    return _request(pb.Query, text=text) if text is not None else _request(pb.Query, item_id=item_id)


def _image_bytes(image, what: str = "query image") -> bytes:
    """An image (``what`` names it in errors) given as bytes, or read from a file path."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if not isinstance(image, (str, Path)):
        raise InvalidArgument(f"{what} must be the encoded bytes or a file path, got {type(image).__name__}")
    try:
        return Path(image).read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"cannot read the {what} {str(image)!r} ({exc.strerror or exc}): pass the path of "
            "an image file (JPEG, PNG, ...) or its bytes"
        ) from None


_NEW_ITEM_FIELDS = tuple(NewItem.__dataclass_fields__)


def _new_items(items) -> list[pb.NewItem]:
    """NewItem messages from NewItem objects or dicts of NewItem's fields; one item given
    alone is one item, as one id is for the id arguments."""
    if isinstance(items, (NewItem, Mapping)):
        items = [items]
    elif not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
        raise InvalidArgument(f"items must be a list of NewItem or dicts, got {type(items).__name__}")
    return [_new_item(item, n) for n, item in enumerate(items)]


def _new_item(item, n: int) -> pb.NewItem:
    if isinstance(item, Mapping):
        unknown = sorted(str(key) for key in item if key not in _NEW_ITEM_FIELDS)
        if unknown:
            raise InvalidArgument(f"items[{n}]: unknown field(s) {unknown}; known: {list(_NEW_ITEM_FIELDS)}")
        if "item_id" not in item:
            raise InvalidArgument(f"items[{n}]: item_id is missing")
        item = NewItem(**item)
    elif not isinstance(item, NewItem):
        raise InvalidArgument(f"items[{n}] must be a NewItem or a dict of its fields, got {type(item).__name__}")
    if not isinstance(item.item_id, str):
        raise InvalidArgument(f"items[{n}]: item_id must be a string, got {item.item_id!r}")
    where = f"items[{n}] ({item.item_id!r})"
    if (item.text is None) == (item.image is None):
        raise InvalidArgument(f"{where}: give exactly one of text= or image=")
    content: dict[str, str | bytes]
    if item.text is not None:
        content = {"text": item.text}
    else:
        content = {"image": _image_bytes(item.image, f"image of {where}")}
    return _request(
        pb.NewItem,
        item_id=item.item_id,
        **content,
        metadata_json=_metadata_json(item.metadata, where),
        pair_id=item.pair_id,
        source=item.source,
    )


def _metadata_json(metadata, where: str) -> str:
    if metadata is None:
        return ""
    if not isinstance(metadata, Mapping):
        raise InvalidArgument(f"{where}: metadata must be a dict, got {type(metadata).__name__}")
    try:
        return json.dumps(dict(metadata))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{where}: metadata must be JSON-serialisable ({exc})") from None


def _ids(value, name: str) -> list[str]:
    """Item ids as a list; a single id given as a plain string is one id, not its characters."""
    ids = [value] if isinstance(value, str) else list(value)
    wrong = [i for i in ids if not isinstance(i, str)]
    if wrong:
        raise InvalidArgument(f"{name} must be item id strings, got {wrong[0]!r}")
    return ids


def filter_message(where: Mapping[str, object]) -> pb.Filter:
    """``where`` (see SearchClient.search) as a Filter message; InvalidArgument for a shape
    it cannot be. ``xmodal fit --replay-where`` reads its conditions through it too."""
    if not isinstance(where, Mapping):
        raise InvalidArgument(f"where must be a dict of field -> condition, got {type(where).__name__}")
    conditions = []
    for name, value in where.items():
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgument(f"where: field names must be non-empty strings, got {name!r}")
        condition = pb.Condition(field=name)
        if isinstance(value, tuple):
            if len(value) != 2 or value == (None, None):
                raise InvalidArgument(f"where[{name!r}]: a range is (low, high) with at least one end, got {value!r}")
            ends = [v for v in value if v is not None]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ends):
                if value[0] is not None:
                    condition.min = float(value[0])
                if value[1] is not None:
                    condition.max = float(value[1])
            elif all(isinstance(v, str) for v in ends):
                if value[0] is not None:
                    condition.min_text = value[0]
                if value[1] is not None:
                    condition.max_text = value[1]
            else:
                raise InvalidArgument(
                    f"where[{name!r}]: a range's ends are both numbers or both strings, got {value!r}"
                )
        else:
            values = list(value) if isinstance(value, (list, set, frozenset)) else [value]
            if not values:
                raise InvalidArgument(f"where[{name!r}]: give at least one value")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                    raise InvalidArgument(f"where[{name!r}]: values are strings or numbers, got {v!r}")
            condition.any_of.extend(v if isinstance(v, str) else json.dumps(v) for v in values)
        conditions.append(condition)
    return pb.Filter(all_of=conditions)


def _request(cls, **fields):
    """Build a request message; protobuf's TypeError/ValueError (a string where a number
    goes, a k past int32) become InvalidArgument, as the server's own checks would."""
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        given = ", ".join(f"{name}={value!r}"[:80] for name, value in fields.items())
        raise InvalidArgument(f"bad argument in {cls.__name__}({given}): {exc}") from None


def _snapshot(info, live_id: str) -> SnapshotInfo:
    return SnapshotInfo(
        info.snapshot_id,
        info.created_at,
        info.head_kind,
        info.parent_id,
        info.encoder,
        json.loads(info.metrics_json or "{}"),
        info.snapshot_id == live_id,
    )


class SearchClient:
    """Client for an xmodal server.

    Example::

        with SearchClient("127.0.0.1:50051") as client:
            for hit in client.search(text="left upper lobe nodule", k=5):
                print(hit.rank, hit.score, hit.item_id)

    Args:
        target: "host:port" of the server.
        timeout: default deadline per call, in seconds.
        api_key: sent as ``authorization: Bearer <key>`` with every call.
        tls: connect with TLS; ``ca_cert`` (PEM path or bytes) is the authority to trust
            (default: the system's); ``client_cert``/``client_key`` for mutual TLS.
        channel: an existing grpc.Channel to use instead of opening one.

    Every method raises xmodal.client errors (InvalidArgument, NotFound,
    FailedPrecondition, ResourceExhausted, Unavailable, ...), never grpc.RpcError.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        api_key: str | None = None,
        tls: bool = False,
        ca_cert: str | Path | bytes | None = None,
        client_cert: str | Path | bytes | None = None,
        client_key: str | Path | bytes | None = None,
        channel: grpc.Channel | None = None,
    ):
        if channel is None and (not isinstance(target, str) or not target.strip()):
            raise InvalidArgument(f"server address {target!r} is empty: pass host:port, e.g. 127.0.0.1:50051")
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        if channel is None and (tls or ca_cert or client_cert):
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(ca_cert), private_key=_pem(client_key), certificate_chain=_pem(client_cert)
            )
            channel = grpc.secure_channel(target, credentials, options=options)
        self._channel = channel or grpc.insecure_channel(target, options=options)
        self._search = pb_grpc.SearchServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._admin = pb_grpc.AdminServiceStub(self._channel)
        self._index = pb_grpc.IndexServiceStub(self._channel)

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def search(
        self,
        *,
        text: str | None = None,
        image: bytes | str | Path | None = None,
        item_id: str | None = None,
        target: str | None = None,
        k: int = 10,
        where: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> SearchResult:
        """Search with exactly one of ``text``, ``image`` (bytes or a file path) or ``item_id``.

        Args:
            target: "image", "text", or None for the other modality than the query's.
            k: number of hits (the server's limit is in :meth:`status`).
            where: metadata conditions the hits must all match, by field: a list (or a
                single value) of values, one of which the field equals
                (``{"modality": ["CT", "MR"]}``; numbers match by value); or a
                ``(low, high)`` tuple, an inclusive range with None for an open end, of
                numbers (``{"year": (2020, None)}``) or of strings such as ISO dates
                (``{"date": (None, "2024-12-31")}``). :meth:`status` lists the fields.
        """
        given = [v for v in (text, image, item_id) if v is not None]
        if len(given) != 1:
            raise InvalidArgument("pass exactly one of text=, image= or item_id=")
        if target not in _MODALITY_VALUES:
            raise InvalidArgument(f"target must be 'image', 'text' or None, got {target!r}")
        query = _query(text, image, item_id)
        request = _request(pb.SearchRequest, query=query, target=_MODALITY_VALUES[target], k=k)
        if where:
            request.filter.CopyFrom(filter_message(where))
        with map_errors(self.target):
            response = self._search.Search(request, timeout=timeout or self.timeout, metadata=self._metadata)
        timing = {name: getattr(response.timing, name) for name in ("encode_ms", "head_ms", "search_ms", "total_ms")}
        return SearchResult(
            hits=[
                Hit(
                    h.item_id,
                    h.score,
                    _MODALITY_NAMES[h.modality],
                    h.text,
                    h.source,
                    json.loads(h.metadata_json or "{}"),
                    h.rank,
                )
                for h in response.hits
            ],
            snapshot_id=response.snapshot_id,
            timing=timing,
        )

    def get_items(
        self, item_ids: Sequence[str], *, metadata_only: bool = False, timeout: float | None = None
    ) -> list[Item]:
        """Items' content (image bytes or text) and metadata, in the order asked."""
        request = pb.GetItemsRequest(item_ids=_ids(item_ids, "item_ids"), metadata_only=metadata_only)
        with map_errors(self.target):
            response = self._search.GetItems(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return [
            Item(
                i.item_id,
                _MODALITY_NAMES[i.modality],
                i.text,
                i.image,
                i.source,
                json.loads(i.metadata_json or "{}"),
                i.content_hash,
            )
            for i in response.items
        ]

    def status(self, *, timeout: float | None = None) -> Status:
        with map_errors(self.target):
            r = self._search.GetStatus(pb.GetStatusRequest(), timeout=timeout or self.timeout, metadata=self._metadata)
        return Status(
            serving=r.serving,
            snapshot_id=r.snapshot.snapshot_id,
            encoder=r.snapshot.encoder,
            head_kind=r.snapshot.head_kind,
            counts={
                _MODALITY_NAMES[c.modality]: {"catalog_items": c.catalog_items, "indexed": c.indexed} for c in r.counts
            },
            version=r.version,
            uptime_s=r.uptime_s,
            max_k=r.max_k,
            metrics=json.loads(r.snapshot.metrics_json or "{}"),
            feedback_total=r.feedback.total,
            feedback_since_last_refit=r.feedback.since_last_refit,
            refits=[
                RefitRun(
                    x.run_id,
                    x.mode,
                    x.state,
                    x.started_at,
                    x.duration_s,
                    json.loads(x.before_json or "{}"),
                    json.loads(x.after_json or "{}"),
                    x.snapshot_id,
                    x.message,
                    x.progress,
                    x.feedback_events,
                )
                for x in r.refits
            ],
            live_corpus={
                "delta_items": r.live_corpus.delta_items,
                "hidden_items": r.live_corpus.hidden_items,
                "pending_erasure": r.live_corpus.pending_erasure,
                "last_compaction_snapshot_id": r.live_corpus.last_compaction_snapshot_id,
                "last_compaction_s": r.live_corpus.last_compaction_s,
            },
            filter_fields={f.name: f.kind for f in r.filter_fields},
            raw=r,
        )

    # -- the live corpus ---------------------------------------------------------------------
    def upsert_items(
        self, items: Iterable[NewItem | Mapping] | NewItem | Mapping, *, timeout: float | None = None
    ) -> UpsertResult:
        """Add items to the running server's corpus, or replace those whose id exists.

        The call is applied whole or not at all, and its items are searchable when it returns.
        Needs an API key with the ``index`` or ``admin`` role.

        Args:
            items: NewItem objects, or dicts of NewItem's fields (item_id, text or image,
                metadata, pair_id, source); ``image`` is bytes or a file path to read.

        Returns:
            UpsertResult: counts of items added, changed, unchanged, and pairs added.

        Raises:
            InvalidArgument: a malformed item (checked here before sending, or by the server,
                whose message names the item); ResourceExhausted: past a server limit;
                PermissionDenied: the key's role is below ``index``.
        """
        request = pb.UpsertItemsRequest(items=_new_items(items))
        with map_errors(self.target):
            r = self._index.UpsertItems(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return UpsertResult(r.added, r.changed, r.unchanged, r.pairs_added, tuple(r.item_ids))

    def delete_items(
        self, item_ids: Sequence[str], *, purge: bool = False, timeout: float | None = None
    ) -> DeleteResult:
        """Delete items from the running server's corpus; ids it does not
        know are returned in ``unknown_ids``, not raised. Needs the ``index`` or ``admin`` role.

        Args:
            item_ids: ids to delete (one id may be given as a plain string).
            purge: also erase every copy of the items from the server's data directory
                before answering (the server runs a compaction; see docs/operations.md).

        Returns:
            DeleteResult: ``deleted_ids`` and ``unknown_ids``.
        """
        if not isinstance(purge, bool):
            raise InvalidArgument(f"purge must be True or False, got {purge!r}")
        request = pb.DeleteItemsRequest(item_ids=_ids(item_ids, "item_ids"), purge=purge)
        with map_errors(self.target):
            r = self._index.DeleteItems(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return DeleteResult(list(r.deleted_ids), list(r.unknown_ids))

    # -- feedback and administration ---------------------------------------------------------
    def submit_feedback(
        self,
        *,
        relevant: Sequence[str],
        text: str | None = None,
        image: bytes | str | Path | None = None,
        item_id: str | None = None,
        irrelevant: Sequence[str] = (),
        weight: float = 1.0,
        source: str = "",
        timeout: float | None = None,
    ) -> str:
        """Record that ``relevant`` items answer a query; returns the feedback id once the
        event is durable on the server."""
        request = _request(
            pb.SubmitFeedbackRequest,
            query=_query(text, image, item_id),
            relevant_ids=_ids(relevant, "relevant"),
            irrelevant_ids=_ids(irrelevant, "irrelevant"),
            weight=weight,
            source=source,
        )
        with map_errors(self.target):
            response = self._search.SubmitFeedback(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return response.feedback_id

    def refit(self, mode: str = "", *, timeout: float | None = None) -> str:
        """Start a refit now ("query", "full", "auto" or "" for the server's mode); returns its run id."""
        with map_errors(self.target):
            return self._admin.Refit(
                _request(pb.RefitRequest, mode=mode), timeout=timeout or self.timeout, metadata=self._metadata
            ).run_id

    def wait_for_refit(self, run_id: str, timeout: float = 600.0) -> RefitRun:
        """Poll GetStatus until the run is no longer running; returns its record."""
        deadline = time.monotonic() + timeout
        while True:
            for run in self.status().refits:
                if run.run_id == run_id and run.state != "running":
                    return run
            if time.monotonic() > deadline:
                raise Unavailable(f"refit {run_id} still running after {timeout:.0f} s")
            time.sleep(0.2)

    def list_snapshots(self, *, timeout: float | None = None) -> list[SnapshotInfo]:
        with map_errors(self.target):
            r = self._admin.ListSnapshots(
                pb.ListSnapshotsRequest(), timeout=timeout or self.timeout, metadata=self._metadata
            )
        return [_snapshot(s, r.live_id) for s in r.snapshots]

    def rollback(self, snapshot_id: str, *, timeout: float | None = None) -> SnapshotInfo:
        with map_errors(self.target):
            r = self._admin.Rollback(
                _request(pb.RollbackRequest, snapshot_id=snapshot_id),
                timeout=timeout or self.timeout,
                metadata=self._metadata,
            )
        return _snapshot(r.snapshot, r.snapshot.snapshot_id)

    def compact(self, *, timeout: float | None = None) -> CompactResult:
        """Fold deltas and deletions into a new live snapshot and erase deleted items (admin role)."""
        with map_errors(self.target):
            r = self._admin.Compact(pb.CompactRequest(), timeout=timeout or self.timeout, metadata=self._metadata)
        return CompactResult(r.snapshot_id, r.folded_items, r.erased_items, r.rewritten_snapshots, r.seconds)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard health check: "SERVING", "NOT_SERVING", ..."""
        with map_errors(self.target):
            r = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Block until the server answers health checks with SERVING (or raise Unavailable)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=2.0)
                if last == "SERVING":
                    return
            except XmodalError as exc:  # not up yet: keep polling until the deadline
                last = str(exc)
            time.sleep(0.1)
        raise Unavailable(f"server at {self.target} not SERVING after {timeout:.0f} s (last: {last})")
