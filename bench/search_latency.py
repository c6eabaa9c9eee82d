"""Search latency on a running server: p50/p99 over text queries, split by stage.

For each gallery size a data directory is built with that many image vectors (random unit
vectors written straight into the base store: FAISS time depends on the count, not the
content), an `xmodal serve` subprocess is started on it, and text queries are sent one at
a time through SearchClient. Stages: encode (text encoder), head, FAISS, and gRPC overhead
(client round trip minus the server's own total).

    python bench/search_latency.py [--sizes 2000 100000] [--queries 500] [--model ViT-B-32 --pretrained none]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xmodal.client import SearchClient
from xmodal.indexer import world
from xmodal.indexer.catalog import Catalog, text_hash
from xmodal.indexer.corpus import IMAGE, TEXT, CorpusItem
from xmodal.indexer.encoder import resolve_model
from xmodal.indexer.heads import Head
from xmodal.indexer.snapshot import DataDir, write_snapshot
from xmodal.indexer.store import BaseStore


def build_data(root: Path, n_images: int, dim: int, spec) -> None:
    rng = np.random.default_rng(0)
    catalog = Catalog(root / "catalog.sqlite")
    catalog.bind_encoder(spec.identity, model=spec.requested[0], pretrained=spec.requested[1])
    store = BaseStore(root / "base", catalog)
    for modality, count in ((IMAGE, n_images), (TEXT, 100)):
        ids = [f"{modality}-{i:07d}" for i in range(count)]
        items = [
            CorpusItem(
                i,
                modality,
                source=f"/synthetic/{i}.png" if modality == IMAGE else "",
                text="" if modality == IMAGE else f"synthetic text {i}",
            )
            for i in ids
        ]
        catalog.upsert_items((item, text_hash(item.id)) for item in items)
        for start in range(0, count, 50_000):
            vectors = rng.standard_normal((len(ids[start : start + 50_000]), dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            store.append(modality, ids[start : start + 50_000], vectors)
    write_snapshot(DataDir(root), catalog, store, Head("identity", dim), encoder=spec.identity)


def percentiles(values) -> str:
    values = np.asarray(values)
    return f"p50 {np.percentile(values, 50):7.2f} ms  p99 {np.percentile(values, 99):7.2f} ms"


def run_size(n_images: int, args, dim: int, spec) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        started = time.perf_counter()
        build_data(data, n_images, dim, spec)
        print(f"\n{n_images:,} image vectors ({dim}-d): data directory built in {time.perf_counter() - started:.1f} s")
        port_file = Path(tmp) / "port"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xmodal.server.cli",
                "serve",
                "--data",
                str(data),
                "--port",
                "0",
                "--port-file",
                str(port_file),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(Path(tmp) / "serve.log", "w"),
        )
        try:
            deadline = time.monotonic() + 300
            while not port_file.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((Path(tmp) / "serve.log").read_text())
                time.sleep(0.1)
            queries = [world.caption(s) for s in world.scenes(args.queries + 20, seed=7)]
            stages: dict[str, list[float]] = {"encode": [], "head": [], "faiss": [], "grpc": [], "total": []}
            with SearchClient(f"127.0.0.1:{port_file.read_text()}") as client:
                client.wait_until_serving(60)
                for query in queries[:20]:  # warm-up
                    client.search(text=query, k=10)
                for query in queries[20:]:
                    t0 = time.perf_counter()
                    result = client.search(text=query, k=10)
                    round_trip = (time.perf_counter() - t0) * 1e3
                    stages["encode"].append(result.timing["encode_ms"])
                    stages["head"].append(result.timing["head_ms"])
                    stages["faiss"].append(result.timing["search_ms"])
                    stages["grpc"].append(round_trip - result.timing["total_ms"])
                    stages["total"].append(round_trip)
            for name, values in stages.items():
                print(f"  {name:7s} {percentiles(values)}")
            return {name: (float(np.percentile(v, 50)), float(np.percentile(v, 99))) for name, v in stages.items()}
        finally:
            server.terminate()
            server.wait(timeout=30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 100_000])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none", help="'none' = random weights (no download)")
    parser.add_argument("--dim", type=int, default=None, help="embedding size (default: the model's)")
    args = parser.parse_args(argv)
    spec = resolve_model(args.model, args.pretrained)
    dim = args.dim
    if dim is None:
        import open_clip

        dim = open_clip.get_model_config(spec.model)["embed_dim"]
    print(f"model {spec.identity}; {args.queries} sequential text queries, k=10, {os.cpu_count()} cores")
    results = {n: run_size(n, args, dim, spec) for n in args.sizes}
    if len(results) > 1:
        small, large = min(results), max(results)
        print(
            f"\nFAISS p50 at {large:,} vs {small:,}: {results[large]['faiss'][0] / results[small]['faiss'][0]:.1f}x; "
            f"end-to-end p50: {results[large]['total'][0] / results[small]['total'][0]:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
