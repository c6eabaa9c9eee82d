"""`xmodal serve`, and build_engine (which offline refits use too)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from xmodal.server.config import ServeConfig

from ._common import (
    Command,
    FieldFlag,
    add_device_arg,
    add_field_flags,
    add_model_args,
    field_values,
    model_args,
    usage_error,
)
from ._training import add_refit_args, policy

log = logging.getLogger(__name__)


def build_engine(
    data: str,
    model: str,
    pretrained: str | None,
    threads: int | None,
    limits=None,
    allow_pickle: bool = False,
    mmap: bool = False,
    *,
    read_only: bool = False,
    primary: str = "",
    device: str | None = "cpu",
    encoding=None,
):
    """A SearchEngine on ``data`` with its encoder loaded, debris cleaned and the live snapshot
    loaded; ``mmap`` memory-maps the snapshots' index files. A ``read_only`` replica cleans
    nothing (debris is the primary's to remove)."""
    from xmodal.indexer.encoder import load_encoder
    from xmodal.indexer.onnx_encoder import query_encoder
    from xmodal.server.batcher import QueryEncoding
    from xmodal.server.engine import Limits, SearchEngine

    encoding = encoding or QueryEncoding()
    encoder = load_encoder(model, pretrained, threads=threads, allow_pickle=allow_pickle, device=device)
    fast = query_encoder(encoder, encoding.runtime, threads=threads, passes=encoding.passes)
    engine = SearchEngine(
        data,
        encoder,
        limits=limits or Limits(),
        mmap=mmap,
        read_only=read_only,
        primary=primary,
        query_encoder=fast,
        encoding=encoding,
    )
    if not read_only:
        engine.clean_debris()
    engine.load_current()
    return engine


@contextlib.contextmanager
def serving_lock(data: str, instead: str | None = None) -> Iterator[None]:
    """Hold an flock on ``<data>/serve.lock`` (released when the process dies, even by
    SIGKILL): shared by servers, exclusive (``instead`` given) for offline maintenance that
    must not run beside a server.

    Raises:
        FailedPrecondition: exclusive, and a server holds it; ``instead`` says what to do.
    """
    from xmodal.indexer.errors import FailedPrecondition
    from xmodal.indexer.snapshot import DataDir

    folder = DataDir(data)
    folder.create()
    with open(folder.root / "serve.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH if instead is None else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FailedPrecondition(f"a server is running on data directory {Path(data).name!r}: {instead}") from None
        yield


SERVE_FLAGS: tuple[FieldFlag, ...] = (  # ServeConfig's fields, one flag each
    ("--host", "host", "address to bind (default %(default)s)"),
    ("--port", "port", "port (default %(default)s; 0 = any free)"),
    ("--rpc-workers", "rpc_workers", "gRPC worker threads (default %(default)s)"),
    ("--watch-interval", "watch_interval", "seconds between checks of snapshots/CURRENT (default %(default)s)"),
    ("--grace", "grace", "seconds calls in flight get on SIGTERM (default %(default)s)"),
    (
        "--max-concurrent",
        "max_concurrent",
        "RPCs handled at once; more are refused with RESOURCE_EXHAUSTED (default %(default)s)",
    ),
    (
        "--max-message-bytes",
        "max_message_bytes",
        "largest gRPC request (default {size}; larger gets RESOURCE_EXHAUSTED)",
    ),
    ("--metrics-port", "metrics_port", "serve Prometheus metrics on this port (default off)"),
    ("--metrics-host", "metrics_host", "address of the metrics endpoint (default %(default)s)"),
)

LIMIT_FLAGS: tuple[FieldFlag, ...] = (  # Limits' fields
    ("--max-k", "max_k", "largest k a search may ask for (default %(default)s)"),
    ("--max-image-bytes", "max_image_bytes", "largest query image (default {size})"),
    ("--max-pixels", "max_pixels", "largest declared width x height, checked before decoding (default %(default)s)"),
    ("--max-text-chars", "max_text_chars", "longest query text (default %(default)s characters)"),
    ("--max-items", "max_items_per_request", "ids per GetItems call (default %(default)s)"),
    ("--max-feedback-ids", "max_feedback_ids", "item ids per feedback event (default %(default)s)"),
    ("--max-upsert-items", "max_upsert_items", "items per UpsertItems, ids per DeleteItems (default %(default)s)"),
    (
        "--deadline",
        "deadline_s",
        "server-side cap in seconds on one search, besides the client's own deadline (default %(default)s)",
    ),
)

COMPACTION_FLAGS: tuple[FieldFlag, ...] = (  # CompactionPolicy's fields
    (
        "--compact-delta-items",
        "max_delta_items",
        "compact when this many upserted items wait in deltas (default %(default)s; 0 = never)",
    ),
    (
        "--compact-deleted",
        "max_deleted",
        "compact when this many deleted or replaced items wait to be erased (default %(default)s; 0 = never)",
    ),
    (
        "--compact-age",
        "max_age_s",
        "compact when the oldest change not yet compacted is this many seconds old (default %(default)s; 0 = never)",
    ),
)

QUERY_FLAGS: tuple[FieldFlag, ...] = (  # QueryEncoding's fields
    (
        "--query-runtime",
        "runtime",
        "what encodes queries: torch, onnx or onnx-int8 (ONNX Runtime on the CPU, exported once and cached, "
        "checked against torch at start; corpus vectors always come from torch) (default %(default)s)",
    ),
    ("--batch-max", "max_batch", "most concurrent queries encoded in one forward pass (default %(default)s; 1 = off)"),
    ("--batch-wait-ms", "max_wait_ms", "how long a query waits for others to share its pass (default %(default)s)"),
    ("--query-cache", "cache_size", "query embeddings kept in an LRU cache (default %(default)s; 0 = off)"),
    (
        "--encode-passes",
        "passes",
        "query batches the ONNX encoder runs at once, each a forward pass (default %(default)s; torch runs one)",
    ),
)

SCHEDULE_FLAGS: tuple[FieldFlag, ...] = (  # RefitPolicy's timing, besides REFIT OPTIONS
    ("--refit-interval", "interval_s", "refit every N seconds when there is new feedback (default: off)"),
    ("--refit-after", "after_feedback", "refit after M new feedback events (default: off)"),
)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(**field_values(args, SERVE_FLAGS))


def query_encoding(args: argparse.Namespace):
    from xmodal.server.batcher import QueryEncoding

    return QueryEncoding(**field_values(args, QUERY_FLAGS))


def compaction_policy(args: argparse.Namespace):
    from xmodal.server.compaction import CompactionPolicy

    return CompactionPolicy(**field_values(args, COMPACTION_FLAGS))


def limits(args: argparse.Namespace):
    from xmodal.server.limits import Limits

    return Limits(**field_values(args, LIMIT_FLAGS))


def _add_security_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-keys",
        default=None,
        help="JSON file of hashed API keys (see `xmodal keys add`); XMODAL_API_KEYS='role:key,...' adds more",
    )
    parser.add_argument(
        "--allow-unauthenticated", action="store_true", help="allow binding a non-loopback address without API keys"
    )
    parser.add_argument("--tls-cert", default=None, help="server certificate PEM (enables TLS)")
    parser.add_argument("--tls-key", default=None, help="server private key PEM")
    parser.add_argument(
        "--tls-client-ca", default=None, help="require client certificates signed by this CA (mutual TLS)"
    )


class ServeCommand(Command):
    name = "serve"
    help = "run the gRPC server on a data directory"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from xmodal.server.batcher import QueryEncoding
        from xmodal.server.compaction import CompactionPolicy
        from xmodal.server.limits import Limits
        from xmodal.server.refit import RefitPolicy

        parser.add_argument("--data", required=True, help="data directory")
        add_field_flags(parser, ServeConfig, SERVE_FLAGS)
        parser.add_argument("--port-file", default=None, help="write the bound port to this file once serving")
        parser.add_argument(
            "--mmap",
            action="store_true",
            help="memory-map the index files read-only (faster start, pages shared between processes)",
        )
        parser.add_argument(
            "--read-only",
            action="store_true",
            help="a read-only replica: serve Search, GetItems and GetStatus from what a primary writes to this "
            "(shared or synced) data directory, follow it, and never write; writes get FAILED_PRECONDITION",
        )
        parser.add_argument(
            "--primary", default="", metavar="HOST:PORT", help="with --read-only: the primary, named to clients"
        )
        add_model_args(parser, default_from_data=True)
        add_device_arg(parser)
        add_field_flags(parser, QueryEncoding, QUERY_FLAGS)
        add_field_flags(parser, Limits, LIMIT_FLAGS)
        add_field_flags(parser, CompactionPolicy, COMPACTION_FLAGS)
        add_field_flags(parser, RefitPolicy, SCHEDULE_FLAGS)
        add_refit_args(parser)
        _add_security_args(parser)

    def validate(self, args: argparse.Namespace) -> None:
        from xmodal.indexer.encoder import resolve_device

        if args.primary and not args.read_only:
            raise usage_error(args, "--primary names a read-only replica's primary: add --read-only, or drop it")
        if bool(args.tls_cert) != bool(args.tls_key):
            raise usage_error(args, "--tls-cert and --tls-key go together")
        if args.tls_client_ca and not args.tls_cert:
            raise usage_error(args, "--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
        serve_config(args)  # each raises InvalidArgument on a bad value, before the encoder loads
        limits(args)
        query_encoding(args)
        resolve_device(args.device)
        compaction_policy(args)
        policy(args)

    def run(self, args: argparse.Namespace) -> int:
        if args.read_only:  # takes no lock: a replica writes nothing, and holds up nobody
            return self._serve(args)
        with serving_lock(args.data):
            return self._serve(args)

    def _serve(self, args: argparse.Namespace) -> int:
        from xmodal.server.refit import Refitter

        config = serve_config(args)
        model, pretrained = model_args(args, Path(args.data))
        engine = build_engine(
            args.data,
            model,
            pretrained,
            args.threads,
            limits(args),
            args.allow_pickle,
            args.mmap,
            read_only=args.read_only,
            primary=args.primary,
            device=args.device,
            encoding=query_encoding(args),
        )
        refitter = Refitter(engine, policy(args))
        if not args.read_only:
            if engine.snapshot is None:  # an empty data directory: serve it, empty, and take upserts
                engine.compactor.first_snapshot()
            engine.compactor.schedule(compaction_policy(args))
        engine.watch(config.watch_interval)
        server = _start_server(args, config, engine, refitter)
        if args.port_file:
            _write_port_file(args.port_file, server.port)
        from xmodal.server.service import wait_for_stop_signal

        wait_for_stop_signal()
        server.stop(grace=config.grace)
        log.info("stopped")
        return 0


def _start_server(args: argparse.Namespace, config: ServeConfig, engine, refitter):
    """Start the gRPC server with the key and TLS flags (and the metrics endpoint), then the refit schedule."""
    from xmodal.server.auth import KeyRing
    from xmodal.server.service import Server, TLSConfig

    keys = KeyRing.load(args.api_keys)
    tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    server = Server(
        engine,
        host=config.host,
        port=config.port,
        max_workers=config.rpc_workers,
        refitter=refitter,
        keys=keys if len(keys) else None,
        tls=tls,
        allow_unauthenticated=args.allow_unauthenticated,
        max_concurrent=config.max_concurrent,
        max_message_bytes=config.max_message_bytes,
    ).start()
    _serve_metrics(config)
    if not engine.read_only:
        refitter.schedule()
    log.info(
        "serving data directory %r on %s%s (encoder %s, %d API key(s))%s",
        engine.data.root.name,  # its name only: the server's own paths stay out of logs
        server.address,
        " with TLS" if tls else "",
        engine.encoder.identity,
        len(keys),
        f", a read-only replica of {engine.primary or 'the primary'}" if engine.read_only else "",
    )
    return server


def _serve_metrics(config: ServeConfig) -> None:
    if config.metrics_port is None:
        return
    from xmodal.server import metrics

    metrics.serve(config.metrics_port, host=config.metrics_host)
    log.info("metrics on http://%s:%d/metrics", config.metrics_host, config.metrics_port)


def _write_port_file(path: str, port: int) -> None:
    """Write ``port`` to ``path`` atomically, so a reader never sees a partial number."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)


COMMANDS = (ServeCommand(),)
