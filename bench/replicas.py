"""Search throughput with 1 and 2 read-only replicas behind gRPC round_robin, side by side.

Indexes a generated corpus, starts one primary and two replicas (`xmodal serve --read-only`)
on 127.0.0.1, then for 1 and for 2 replicas runs client processes that send text searches
for a fixed time through one round_robin channel over the replicas' addresses. Prints
queries/s and p50/p99 latency for each, their ratio, and writes them as JSON.

    python bench/replicas.py [--model xmodal-demo] [--clients 8] [--seconds 20] [--out docs/results/replicas.json]

Replicas share nothing but the data directory, so N machines serve about N times one
machine's throughput; on one 2-core machine two replicas share the same cores, which is
what this measures (and why the ratio here is a floor, not the projection).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WATCH = 1.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def start_server(data: Path, folder: Path, name: str, model: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port_file = folder / f"{name}.port"
    log = open(folder / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it
    args = [sys.executable, "-m", "xmodal.server.cli", "serve", "--data", str(data), "--port", "0"]
    args += ["--port-file", str(port_file), "--model", model, "--watch-interval", str(WATCH), *extra]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} did not start: see {folder / (name + '.log')}")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{port_file.read_text()}"


def client_worker(addresses: list[str], queries: list[str], seconds: float, seed: int, out) -> None:
    """One client process: text searches through a round_robin channel until the time is up."""
    import grpc

    from xmodal.client import SearchClient

    target = "ipv4:" + ",".join(addresses)
    channel = grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
    client = SearchClient(target, channel=channel, timeout=60)
    rng = np.random.default_rng(seed)
    client.search(text=queries[0], k=10)  # connect to every backend before the clock starts
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        query = queries[int(rng.integers(len(queries)))]
        started = time.perf_counter()
        client.search(text=query, k=10)
        latencies.append((time.perf_counter() - started) * 1e3)
    client.close()
    out.put(latencies)


def load(addresses: list[str], queries: list[str], clients: int, seconds: float) -> dict:
    context = mp.get_context("spawn")
    out = context.Queue()
    workers = [
        context.Process(target=client_worker, args=(addresses, queries, seconds, n, out)) for n in range(clients)
    ]
    for worker in workers:
        worker.start()
    latencies = np.concatenate([np.asarray(out.get(timeout=seconds + 300)) for _ in workers])
    for worker in workers:
        worker.join()
    return {
        "replicas": len(addresses),
        "clients": clients,
        "seconds": seconds,
        "queries": int(len(latencies)),
        "qps": float(len(latencies) / seconds),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="xmodal-demo", help="xmodal-demo, or e.g. ViT-B-32 with --pretrained none")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--pairs", type=int, default=2000, help="generated image-caption pairs to index")
    parser.add_argument("--clients", type=int, default=8, help="client processes")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/replicas.json"))
    args = parser.parse_args(argv)

    from xmodal.indexer import world
    from xmodal.indexer.encoder import load_encoder
    from xmodal.indexer.pipeline import index_corpus

    model_flags = ["--pretrained", args.pretrained] if args.pretrained else []
    with tempfile.TemporaryDirectory(prefix="xmodal-replicas-") as tmp:
        folder = Path(tmp)
        corpus = world.write_corpus(folder / "corpus", n=args.pairs, seed=3)
        data = folder / "data"
        encoder = load_encoder(args.model, args.pretrained)
        index_corpus(corpus, data, encoder, progress=False)
        del encoder
        queries = [world.caption(scene) for scene in world.scenes(500, 11)]
        primary, primary_address = start_server(data, folder, "primary", args.model, *model_flags)
        replicas = [
            start_server(data, folder, f"replica-{n}", args.model, "--read-only", "--primary", primary_address)
            for n in range(2)
        ]
        try:
            runs = [load([address for _, address in replicas[:n]], queries, args.clients, args.seconds) for n in (1, 2)]
        finally:
            for proc, _ in [(primary, primary_address), *replicas]:
                proc.terminate()
                proc.wait(timeout=60)
    report = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "model": args.model,
        "pairs": args.pairs,
        "runs": runs,
        "ratio_qps_2_vs_1": runs[1]["qps"] / runs[0]["qps"],
    }
    for run in runs:
        print(
            f"{run['replicas']} replica(s), {run['clients']} clients: {run['qps']:.1f} queries/s, "
            f"p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms"
        )
    print(f"2 vs 1 replica on the same {os.cpu_count()} cores: {report['ratio_qps_2_vs_1']:.2f}x queries/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
