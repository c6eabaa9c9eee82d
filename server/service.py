"""gRPC transport: thin servicers over the engine, health and reflection."""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from concurrent import futures
from datetime import datetime, timezone
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.errors import FailedPrecondition, InvalidArgument, NotFound
from xmodal.indexer.feedback import FeedbackLog
from xmodal.indexer.manifest import Manifest
from xmodal.v1 import xmodal_pb2 as pb
from xmodal.v1 import xmodal_pb2_grpc as pb_grpc

from . import metrics
from .auth import AuthInterceptor, KeyRing
from .config import ServeConfig
from .corpus import NewItem, parse_metadata
from .engine import SearchEngine
from .errors import rpc
from .filters import Condition
from .refit import Refitter

log = logging.getLogger(__name__)

_TO_PROTO = {IMAGE: pb.MODALITY_IMAGE, TEXT: pb.MODALITY_TEXT}
_FROM_PROTO: dict[int, str | None] = {pb.MODALITY_UNSPECIFIED: None, pb.MODALITY_IMAGE: IMAGE, pb.MODALITY_TEXT: TEXT}
SEARCH_SERVICE = pb.DESCRIPTOR.services_by_name["SearchService"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["AdminService"].full_name
INDEX_SERVICE = pb.DESCRIPTOR.services_by_name["IndexService"].full_name
# Requests above this are refused by gRPC itself with RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = ServeConfig.max_message_bytes


def modality_from_proto(value: int) -> str | None:
    if value not in _FROM_PROTO:
        raise InvalidArgument(f"unknown modality {value}: use MODALITY_IMAGE (1) or MODALITY_TEXT (2)")
    return _FROM_PROTO[value]


def snapshot_info(manifest: Manifest) -> pb.SnapshotInfo:
    return pb.SnapshotInfo(
        snapshot_id=manifest.id,
        created_at=manifest.created_at,
        encoder=manifest.encoder,
        head_kind=manifest.head_kind,
        head_hash=manifest.head_hash,
        faiss_factory=manifest.faiss_factory,
        dim=manifest.dim,
        parent_id=manifest.parent_id or "",
        metrics_json=json.dumps(manifest.metrics),
    )


def _query_kwargs(query) -> dict:
    kind = query.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("query is empty: set one of query.text, query.image or query.item_id")
    return {kind: getattr(query, kind)}


def conditions_from_proto(message) -> list[Condition]:
    """A Filter message as conditions; the shape of each is checked with the search."""
    if not message.all_of:
        raise InvalidArgument("filter has no conditions: add one to all_of, or leave filter unset")
    return [
        Condition(
            field=c.field,
            any_of=tuple(c.any_of),
            min=c.min if c.HasField("min") else None,
            max=c.max if c.HasField("max") else None,
            min_text=c.min_text if c.HasField("min_text") else None,
            max_text=c.max_text if c.HasField("max_text") else None,
        )
        for c in message.all_of
    ]


class SearchServicer(pb_grpc.SearchServiceServicer):
    def __init__(self, engine: SearchEngine, refitter: Refitter | None = None, keys: KeyRing | None = None):
        self.engine = engine
        self.refitter = refitter
        self.keys = keys

    @rpc
    def Search(self, request, context):
        result = self.engine.search(
            **_query_kwargs(request.query),
            target=modality_from_proto(request.target),
            k=request.k,
            deadline=self._deadline(context),
            conditions=conditions_from_proto(request.filter) if request.HasField("filter") else (),
        )
        return pb.SearchResponse(
            snapshot_id=result.snapshot_id,
            timing=pb.Timing(**result.timing),
            hits=[
                pb.Hit(
                    item_id=h.item_id,
                    score=h.score,
                    modality=_TO_PROTO[h.modality],
                    text=h.text,
                    source=h.source,
                    metadata_json=json.dumps(h.metadata),
                    rank=h.rank,
                )
                for h in result.hits
            ],
        )

    def _deadline(self, context) -> float:
        """The earlier of the client's deadline and the server's own cap (time.monotonic)."""
        remaining = context.time_remaining()
        cap = float(self.engine.limits.deadline_s)
        return time.monotonic() + (min(remaining, cap) if remaining is not None else cap)

    @rpc
    def GetItems(self, request, context):
        items = self.engine.get_items(list(request.item_ids), metadata_only=request.metadata_only)
        return pb.GetItemsResponse(
            items=[
                pb.Item(
                    item_id=i.item_id,
                    modality=_TO_PROTO[i.modality],
                    text=i.text,
                    image=i.image,
                    source=i.source,
                    metadata_json=json.dumps(i.metadata),
                    content_hash=i.content_hash,
                )
                for i in items
            ]
        )

    @rpc
    def GetStatus(self, request, context):
        status = self.engine.status()
        manifest = status["snapshot"]
        return pb.GetStatusResponse(
            feedback=self._feedback_counts(),
            refits=self._recent_runs(),
            serving=status["serving"],
            snapshot=snapshot_info(manifest) if manifest else None,
            version=status["version"],
            uptime_s=status["uptime_s"],
            max_k=status["max_k"],
            data_dir=status["data_dir"] if self._is_admin(context) else "",
            counts=[
                pb.ModalityCount(modality=_TO_PROTO[m], catalog_items=c["catalog_items"], indexed=c["indexed"])
                for m, c in status["counts"].items()
            ],
            live_corpus=pb.LiveCorpus(**status["live_corpus"]),
            filter_fields=[
                pb.FilterField(name=f.name, kind=f.kind, declared=f.declared) for f in status["filter_fields"]
            ],
            read_only=status["read_only"],
            primary=status["primary"],
        )

    def _is_admin(self, context) -> bool:
        """Whether the caller presented an admin key. The data directory's path is the server's
        own (such paths often name people): only admins see it, and nobody on a server without keys."""
        if not self.keys:
            return False
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        scheme, _, key = header.partition(" ")
        entry = self.keys.role_of(key.strip()) if scheme.lower() == "bearer" else None
        return entry is not None and entry.role == "admin"

    def _feedback_counts(self) -> pb.FeedbackCounts:
        if self.engine.read_only and not self.engine.catalog.has_table("feedback"):
            return pb.FeedbackCounts()  # a replica of a directory no server has written yet
        runs = self.refitter is not None and (not self.engine.read_only or self.engine.catalog.has_table("refit_runs"))
        last = self.refitter.runs.last_started() if runs and self.refitter else None
        events = FeedbackLog(self.engine.catalog)
        return pb.FeedbackCounts(total=events.count(), since_last_refit=events.count(since=last))

    def _recent_runs(self) -> list[pb.RefitRun]:
        if self.refitter is None or (self.engine.read_only and not self.engine.catalog.has_table("refit_runs")):
            return []
        running = self.refitter.running
        refits = []
        for row in self.refitter.runs.recent(limit=10):
            finished = row["finished_at"] or time.time()
            refits.append(
                pb.RefitRun(
                    run_id=row["id"],
                    mode=row["mode"],
                    state=row["state"],
                    started_at=datetime.fromtimestamp(row["started_at"], timezone.utc).isoformat(timespec="seconds"),
                    duration_s=finished - row["started_at"],
                    before_json=row["before"],
                    after_json=row["after"],
                    snapshot_id=row["snapshot_id"] or "",
                    message=row["message"],
                    feedback_events=row["feedback_events"],
                    progress=self.refitter.progress if row["id"] == running else "",
                )
            )
        return refits

    @rpc
    def SubmitFeedback(self, request, context):
        self.engine.check_writable("feedback")
        feedback_id = self.engine.submit_feedback(
            **_query_kwargs(request.query),
            relevant=list(request.relevant_ids),
            irrelevant=list(request.irrelevant_ids),
            weight=request.weight,
            source=request.source,
        )
        metrics.FEEDBACK.inc()
        return pb.SubmitFeedbackResponse(feedback_id=feedback_id)


class IndexServicer(pb_grpc.IndexServiceServicer):
    """The live corpus: thin over :class:`~.corpus.CorpusWrites`."""

    def __init__(self, engine: SearchEngine):
        self.engine = engine

    @rpc
    def UpsertItems(self, request, context):
        self.engine.check_writable("upserts")
        items = [_new_item(item) for item in request.items]
        counts = self.engine.corpus.upsert(items)
        return pb.UpsertItemsResponse(**counts, item_ids=[item.item_id for item in items])

    @rpc
    def DeleteItems(self, request, context):
        self.engine.check_writable("deletes")
        deleted, unknown = self.engine.corpus.delete(list(request.item_ids), purge=request.purge)
        return pb.DeleteItemsResponse(deleted_ids=deleted, unknown_ids=unknown)


def _new_item(item) -> NewItem:
    content = item.WhichOneof("content")
    return NewItem(
        item_id=item.item_id,
        text=item.text if content == "text" else None,
        image=item.image if content == "image" else None,
        metadata=parse_metadata(item.item_id, item.metadata_json),
        pair_id=item.pair_id,
        source=item.source,
    )


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, engine: SearchEngine, refitter: Refitter):
        self.engine = engine
        self.refitter = refitter

    @rpc
    def Refit(self, request, context):
        self.engine.check_writable("refits")
        return pb.RefitResponse(run_id=self.refitter.start(request.mode or None))

    @rpc
    def ListSnapshots(self, request, context):
        data = self.engine.data
        infos = [snapshot_info(Manifest.read(data.snapshots / i)) for i in data.snapshot_ids()]
        live = self.engine.snapshot
        return pb.ListSnapshotsResponse(snapshots=infos, live_id=live.id if live else "")

    @rpc
    def Rollback(self, request, context):
        self.engine.check_writable("rollbacks")
        if not request.snapshot_id.strip():
            raise InvalidArgument("snapshot_id is empty: pass an id from ListSnapshots")
        if self.refitter.running:
            raise FailedPrecondition(f"refit {self.refitter.running} is running: roll back after it finishes")
        data = self.engine.data
        if request.snapshot_id not in data.snapshot_ids():
            raise NotFound(f"no snapshot {request.snapshot_id!r}; ListSnapshots shows the ones kept")
        previous = data.current_id()
        with self.engine.view.write_lock:  # not while an erasure swaps the snapshot's files
            self.engine.open_snapshot(request.snapshot_id)  # refuse what this server cannot serve, before CURRENT moves
            # CURRENT first, then the swap: the snapshot watcher only ever loads what CURRENT names.
            data.set_current(request.snapshot_id)
            self.engine.load_current()
        log.info("rolled back to snapshot %s (was %s)", request.snapshot_id, previous)
        return pb.RollbackResponse(snapshot=snapshot_info(self.engine.view.live().manifest))

    @rpc
    def Compact(self, request, context):
        self.engine.check_writable("compactions")
        report = self.engine.compactor.compact("requested")
        return pb.CompactResponse(
            snapshot_id=report.snapshot_id,
            folded_items=report.folded_items,
            erased_items=report.erased_items,
            rewritten_snapshots=report.rewritten_snapshots,
            seconds=report.seconds,
        )


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class TLSConfig:
    """Server certificate and key (PEM files); with ``client_ca``, clients must present a
    certificate signed by it (mutual TLS)."""

    def __init__(self, cert: str | Path, key: str | Path, client_ca: str | Path | None = None):
        try:
            self.cert = Path(cert).read_bytes()
            self.key = Path(key).read_bytes()
            self.client_ca = Path(client_ca).read_bytes() if client_ca else None
        except OSError as exc:
            raise InvalidArgument(f"cannot read TLS file: {exc}") from None
        for name, pem in (("certificate", self.cert), ("key", self.key), ("client CA", self.client_ca)):
            if pem is not None and b"-----BEGIN" not in pem:
                raise InvalidArgument(f"the TLS {name} file is not PEM (no '-----BEGIN' line): pass a PEM file")

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.client_ca, require_client_auth=self.client_ca is not None
        )


