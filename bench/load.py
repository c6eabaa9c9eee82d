"""Load tool: N concurrent clients for T seconds against a running xmodal server.

Each client loops over a mix of searches (text, and item-id queries) and feedback events;
optionally one refit is started halfway through. Prints throughput, p50/p99 latency per
call kind and error counts (by status). Traffic goes only to the address given (use a
server on 127.0.0.1).

    python bench/load.py --server 127.0.0.1:50051 --clients 16 --seconds 60 --refit full [--api-key KEY]
    python bench/load.py --self-test        # builds a generated corpus, serves it, runs 16 x 60 s + a full refit
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.client import RefitRun, SearchClient, XmodalError
from xmodal.indexer import world


@dataclass(frozen=True)
class LoadPlan:
    """What every client thread shares: where to send calls, what to send, and until when."""

    server: str
    api_key: str | None
    feedback_share: float
    item_ids: list[str]
    queries: list[str]
    feedback_pairs: list[tuple[str, str]] | None
    seed: int
    stop_at: float  # time.monotonic() deadline


@dataclass
class Tally:
    """Latencies (ms) and error counts per call kind, shared by the client threads under one lock."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    errors: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, elapsed_ms: float) -> None:
        with self.lock:
            self.latencies[kind].append(elapsed_ms)

    def error(self, kind: str, code) -> None:
        with self.lock:
            self.errors[f"{kind}:{code}"] += 1


def load_queries(seed: int) -> list[str]:
    """500 seeded captions; the phrasing is drawn once from ``seed``, so one run uses a single phrasing."""
    style = random.Random(seed).choice(["source", "target", "user"])
    return [world.caption(s, style) for s in world.scenes(500, seed=seed + 1)]


def one_call(client: SearchClient, kind: str, rng: random.Random, plan: LoadPlan) -> None:
    """Send one call of ``kind``; without feedback pairs, feedback pairs a random caption with a random item."""
    if kind == "feedback":
        text, relevant = (
            rng.choice(plan.feedback_pairs)
            if plan.feedback_pairs
            else (rng.choice(plan.queries), rng.choice(plan.item_ids))
        )
        client.submit_feedback(text=text, relevant=[relevant], source="load")
    elif kind == "search_item":
        client.search(item_id=rng.choice(plan.item_ids), k=10)
    else:
        client.search(text=rng.choice(plan.queries), k=10)


def client_loop(n: int, plan: LoadPlan, tally: Tally) -> None:
    """One simulated client (own seeded rng and channel) calling until the deadline; only successes are timed."""
    rng = random.Random(plan.seed * 1000 + n)
    with SearchClient(plan.server, api_key=plan.api_key, timeout=30) as client:
        while time.monotonic() < plan.stop_at:
            roll = rng.random()
            kind = "feedback" if roll < plan.feedback_share else ("search_item" if roll < 0.5 else "search_text")
            started = time.perf_counter()
            try:
                one_call(client, kind, rng, plan)
                tally.record(kind, (time.perf_counter() - started) * 1e3)
            except XmodalError as exc:
                tally.error(kind, exc.code)


def refit_halfway(server: str, api_key: str | None, mode: str, seconds: float) -> RefitRun:
    """Start one refit halfway through the load and wait for its verdict (the clients keep calling)."""
    time.sleep(seconds / 2)
    with SearchClient(server, api_key=api_key) as admin:
        run_id = admin.refit(mode)
        return admin.wait_for_refit(run_id, timeout=max(60.0, seconds * 4))


def summarise(tally: Tally, clients: int, wall: float, refit_run: RefitRun | None) -> dict:
    """The report: throughput, p50/p99 overall and per call kind, errors by kind:status, and the refit."""
    latencies = tally.latencies
    total = sum(len(v) for v in latencies.values())
    report: dict[str, Any] = {
        "clients": clients,
        "seconds": wall,
        "calls": total,
        "throughput": total / wall,
        "errors": dict(tally.errors),
        "kinds": {},
    }
    for kind, values in sorted(latencies.items()):
        arr = np.asarray(values)
        report["kinds"][kind] = {
            "calls": len(arr),
            "p50_ms": float(np.percentile(arr, 50)),
            "p99_ms": float(np.percentile(arr, 99)),
        }
    all_values = np.concatenate([np.asarray(v) for v in latencies.values()]) if total else np.zeros(1)
    report["p50_ms"], report["p99_ms"] = float(np.percentile(all_values, 50)), float(np.percentile(all_values, 99))
    if refit_run is not None:
        report["refit"] = {
            "run_id": refit_run.run_id,
            "mode": refit_run.mode,
            "state": refit_run.state,
            "duration_s": refit_run.duration_s,
            "message": refit_run.message,
            "before": refit_run.before,
            "after": {k: v for k, v in refit_run.after.items() if k != "fit"},
        }
    return report


