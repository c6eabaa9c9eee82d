"""The `xmodal` command line: index, serve, search, status, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

DEFAULT_PORT = 50051


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", default=os.environ.get("XMODAL_API_KEY"),
                        help="API key (default: $XMODAL_API_KEY), sent as 'authorization: Bearer KEY'")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca-cert", default=None, help="PEM of the authority that signed the server's certificate")
    parser.add_argument("--client-cert", default=None, help="client certificate PEM (mutual TLS)")
    parser.add_argument("--client-key", default=None, help="client key PEM (mutual TLS)")


def _client(args, server: str):
    from xmodal.client import SearchClient

    return SearchClient(server, timeout=args.timeout, api_key=args.api_key, tls=args.tls, ca_cert=args.ca_cert,
                        client_cert=args.client_cert, client_key=args.client_key)


def _add_model_args(parser: argparse.ArgumentParser, *, default_from_data: bool = False) -> None:
    from_data = " (default: the model the data directory was indexed with)" if default_from_data else ""
    parser.add_argument("--model", default=None,
                        help="open_clip model name (default ViT-B-32), local-dir:/path, or xmodal-demo" + from_data)
    parser.add_argument("--pretrained", default=None,
                        help="pretrained tag (default laion2b_s34b_b79k for ViT-B-32), a checkpoint path, "
                             "or 'none' for random weights" + from_data)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a .pt/.bin checkpoint with full unpickling (trusted files only)")


def _model_args(args, data_dir: Path | None = None) -> tuple[str, str | None]:
    from xmodal.indexer.encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED

    if args.model is None and args.pretrained is None and data_dir is not None:
        catalog_path = Path(data_dir) / "catalog.sqlite"
        if catalog_path.exists():
            from xmodal.indexer.catalog import Catalog

            recorded = Catalog(catalog_path).get_meta("model")
            if recorded:
                model, pretrained = json.loads(recorded)
                return model, pretrained
    model = args.model or DEFAULT_MODEL
    if args.pretrained is not None:
        return model, args.pretrained
    return model, (DEFAULT_PRETRAINED if model == DEFAULT_MODEL else None)


def _add_head_args(parser: argparse.ArgumentParser, *, default_kind: str = "mlp") -> None:
    from xmodal.indexer.heads import HEAD_KINDS

    parser.add_argument("--head", default=default_kind, choices=HEAD_KINDS,
                        help=f"head kind (default {default_kind}); identity = zero-shot")
    parser.add_argument("--hidden", type=int, default=512, help="hidden width of mlp/shared heads (default 512)")
    parser.add_argument("--dim-out", type=int, default=None,
                        help="output size (default: the encoder's; pca: min(128, dim/2))")
    parser.add_argument("--epochs", type=int, default=200, help="maximum epochs (default 200; early stopping on val)")
    parser.add_argument("--patience", type=int, default=15, help="epochs without a better val recall before stopping")
    parser.add_argument("--max-fit-seconds", type=float, default=900.0, help="time cap of one fit (default 900)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    parser.add_argument("--fit-batch-size", type=int, default=256, help="pairs per training batch (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--label-field", default=None, help="metadata field with a class label for label losses")
    parser.add_argument("--pairwise-weight", type=float, default=0.0, help="weight of the label-aware pairwise loss")
    parser.add_argument("--supcon-weight", type=float, default=0.0, help="weight of the supervised contrastive loss")


def _fit_config(args):
    from xmodal.indexer.train import FitConfig

    return FitConfig(kind=args.head, hidden=args.hidden, dim_out=args.dim_out, epochs=args.epochs, lr=args.lr,
                     patience=args.patience, max_seconds=args.max_fit_seconds,
                     batch_size=args.fit_batch_size, seed=args.seed, pairwise_weight=args.pairwise_weight,
                     supcon_weight=args.supcon_weight)


def cmd_index(args) -> int:
    from xmodal.indexer.encoder import load_encoder
    from xmodal.indexer.pipeline import index_corpus

    model, pretrained = _model_args(args, Path(args.data))
    encoder = load_encoder(model, pretrained, threads=args.threads, allow_pickle=args.allow_pickle)
    report = index_corpus(args.corpus, args.data, encoder, head=_fit_config(args), label_field=args.label_field,
                          batch_size=args.batch_size, shard_size=args.shard_size, workers=args.workers,
                          factory=args.factory, progress=not args.no_progress)
    print(report.summary())
    return 0


def cmd_fit(args) -> int:
    from xmodal.indexer.adapt import fit_snapshot

    manifest, report = fit_snapshot(args.data, _fit_config(args), label_field=args.label_field,
                                    warm_start=args.warm_start, progress=not args.no_progress,
                                    feedback=not args.no_feedback)
    print(report.summary())
    if manifest["metrics"].get("feedback_pairs"):
        print(f"  trained on {manifest['metrics']['feedback_pairs']} feedback pairs as well as the corpus pairs "
              "(--no-feedback: corpus pairs only)")
    print(f"wrote snapshot {manifest['id']} ({manifest['head']['kind']} head) and made it current")
    for name in ("zero_shot", "adapted"):
        for direction, m in sorted(manifest["metrics"].get(name, {}).items(), reverse=True):
            print(f"  {name:9s} {direction.replace('_to_', '->')}: R@1 {m['recall@1']:.3f}  R@5 {m['recall@5']:.3f}  "
                  f"R@10 {m['recall@10']:.3f}  MRR {m['mrr']:.3f} ({m['queries']} held-out queries)")
    return 0


def cmd_eval(args) -> int:
    from xmodal.indexer.adapt import bar_chart, compare_heads, markdown_table

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    comparison = compare_heads(args.data, kinds=kinds, split=args.split, base=_fit_config(args),
                               label_field=args.label_field, progress=not args.no_progress)
    table = markdown_table(comparison)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(comparison, indent=2))
        (out / "eval.md").write_text(table)
        bar_chart(comparison, out / "eval.png")
        print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'eval.png'}")
    return 0


def build_engine(data: str, model: str, pretrained: str | None, threads: int | None, limits=None,
                 allow_pickle: bool = False):
    from xmodal.indexer.encoder import load_encoder
    from xmodal.server.engine import Limits, SearchEngine

    encoder = load_encoder(model, pretrained, threads=threads, allow_pickle=allow_pickle)
    engine = SearchEngine(data, encoder, limits=limits or Limits())
    engine.clean_debris()
    engine.load_current()
    return engine


def _policy(args):
    from xmodal.server.refit import RefitPolicy

    return RefitPolicy(interval_s=args.refit_interval, after_feedback=args.refit_after, mode=args.refit_mode,
                       max_seconds=args.refit_max_seconds, tolerance=args.refit_tolerance,
                       feedback_weight=args.feedback_weight, keep_snapshots=args.keep_snapshots,
                       epochs=args.refit_epochs, hard_negative_weight=args.hard_negative_weight)


def _add_refit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refit-mode", default="auto", choices=["auto", "query", "full"],
                        help="query: only the query modality's adapter, indexes reused; full: both heads, indexes "
                             "rebuilt from the base store; auto: query unless the corpus changed (default auto)")
    parser.add_argument("--refit-max-seconds", type=float, default=600.0, help="training time cap per refit (default 600)")
    parser.add_argument("--refit-tolerance", type=float, default=0.01,
                        help="promote only if validation recall@10 drops by at most this (default 0.01)")
    parser.add_argument("--refit-epochs", type=int, default=40, help="maximum epochs per refit (default 40)")
    parser.add_argument("--feedback-weight", type=float, default=1.0, help="weight of feedback pairs vs corpus pairs")
    parser.add_argument("--hard-negative-weight", type=float, default=4.0,
                        help="an item marked irrelevant to a feedback query counts as this many ordinary "
                             "negatives of that query (default 4)")
    parser.add_argument("--keep-snapshots", type=int, default=10, help="snapshots kept for rollback (default 10)")


def cmd_serve(args) -> int:
    from xmodal.server.refit import Refitter
    from xmodal.server.service import Server

    log = logging.getLogger("xmodal.server")
    model, pretrained = _model_args(args, Path(args.data))
    from xmodal.server.engine import Limits

    limits = Limits(max_k=args.max_k, max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels,
                    max_text_chars=args.max_text_chars, max_items_per_request=args.max_items,
                    max_feedback_ids=args.max_feedback_ids, deadline_s=args.deadline)
    engine = build_engine(args.data, model, pretrained, args.threads, limits, args.allow_pickle)
    refitter = Refitter(engine, _policy(args))
    if engine.snapshot is None:
        log.warning("no snapshot in %s yet: health is NOT_SERVING and searches fail with FAILED_PRECONDITION "
                    "until one is indexed (picked up without a restart)", engine.data.root)
    engine.watch(args.watch_interval)
    from xmodal.server.auth import KeyRing
    from xmodal.server.service import TLSConfig

    keys = KeyRing.load(args.api_keys)
    tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert or args.tls_key else None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("xmodal serve: --tls-cert and --tls-key go together")
    server = Server(engine, host=args.host, port=args.port, max_workers=args.rpc_workers, refitter=refitter,
                    keys=keys if len(keys) else None, tls=tls, allow_unauthenticated=args.allow_unauthenticated,
                    max_concurrent=args.max_concurrent, max_message_bytes=args.max_message_bytes).start()
    if args.metrics_port is not None:
        from xmodal.server import metrics

        metrics.serve(args.metrics_port, host=args.metrics_host)
        log.info("metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)
    refitter.schedule()
    log.info("serving %s on %s%s (encoder %s, %d API key(s))", engine.data.root, server.address,
             " with TLS" if tls else "", engine.encoder.identity, len(keys))
    if args.port_file:
        tmp = Path(args.port_file).with_suffix(".tmp")
        tmp.write_text(str(server.port))
        os.replace(tmp, args.port_file)
    stopping = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s: finishing calls in flight, then stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    server.stop(grace=args.grace)
    log.info("stopped")
    return 0


def _print_hits(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"snapshot_id": result.snapshot_id, "timing": result.timing,
                          "hits": [vars(h) for h in result.hits]}, indent=2))
        return
    for hit in result.hits:
        what = hit.text if hit.modality == "text" else hit.source
        print(f"{hit.rank:3d}  {hit.score:+.4f}  {hit.modality:5s}  {hit.item_id}  {what[:100]}")
    print(f"({len(result.hits)} hits from snapshot {result.snapshot_id}, {result.timing['total_ms']:.1f} ms on the server)")


def cmd_search(args) -> int:
    with _client(args, args.server) as client:
        result = client.search(text=args.text, image=args.image, item_id=args.item, target=args.target, k=args.k)
    _print_hits(result, args.json)
    return 0


def cmd_status(args) -> int:
    with _client(args, args.server) as client:
        status = client.status()
    print(json.dumps({k: v for k, v in vars(status).items() if k != "raw"}, indent=2))
    return 0


def cmd_feedback(args) -> int:
    if args.file:
        events = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
    else:
        if not args.relevant:
            raise SystemExit("xmodal feedback: give --relevant ID (with --text/--image/--item), or --file FILE.jsonl")
        events = [{"text": args.text, "image": args.image, "item_id": args.item, "relevant": args.relevant,
                   "irrelevant": args.irrelevant or [], "weight": args.weight, "source": args.source}]
    with _client(args, args.server) as client:
        for n, event in enumerate(events, start=1):
            unknown = set(event) - {"text", "image", "item_id", "relevant", "irrelevant", "weight", "source"}
            if unknown:
                raise SystemExit(f"xmodal feedback: line {n}: unknown field(s) {sorted(unknown)}")
            feedback_id = client.submit_feedback(
                text=event.get("text"), image=event.get("image"), item_id=event.get("item_id"),
                relevant=event.get("relevant") or [], irrelevant=event.get("irrelevant") or [],
                weight=float(event.get("weight", 1.0)), source=event.get("source") or "")
            print(feedback_id)
    return 0


def cmd_refit(args) -> int:
    if args.server and args.data:
        raise SystemExit("xmodal refit: pass --server (a running server) or --data (offline), not both")
    if args.data:
        from xmodal.server.refit import Refitter

        model, pretrained = _model_args(args, Path(args.data))
        engine = build_engine(args.data, model, pretrained, args.threads, None, args.allow_pickle)
        refitter = Refitter(engine, _policy(args))
        run_id = refitter.start(args.mode or None)
        refitter.wait()
        row = next(r for r in engine.catalog.runs() if r["id"] == run_id)
        print(json.dumps({k: row[k] for k in ("id", "mode", "state", "snapshot_id", "message")}, indent=2))
        print(f"before: {row['before']}\nafter:  {row['after']}")
        return 0 if row["state"] in ("promoted", "rejected") else 1
    with _client(args, args.server or f"127.0.0.1:{DEFAULT_PORT}") as client:
        run_id = client.refit(args.mode)
        print(f"started {run_id}")
        if args.wait:
            run = client.wait_for_refit(run_id, timeout=args.timeout_refit)
            print(json.dumps(vars(run), indent=2))
    return 0


def cmd_snapshots(args) -> int:
    if args.data:
        from xmodal.indexer.snapshot import DataDir

        data = DataDir(args.data)
        if args.rollback:
            data.set_current(args.rollback)
            print(f"CURRENT is now {args.rollback}; a running server picks it up within its watch interval")
            return 0
        current = data.current_id()
        for snapshot_id in data.snapshot_ids():
            manifest = json.loads((data.snapshots / snapshot_id / "manifest.json").read_text())
            mark = "*" if snapshot_id == current else " "
            print(f"{mark} {snapshot_id}  {manifest['head']['kind']:8s} parent {manifest.get('parent_id') or '-'}")
        return 0
    with _client(args, args.server) as client:
        if args.rollback:
            info = client.rollback(args.rollback)
            print(f"live snapshot is now {info.snapshot_id} ({info.head_kind})")
            return 0
        for info in client.list_snapshots():
            print(f"{'*' if info.live else ' '} {info.snapshot_id}  {info.head_kind:8s} parent {info.parent_id or '-'}")
    return 0


def cmd_backup(args) -> int:
    from xmodal.indexer.backup import backup

    result = backup(args.data, args.out)
    print(f"backed up {args.data} to {args.out}: catalog, {result['shards']} base shards, "
          f"{result['snapshots']} snapshots (live: {result['current']})")
    return 0


def cmd_keys(args) -> int:
    from xmodal.server.auth import add_key

    key = add_key(args.file, args.name, args.role)
    print(key)
    print(f"(stored only as a sha256 hash in {args.file}; this is the one time the key is shown)", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from xmodal.server.demo import run_demo

    return run_demo(data=args.data, port=args.port, once=args.once, n=args.n)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmodal", description="Cross-modal image/text search on frozen open_clip "
                                     "embeddings, with small CPU-trained heads, FAISS and gRPC.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="generate the offline demo corpus, index it, serve it, show queries")
    p.add_argument("--data", default="demo-data", help="data directory (default ./demo-data)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; 0 = any free)")
    p.add_argument("--n", type=int, default=2000, help="image-caption pairs to generate (default 2000)")
    p.add_argument("--once", action="store_true", help="exit after the example searches instead of serving on")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("index", help="build or extend a data directory from a corpus")
    p.add_argument("corpus", help="a folder with captions.jsonl/.csv, or a JSONL manifest")
    p.add_argument("--data", required=True, help="data directory (created if missing)")
    _add_model_args(p, default_from_data=True)
    _add_head_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default 64)")
    p.add_argument("--shard-size", type=int, default=1024, help="items per base shard and commit (default 1024)")
    p.add_argument("--workers", type=int, default=None, help="image decoding threads (default: cores, max 4)")
    p.add_argument("--factory", default="Flat", help="FAISS index factory string (default Flat)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("fit", help="refit the head of a data directory offline and write a new snapshot")
    p.add_argument("--data", required=True, help="data directory")
    _add_head_args(p)
    p.add_argument("--warm-start", action="store_true", help="start from the live snapshot's head (same kind)")
    p.add_argument("--no-feedback", action="store_true",
                   help="train on the corpus pairs only (default: the feedback events' training slice too)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("eval", help="recall@k and MRR of zero-shot, PCA and each head kind on held-out pairs")
    p.add_argument("--data", required=True, help="data directory")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to report on (default test)")
    p.add_argument("--kinds", default="identity,pca,linear,mlp,shared", help="comma-separated head kinds")
    p.add_argument("--out", default=None, help="folder for eval.json, eval.md and eval.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_head_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="run the gRPC server on a data directory")
    p.add_argument("--data", required=True, help="data directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    p.add_argument("--port-file", default=None, help="write the bound port to this file once serving")
    _add_model_args(p, default_from_data=True)
    p.add_argument("--max-k", type=int, default=1000, help="largest k a search may ask for (default 1000)")
    p.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, help="largest query image (default 20 MiB)")
    p.add_argument("--max-pixels", type=int, default=50_000_000,
                   help="largest declared width x height, checked before decoding (default 50,000,000)")
    p.add_argument("--max-text-chars", type=int, default=10_000, help="longest query text (default 10,000 characters)")
    p.add_argument("--max-items", type=int, default=100, help="ids per GetItems call (default 100)")
    p.add_argument("--max-feedback-ids", type=int, default=100, help="item ids per feedback event (default 100)")
    p.add_argument("--deadline", type=int, default=30,
                   help="server-side cap in seconds on one search, besides the client's own deadline (default 30)")
    p.add_argument("--max-message-bytes", type=int, default=32 * 1024 * 1024,
                   help="largest gRPC request (default 32 MiB; larger gets RESOURCE_EXHAUSTED)")
    p.add_argument("--rpc-workers", type=int, default=8, help="gRPC worker threads (default 8)")
    p.add_argument("--watch-interval", type=float, default=2.0, help="seconds between checks of snapshots/CURRENT")
    p.add_argument("--grace", type=float, default=5.0, help="seconds calls in flight get on SIGTERM (default 5)")
    p.add_argument("--refit-interval", type=float, default=None,
                   help="refit every N seconds when there is new feedback (default: off)")
    p.add_argument("--refit-after", type=int, default=None, help="refit after M new feedback events (default: off)")
    _add_refit_args(p)
    p.add_argument("--api-keys", default=None, help="JSON file of hashed API keys (see `xmodal keys add`); "
                   "XMODAL_API_KEYS='role:key,...' adds more")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="allow binding a non-loopback address without API keys")
    p.add_argument("--tls-cert", default=None, help="server certificate PEM (enables TLS)")
    p.add_argument("--tls-key", default=None, help="server private key PEM")
    p.add_argument("--tls-client-ca", default=None, help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (default off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default 127.0.0.1)")
    p.add_argument("--max-concurrent", type=int, default=64,
                   help="RPCs handled at once; more are refused with RESOURCE_EXHAUSTED (default 64)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("backup", help="consistent copy of a data directory, safe while a server runs")
    p.add_argument("--data", required=True, help="data directory")
    p.add_argument("--out", required=True, help="new folder for the copy (restore: use it as --data)")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("keys", help="create an API key (its hash goes into the key file; the key is printed once)")
    p.add_argument("action", choices=["add"])
    p.add_argument("--file", required=True, help="key file (JSON, created if missing, mode 600)")
    p.add_argument("--name", required=True, help="who the key is for")
    p.add_argument("--role", required=True, choices=["search", "feedback", "admin"])
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("feedback", help="send feedback: a query and the items that answer it (one, or a JSONL file)")
    p.add_argument("--server", default=f"127.0.0.1:{DEFAULT_PORT}", help="host:port")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--text", help="the query text")
    q.add_argument("--image", help="path of the query image")
    q.add_argument("--item", help="id of the query item")
    q.add_argument("--file", help="JSONL: {text|image|item_id, relevant: [...], irrelevant?, weight?, source?} per line")
    p.add_argument("--relevant", nargs="+", help="ids of the items that answer the query")
    p.add_argument("--irrelevant", nargs="+", help="ids of items judged wrong")
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--source", default="cli", help="tag of where the feedback came from")
    p.add_argument("--timeout", type=float, default=30.0)
    _add_client_args(p)
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("refit", help="ask a running server to refit now, or refit a data directory offline")
    p.add_argument("--server", default=None, help=f"host:port of a running server (default 127.0.0.1:{DEFAULT_PORT})")
    p.add_argument("--data", default=None, help="refit this data directory offline instead")
    p.add_argument("--mode", default="", choices=["", "auto", "query", "full"], help="refit mode (default: the policy's)")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish and print it")
    p.add_argument("--timeout", type=float, default=30.0)
    _add_client_args(p)
    p.add_argument("--timeout-refit", type=float, default=1800.0, help="seconds --wait waits (default 1800)")
    _add_model_args(p, default_from_data=True)
    _add_refit_args(p)
    p.set_defaults(func=cmd_refit)

    p = sub.add_parser("snapshots", help="list snapshots, or roll back to one (--rollback ID)")
    p.add_argument("--server", default=f"127.0.0.1:{DEFAULT_PORT}", help="host:port of a running server")
    p.add_argument("--data", default=None, help="work on a data directory instead of a server")
    p.add_argument("--rollback", default=None, metavar="ID", help="make this snapshot live")
    p.add_argument("--timeout", type=float, default=30.0)
    _add_client_args(p)
    p.set_defaults(func=cmd_snapshots)

    p = sub.add_parser("search", help="query a running server and print hits")
    p.add_argument("--server", default=f"127.0.0.1:{DEFAULT_PORT}", help="host:port")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="text query")
    q.add_argument("--image", help="path of an image file to query with")
    q.add_argument("--item", help="id of an indexed item to query with")
    p.add_argument("--target", choices=["image", "text"], default=None, help="modality of the hits (default: the other one)")
    p.add_argument("-k", type=int, default=10, help="number of hits (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    _add_client_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("status", help="print a running server's status")
    p.add_argument("--server", default=f"127.0.0.1:{DEFAULT_PORT}", help="host:port")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    _add_client_args(p)
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    # open_clip logs every step of model loading at INFO on the root logger: keep ours only.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("xmodal").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from xmodal.client import XmodalError as ClientError
    from xmodal.indexer.errors import XmodalError

    try:
        return args.func(args)
    except (XmodalError, ClientError) as exc:
        print(f"xmodal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"xmodal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