def _check_authentication(host: str, keys: KeyRing | None, allow_unauthenticated: bool) -> None:
    """Without API keys, serve only loopback unless told otherwise (and then say so loudly)."""
    if not keys and host not in LOOPBACK:
        if not allow_unauthenticated:
            raise InvalidArgument(
                f"refusing to bind {host} without API keys: configure --api-keys (or "
                f"XMODAL_API_KEYS), bind 127.0.0.1, or pass --allow-unauthenticated"
            )
        log.warning(
            "serving %s WITHOUT authentication: anyone who can reach it can search, send feedback and refit", host
        )
    elif not keys:
        log.info("no API keys configured: serving without authentication on loopback %s only", host)


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port in use with a clear error, before gRPC logs its own bind failure."""
    if port == 0:
        return
    try:
        with socket.create_server((host.strip("[]"), port)):
            pass
    except OSError as exc:
        raise FailedPrecondition(
            f"could not bind {host}:{port} ({exc.strerror or exc}): is the port in use? (--port 0 takes any free port)"
        ) from None


class Server:
    """A running gRPC server: SearchService, AdminService, health and reflection on one port.

    Args:
        keys: API keys and roles; without any, the server only binds a loopback address
            unless ``allow_unauthenticated`` is set.
        tls: serve TLS instead of plaintext.
        max_concurrent: RPCs handled at once; more get RESOURCE_EXHAUSTED at once.
    """

    def __init__(
        self,
        engine: SearchEngine,
        *,
        host: str = ServeConfig.host,
        port: int = 0,
        max_workers: int = ServeConfig.rpc_workers,
        refitter: Refitter | None = None,
        keys: KeyRing | None = None,
        tls: TLSConfig | None = None,
        allow_unauthenticated: bool = False,
        max_concurrent: int | None = ServeConfig.max_concurrent,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ):
        self.engine = engine
        self.refitter = refitter or Refitter(engine)
        _check_authentication(host, keys, allow_unauthenticated)
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="xmodal-rpc"),
            interceptors=[AuthInterceptor(keys)] if keys else [],
            maximum_concurrent_rpcs=max_concurrent,
            # so_reuseport off: a second server on a port in use must fail, not share it silently
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max(max_message_bytes, MAX_MESSAGE_BYTES)),
            ],
        )
        self.health = health.HealthServicer()
        self._add_services(keys)
        self.host = host
        self.port = self._bind(host, port, tls)
        engine.on_swap(self._set_health)

    def _add_services(self, keys: KeyRing | None) -> None:
        """Our servicers, the standard health service, and reflection over all of them."""
        pb_grpc.add_SearchServiceServicer_to_server(SearchServicer(self.engine, self.refitter, keys), self.grpc_server)
        pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.engine, self.refitter), self.grpc_server)
        pb_grpc.add_IndexServiceServicer_to_server(IndexServicer(self.engine), self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (
                SEARCH_SERVICE,
                INDEX_SERVICE,
                ADMIN_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.grpc_server,
        )

    def _bind(self, host: str, port: int, tls: TLSConfig | None) -> int:
        """Bind host:port (0: any free port); returns the bound port.

        Raises:
            FailedPrecondition: the port is in use.
        """
        address = f"{host}:{port}"
        _check_port_free(host, port)
        try:
            bound = (
                self.grpc_server.add_secure_port(address, tls.credentials())
                if tls
                else self.grpc_server.add_insecure_port(address)
            )
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise FailedPrecondition(f"could not bind {address}: is the port in use? (--port 0 takes any free port)")
        return bound

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _set_health(self, snapshot) -> None:
        for modality, index in snapshot.indexes.items() if snapshot else ():
            metrics.INDEX_SIZE.labels(modality).set(len(index))
        state = health_pb2.HealthCheckResponse.SERVING if snapshot else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SEARCH_SERVICE):
            self.health.set(service, state)

    def start(self) -> Server:
        self.grpc_server.start()
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new calls, let calls in flight finish (up to ``grace`` s), then stop."""
        for service in ("", SEARCH_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc_server.stop(grace).wait()
        self.refitter.close()
        self.engine.close()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def wait_for_stop_signal() -> None:
    """Block the main thread until SIGTERM or SIGINT."""
    stopping = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s: finishing calls in flight, then stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Wake up now and then: the kernel may deliver the signal to another thread, and Python
    # runs its handler only when the main thread runs, which an untimed wait never does.
    while not stopping.wait(0.2):
        pass
