"""The live corpus on a running server: upsert throughput against the bare encoder,
acknowledgement-to-visible time, delete latency, and search latency with items in deltas
and tombstones against a snapshot that holds the same corpus.

A corpus of ``--base`` generated image-caption pairs is indexed (xmodal-demo, zero-shot head),
a server is started in this process on 127.0.0.1, and everything else goes through the
Python client over gRPC, as a frontend's calls would.

    python bench/live.py [--base 20000] [--upserts 2000] [--queries 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xmodal.client import NewItem, SearchClient
from xmodal.indexer import world
from xmodal.indexer.adapt import fit_snapshot
from xmodal.indexer.encoder import DEMO_MODEL, load_encoder
from xmodal.indexer.pipeline import index_corpus
from xmodal.indexer.train import FitConfig
from xmodal.server.engine import SearchEngine
from xmodal.server.limits import Limits
from xmodal.server.service import Server

BATCH = 64


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def new_items(n: int, seed: int) -> tuple[list[NewItem], list[NewItem]]:
    """n generated images and their captions, in the target style (ids never indexed)."""
    scenes = world.scenes(n, seed=seed)
    images = [
        NewItem(f"new-{seed}-{i}", image=png(world.render(s, "target", 64, seed=i))) for i, s in enumerate(scenes)
    ]
    texts = [
        NewItem(f"new-{seed}-{i}#caption", text=world.caption(s, "target"), pair_id=f"new-{seed}-{i}")
        for i, s in enumerate(scenes)
    ]
    return images, texts


def bare_encoder_rate(encoder, items: list[NewItem]) -> float:
    """Items/s of the encoder alone on the same items, in the same batches (decode included)."""
    from xmodal.indexer.images import decode_image

    started = time.perf_counter()
    for start in range(0, len(items), BATCH):
        batch = items[start : start + BATCH]
        if batch[0].image is not None:
            encoder.encode_images([decode_image(bytes(i.image)) for i in batch if isinstance(i.image, bytes)])
        else:
            encoder.encode_texts([i.text for i in batch])
    return len(items) / (time.perf_counter() - started)


def upsert_rate(client: SearchClient, items: list[NewItem]) -> float:
    started = time.perf_counter()
    for start in range(0, len(items), BATCH):
        client.upsert_items(items[start : start + BATCH])
    return len(items) / (time.perf_counter() - started)


def search_latency(client: SearchClient, queries: list[str]) -> dict:
    times = []
    for query in queries:
        t0 = time.perf_counter()
        client.search(text=query, k=10)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def visible_and_delete(client: SearchClient, rounds: int = 50) -> dict:
    """Upsert one caption, then search for it at once; delete it and time the call."""
    visible, deletes, found = [], [], 0
    for i in range(rounds):
        text = f"a probe caption number {i} zx{i * 7919}"
        client.upsert_items([NewItem(f"probe-{i}", text=text)])
        t0 = time.perf_counter()
        hits = client.search(text=text, target="text", k=1).hits
        visible.append((time.perf_counter() - t0) * 1e3)
        found += bool(hits) and hits[0].item_id == f"probe-{i}"
        t0 = time.perf_counter()
        client.delete_items([f"probe-{i}"])
        deletes.append((time.perf_counter() - t0) * 1e3)
    return {
        "found_by_the_next_search": found / rounds,
        "ack_to_visible_p50_ms": float(np.median(visible)),
        "delete_p50_ms": float(np.median(deletes)),
        "delete_p99_ms": float(np.percentile(deletes, 99)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=20000, help="indexed pairs before the upserts")
    parser.add_argument("--upserts", type=int, default=2000, help="image-caption pairs upserted (in deltas)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--out", default=None, help="folder for live.json")
    args = parser.parse_args(argv)
    encoder = load_encoder(DEMO_MODEL, None)
    queries = [world.caption(s, "target") for s in world.scenes(args.queries, seed=77)]
    report: dict = {"base_pairs": args.base, "upserted_pairs": args.upserts}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = world.write_corpus(Path(tmp) / "corpus", n=args.base, seed=3, style="target", image_size=64)
        index_corpus(corpus, Path(tmp) / "data", encoder, head=FitConfig(kind="identity"), progress=False)
        engine = SearchEngine(Path(tmp) / "data", encoder, limits=Limits())
        engine.load_current()
        server = Server(engine, port=0).start()
        try:
            with SearchClient(server.address, timeout=120) as client:
                report.update(measure(client, engine, encoder, queries, args.upserts, args.base))
        finally:
            server.stop(grace=1)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "live.json").write_text(json.dumps(report, indent=2))
    return 0


def measure(client: SearchClient, engine: SearchEngine, encoder, queries: list[str], n: int, base_pairs: int) -> dict:
    images, texts = new_items(n, seed=11)
    out: dict = {"search_no_delta": search_latency(client, queries)}
    out["bare_encoder_images_per_s"] = bare_encoder_rate(encoder, images)
    out["upsert_images_per_s"] = upsert_rate(client, images)
    out["bare_encoder_texts_per_s"] = bare_encoder_rate(encoder, texts)
    out["upsert_texts_per_s"] = upsert_rate(client, texts)
    out["ratio_images"] = out["upsert_images_per_s"] / out["bare_encoder_images_per_s"]
    out["ratio_texts"] = out["upsert_texts_per_s"] / out["bare_encoder_texts_per_s"]
    out["search_with_delta"] = search_latency(client, queries)
    out.update(visible_and_delete(client))
    base_images = [f"target-3-{i:06d}" for i in range(base_pairs)]
    deleted = 0
    for share in (0.01, 0.10):
        doomed = base_images[deleted : int(share * base_pairs)]
        for start in range(0, len(doomed), 256):
            client.delete_items(doomed[start : start + 256])
        deleted += len(doomed)
        out[f"search_with_delta_and_{share:.0%}_tombstones"] = search_latency(client, queries)
    started = time.perf_counter()  # the same corpus in one snapshot, same (zero-shot) head
    fit_snapshot(engine.data.root, FitConfig(kind="identity"), progress=False, feedback=False)
    engine.load_current()
    out["snapshot_write_seconds"] = time.perf_counter() - started
    out["search_same_corpus_in_one_snapshot"] = search_latency(client, queries)
    base = out["search_same_corpus_in_one_snapshot"]["p50_ms"]
    out["p50_ratio_10%_tombstones_vs_snapshot"] = out["search_with_delta_and_10%_tombstones"]["p50_ms"] / base
    return out


if __name__ == "__main__":
    sys.exit(main())