def run_load(
    server: str,
    *,
    clients: int,
    seconds: float,
    feedback_share: float,
    refit: str | None,
    api_key: str | None,
    item_ids: list[str],
    seed: int = 0,
    feedback_pairs: list[tuple[str, str]] | None = None,
) -> dict:
    """Run the load; ``feedback_pairs`` (query text, relevant id) make the feedback
    meaningful, otherwise it pairs random captions with random items (a refit on that is
    expected to be rejected by the gate)."""
    tally = Tally()
    stop_at = time.monotonic() + seconds
    plan = LoadPlan(
        server=server,
        api_key=api_key,
        feedback_share=feedback_share,
        item_ids=item_ids,
        queries=load_queries(seed),
        feedback_pairs=feedback_pairs,
        seed=seed,
        stop_at=stop_at,
    )
    threads = [threading.Thread(target=client_loop, args=(n, plan, tally)) for n in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    refit_run = refit_halfway(server, api_key, refit, seconds) if refit else None
    for thread in threads:
        thread.join()
    return summarise(tally, clients, time.monotonic() - began, refit_run)


def print_report(report: dict) -> None:
    print(
        f"{report['clients']} clients, {report['seconds']:.1f} s: {report['calls']} calls, "
        f"{report['throughput']:.1f} calls/s, p50 {report['p50_ms']:.1f} ms, p99 {report['p99_ms']:.1f} ms"
    )
    for kind, k in report["kinds"].items():
        print(f"  {kind:12s} {k['calls']:6d} calls  p50 {k['p50_ms']:7.1f} ms  p99 {k['p99_ms']:7.1f} ms")
    print(f"  errors: {sum(report['errors'].values())} {report['errors'] or ''}")
    if "refit" in report:
        r = report["refit"]
        print(
            f"  refit during the load: {r['run_id']} {r['mode']} {r['state']} in {r['duration_s']:.1f} s "
            f"({r['message']})"
        )
        print(f"    gate figures before {r['before']}, after {r['after']}")


def self_test(args) -> dict:
    """Index a generated corpus, serve it as a subprocess, and load it."""
    from xmodal.indexer.encoder import load_encoder
    from xmodal.indexer.pipeline import index_corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus = world.write_corpus(Path(tmp) / "corpus", n=args.pairs, seed=3, style="target", image_size=64)
        index_corpus(corpus, Path(tmp) / "data", load_encoder("xmodal-demo", None), progress=False)
        port_file = Path(tmp) / "port"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xmodal.server.cli",
                "serve",
                "--data",
                str(Path(tmp) / "data"),
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--refit-epochs",
                "20",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(Path(tmp) / "serve.log", "w"),
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        try:
            while not port_file.exists():
                if server.poll() is not None:
                    raise RuntimeError((Path(tmp) / "serve.log").read_text())
                time.sleep(0.1)
            address = f"127.0.0.1:{port_file.read_text()}"
            with SearchClient(address) as client:
                client.wait_until_serving(60)
            ids = [f"target-3-{i:06d}" for i in range(args.pairs)]
            pairs = [
                (world.caption(scene, "user"), item_id)
                for scene, item_id in zip(world.scenes(args.pairs, 3), ids, strict=True)
            ]
            return run_load(
                address,
                clients=args.clients,
                seconds=args.seconds,
                feedback_share=args.feedback_share,
                refit=args.refit,
                api_key=None,
                item_ids=ids,
                feedback_pairs=pairs,
            )
        finally:
            server.terminate()
            server.wait(timeout=60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--feedback-share", type=float, default=0.1, help="share of calls that send feedback")
    parser.add_argument("--refit", default=None, choices=["query", "full", "auto"], help="start one refit halfway")
    parser.add_argument("--api-key", default=os.environ.get("XMODAL_API_KEY"))
    parser.add_argument("--items", nargs="*", default=None, help="item ids to use in item queries and feedback")
    parser.add_argument("--self-test", action="store_true", help="serve a generated corpus and load it")
    parser.add_argument("--pairs", type=int, default=2000, help="corpus size for --self-test")
    args = parser.parse_args(argv)
    if args.self_test:
        args.refit = args.refit or "full"
        report = self_test(args)
    else:
        if not args.items:
            parser.error("give --items ID ... (ids the server knows), or use --self-test")
        report = run_load(
            args.server,
            clients=args.clients,
            seconds=args.seconds,
            feedback_share=args.feedback_share,
            refit=args.refit,
            api_key=args.api_key,
            item_ids=args.items,
        )
    print_report(report)
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
