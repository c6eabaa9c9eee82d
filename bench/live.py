"""The live corpus on a running server (issue 8): upsert throughput against the bare encoder,
acknowledgement-to-visible time, delete latency, search latency with items in deltas and
tombstones against the compacted snapshot, compaction time, and searches from many clients
through several compactions.

``--base`` generated image-caption pairs are indexed (xmodal-demo, zero-shot head), a server
is started in this process on 127.0.0.1, and everything else goes through the Python client
over gRPC, as a frontend's calls would. In order:

1. search (text query, k=10, one client) on the snapshot as indexed;
2. upsert throughput: ``--upserts`` new image-caption pairs per batch size in ``--batches``
   (images, then their captions), each call timed beside the bare encoder on the same items
   (decode included), alternating which goes first, the batch sizes taking turns over
   ``--rounds`` rounds;
3. acknowledgement to visible (an upserted caption found by the next search) and delete
   latency; then the items of step 2 are deleted and a compaction erases them: the base
   items alone again, nothing in deltas;
4. search with ``--deltas`` shares of the base items' count in deltas (text items upserted to
   reach each count: 1,000 and 10,000 at 100,000 base items), then also with
   ``--tombstones`` shares of the base items deleted (images and their captions);
5. one compaction (``client.compact()``: folds the deltas, erases the deleted items), then
   search on the compacted snapshot, and each p50 above against its p50;
6. ``--clients`` threads searching without pause while ``--compactions`` rounds each upsert
   and delete some items, then compact: errors, searches, compaction times, latencies.

    python bench/live.py [--base 50000] [--upserts 4000] [--queries 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from xmodal.client import NewItem, SearchClient
from xmodal.indexer import world
from xmodal.indexer.encoder import DEMO_MODEL, load_encoder
from xmodal.indexer.images import decode_image
from xmodal.indexer.pipeline import index_corpus
from xmodal.indexer.train import FitConfig
from xmodal.server.engine import SearchEngine
from xmodal.server.limits import Limits
from xmodal.server.service import Server

GOAL_UPSERT_RATIO = 0.8  # upsert items/s over the bare encoder's, at least
GOAL_SEARCH_RATIO = 1.2  # search p50 with deltas or tombstones over the compacted snapshot's, at most
MAX_CALL = Limits().max_upsert_items  # items per UpsertItems call, ids per DeleteItems call
WARM_UP = 10  # queries before each latency measurement, not counted


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


def batches(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def percentiles(times_ms: list[float]) -> dict:
    if not times_ms:
        return {"n": 0}
    return {
        "n": len(times_ms),
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p99_ms": float(np.percentile(times_ms, 99)),
    }


# -- throughput ----------------------------------------------------------------------------
def bare_encode(encoder, batch: list[NewItem]) -> None:
    """The encoder alone on one batch, decode included."""
    if batch[0].image is not None:
        encoder.encode_images([decode_image(bytes(i.image)) for i in batch if isinstance(i.image, bytes)])
    else:
        encoder.encode_texts([i.text for i in batch])


def upsert_vs_bare(client: SearchClient, encoder, items: list[NewItem], size: int) -> list[tuple[float, float]]:
    """(bare encoder s, UpsertItems s) of each call of ``size`` items, on the same batches,
    alternating which goes first (the machine's speed drifts; this keeps the two side by side)."""
    calls = []
    for n, batch in enumerate(batches(items, size)):
        spent = {}
        for step in ("bare", "upsert") if n % 2 == 0 else ("upsert", "bare"):
            t0 = time.perf_counter()
            if step == "bare":
                bare_encode(encoder, batch)
            else:
                client.upsert_items(batch)
            spent[step] = time.perf_counter() - t0
        calls.append((spent["bare"], spent["upsert"]))
    return calls


def throughput(client: SearchClient, encoder, n: int, sizes: list[int], rounds: int, upserted: list[str]) -> dict:
    """``n`` new image-caption pairs per batch size, in ``rounds`` rounds that take the batch
    sizes in turn (images, then their captions); the ratio is bare encoder s / upsert s.
    The ids upserted are added to ``upserted``."""
    calls: dict = {(size, kind): [] for size in sizes for kind in ("images", "texts")}
    for warm_up in new_items(min(n, 2 * max(sizes)), seed=999):  # first calls of the server's threads
        upsert_vs_bare(client, encoder, warm_up, max(sizes))
        upserted += [i.item_id for i in warm_up]
    for r in range(rounds):
        for k, size in enumerate(sizes if r % 2 == 0 else sizes[::-1]):
            images, texts = new_items(n // rounds, seed=1000 + 10 * r + k)
            upserted += [i.item_id for i in images + texts]
            calls[size, "images"] += upsert_vs_bare(client, encoder, images, size)
            calls[size, "texts"] += upsert_vs_bare(client, encoder, texts, size)
    out: dict = {f"batch_{size}": {} for size in sizes}
    for (size, kind), spent in calls.items():
        items = n // rounds * rounds
        bare_s, upsert_s = sum(b for b, _ in spent), sum(u for _, u in spent)
        out[f"batch_{size}"][kind] = {
            "items": items,
            "calls": len(spent),
            "upsert_items_per_s": items / upsert_s,
            "bare_encoder_items_per_s": items / bare_s,
            "ratio": bare_s / upsert_s,
            "ratio_median_of_calls": float(np.median([b / u for b, u in spent])),
        }
    return out


# -- latencies ------------------------------------------------------------------------------
def search_latency(client: SearchClient, queries: list[str]) -> dict:
    for query in queries[:WARM_UP]:
        client.search(text=query, k=10)
    times, encode, faiss_ms = [], [], []
    for query in queries:
        t0 = time.perf_counter()
        result = client.search(text=query, k=10)
        times.append((time.perf_counter() - t0) * 1e3)
        encode.append(result.timing["encode_ms"])
        faiss_ms.append(result.timing["search_ms"])
    return {
        **percentiles(times),
        "server_encode_p50_ms": float(np.median(encode)),
        "server_search_p50_ms": float(np.median(faiss_ms)),  # FAISS over snapshot and deltas, and merge
    }


def visible_and_delete(client: SearchClient, rounds: int = 100) -> dict:
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
        "rounds": rounds,
        "found_by_the_next_search": found / rounds,
        "ack_to_visible_p50_ms": float(np.median(visible)),
        "ack_to_visible_p99_ms": float(np.percentile(visible, 99)),
        "delete_one_p50_ms": float(np.median(deletes)),
        "delete_one_p99_ms": float(np.percentile(deletes, 99)),
    }


def in_deltas(engine: SearchEngine) -> int:
    return sum(len(d) for d in engine.view.state().deltas.values())


def fill_deltas(client: SearchClient, engine: SearchEngine, target: int, tag: str) -> int:
    """Upsert text items (no pairs) until ``target`` items are in deltas; returns the count."""
    missing = target - in_deltas(engine)
    captions = [world.caption(s, "target") for s in world.scenes(max(missing, 0), seed=1000 + target)]
    items = [NewItem(f"fill-{tag}-{i}", text=f"{c} #{i}") for i, c in enumerate(captions)]
    for batch in batches(items, MAX_CALL):
        client.upsert_items(batch)
    return in_deltas(engine)


def base_ids(base_pairs: int) -> list[str]:
    """The indexed items, image then caption, pair by pair."""
    ids = []
    for i in range(base_pairs):
        ids += [f"target-3-{i:06d}", f"target-3-{i:06d}#caption"]
    return ids


def delete_all(client: SearchClient, ids: list[str]) -> list[float]:
    """Delete ``ids`` in calls of the largest size; returns each call's ms."""
    times = []
    for batch in batches(ids, MAX_CALL):
        t0 = time.perf_counter()
        client.delete_items(batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# -- many clients through compactions --------------------------------------------------------
def through_compactions(
    address: str, client: SearchClient, queries: list[str], doomed: list[str], clients: int, rounds: int
) -> dict:
    """``clients`` threads search without pause (each its own SearchClient) while this thread
    runs ``rounds`` times: upsert image-caption pairs (as many items as it deletes, up to
    one call of each), delete base items (``doomed`` split over the rounds), compact."""
    stop = threading.Event()
    records: list[list[tuple[float, float, bool]]] = [[] for _ in range(clients)]  # (start, ms, ok)
    errors: list[str] = []

    def searcher(n: int) -> None:
        rng = np.random.default_rng(n)
        with SearchClient(address, timeout=60) as mine:
            while not stop.is_set():
                query = queries[int(rng.integers(len(queries)))]
                t0 = time.perf_counter()
                try:
                    ok = len(mine.search(text=query, k=10).hits) == 10
                except Exception as exc:  # noqa: BLE001 - counted, not raised
                    ok = False
                    errors.append(f"{type(exc).__name__}: {exc}")
                records[n].append((t0, (time.perf_counter() - t0) * 1e3, ok))

    threads = [threading.Thread(target=searcher, args=(n,), daemon=True) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    per_round = max(len(doomed) // rounds, 1)
    pairs = min(MAX_CALL, max(per_round // 2, 1))  # upserted per round, images then their captions
    compactions, windows = [], []
    try:
        time.sleep(1.0)
        for r in range(rounds):
            images, texts = new_items(pairs, seed=100 + r)
            client.upsert_items(images)
            client.upsert_items(texts)
            delete_all(client, doomed[r * per_round : (r + 1) * per_round])
            t0 = time.perf_counter()
            result = client.compact(timeout=3600)
            t1 = time.perf_counter()
            windows.append((t0, t1))
            compactions.append(
                {
                    "seconds": t1 - t0,
                    "server_seconds": result.seconds,
                    "folded_items": result.folded_items,
                    "erased_items": result.erased_items,
                    "rewritten_snapshots": result.rewritten_snapshots,
                }
            )
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    elapsed = time.perf_counter() - started
    flat = [rec for mine in records for rec in mine]
    during = [ms for t, ms, _ in flat if any(a <= t < b for a, b in windows)]
    between = [ms for t, ms, _ in flat if not any(a <= t < b for a, b in windows)]
    return {
        "clients": clients,
        "compactions": compactions,
        "seconds": elapsed,
        "searches": len(flat),
        "searches_per_s": len(flat) / elapsed,
        "errors": len(errors),
        "first_errors": errors[:5],
        "short_results": sum(1 for _, _, ok in flat if not ok) - len(errors),  # answered with fewer than k hits
        "search_during_compactions": percentiles(during),
        "search_between_compactions": percentiles(between),
    }


# -- the run ---------------------------------------------------------------------------------
def measure(client: SearchClient, engine: SearchEngine, encoder, queries: list[str], args: argparse.Namespace) -> dict:
    out: dict = {"search": {}, "phase_seconds": {}, "load_average_1min_after": []}
    search = out["search"]
    last = [time.perf_counter()]

    def lap(name: str) -> None:  # wall time of each step, to see where a run spends it
        now = time.perf_counter()
        out["phase_seconds"][name] = out["phase_seconds"].get(name, 0.0) + now - last[0]
        out["load_average_1min_after"].append([name, os.getloadavg()[0]])  # the machine is shared
        last[0] = now

    out["indexes"] = {"as_indexed": indexes(engine)}
    search["deltas_0"] = {"in_deltas": in_deltas(engine), **search_latency(client, queries)}
    lap("search")
    upserted: list[str] = []
    out["upsert"] = throughput(client, encoder, args.upserts, args.batches, args.rounds, upserted)
    lap("upsert_vs_bare")
    out["visible_and_delete"] = visible_and_delete(client)
    lap("visible_and_delete")
    delete_all(client, upserted)  # and a compaction: the base items alone again, nothing in deltas
    out["compaction_after_upserts"] = compact(client, engine)
    lap("compaction")
    ids = base_ids(args.base)
    for share in sorted(args.deltas):
        level = int(round(share * len(ids)))
        count = fill_deltas(client, engine, level, str(level))
        lap("fill_deltas")
        search[f"deltas_{level}"] = {"in_deltas": count, **search_latency(client, queries)}
        lap("search")

    deleted, delete_calls = 0, []
    for share in sorted(args.tombstones):
        doomed = ids[deleted : int(round(share * len(ids)))]
        delete_calls += delete_all(client, doomed)
        deleted += len(doomed)
        lap("delete_base")
        search[f"tombstones_{share:.0%}"] = {
            "in_deltas": in_deltas(engine),
            "hidden": len(engine.view.state().hidden),
            **search_latency(client, queries),
        }
        lap("search")
    out[f"delete_{MAX_CALL}_ids_per_call"] = percentiles(delete_calls)

    out["compaction"] = compact(client, engine)
    out["indexes"]["compacted"] = indexes(engine)
    lap("compaction")
    search["compacted"] = {"in_deltas": in_deltas(engine), **search_latency(client, queries)}
    lap("search")
    compacted = search["compacted"]["p50_ms"]
    out["p50_vs_compacted"] = {name: s["p50_ms"] / compacted for name, s in search.items() if name != "compacted"}

    rest = ids[deleted:]
    out["through_compactions"] = through_compactions(
        client.target, client, queries, rest[: len(ids) // 100 * args.compactions], args.clients, args.compactions
    )
    lap("through_compactions")
    out["goals"] = goals(out, args)
    return out


def compact(client: SearchClient, engine: SearchEngine) -> dict:
    t0 = time.perf_counter()
    result = client.compact(timeout=3600)
    return {
        "seconds": time.perf_counter() - t0,
        "server_seconds": result.seconds,
        "folded_items": result.folded_items,
        "erased_items": result.erased_items,
        "rewritten_snapshots": result.rewritten_snapshots,
        "items_after": sum(len(i) for i in engine.view.state().snapshot.indexes.values()),
    }


def indexes(engine: SearchEngine) -> dict:
    """The live snapshot's FAISS index per modality (search time depends on it)."""
    snapshot = engine.view.state().snapshot
    return {
        "factory": snapshot.manifest.faiss_factory,
        **{m: type(faiss.downcast_index(i.index)).__name__ for m, i in snapshot.indexes.items()},
    }


def goals(out: dict, args: argparse.Namespace) -> dict:
    upsert = out["upsert"][f"batch_{max(args.batches)}"]
    result = {
        f"upsert_{m}_ratio_at_least_{GOAL_UPSERT_RATIO}": {
            "value": upsert[m]["ratio"],
            "met": upsert[m]["ratio"] >= GOAL_UPSERT_RATIO,
        }
        for m in ("images", "texts")
    }
    for name, ratio in out["p50_vs_compacted"].items():
        if name != "deltas_0":  # the snapshot as indexed: a reference, not a goal
            result[f"search_p50_{name}_at_most_{GOAL_SEARCH_RATIO}x_compacted"] = {
                "value": ratio,
                "met": ratio <= GOAL_SEARCH_RATIO,
            }
    errors = out["through_compactions"]["errors"]
    result["errors_through_compactions_0"] = {"value": errors, "met": errors == 0}
    return result


def int_list(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


def float_list(value: str) -> list[float]:
    return [float(v) for v in value.split(",") if v]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=50000, help="indexed pairs (2 items each) before the upserts")
    parser.add_argument("--upserts", type=int, default=4000, help="image-caption pairs upserted per batch size")
    parser.add_argument("--rounds", type=int, default=4, help="rounds that take the batch sizes in turn")
    parser.add_argument("--batches", type=int_list, default=[64, 256], help="items per upsert call to measure")
    parser.add_argument("--deltas", type=float_list, default=[0.01, 0.10], help="items in deltas, shares of base items")
    parser.add_argument("--tombstones", type=float_list, default=[0.01, 0.10], help="shares of base items deleted")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16, help="search threads through the compactions")
    parser.add_argument("--compactions", type=int, default=5)
    parser.add_argument("--out", default=None, help="folder for live.json")
    args = parser.parse_args(argv)
    if max(args.batches) > MAX_CALL:
        parser.error(f"--batches: at most {MAX_CALL} items per call")
    started = time.perf_counter()
    encoder = load_encoder(DEMO_MODEL, None)
    queries = [world.caption(s, "target") for s in world.scenes(args.queries, seed=77)]
    report: dict = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "base_items": 2 * args.base,
        "load_average_at_start": os.getloadavg(),  # the machine is shared: other work skews the figures
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        corpus = world.write_corpus(Path(tmp) / "corpus", n=args.base, seed=3, style="target", image_size=64)
        index_corpus(corpus, Path(tmp) / "data", encoder, head=FitConfig(kind="identity"), progress=False)
        report["index_seconds"] = time.perf_counter() - t0
        engine = SearchEngine(Path(tmp) / "data", encoder, limits=Limits())
        engine.load_current()
        server = Server(engine, port=0).start()
        try:
            with SearchClient(server.address, timeout=120) as client:
                report.update(measure(client, engine, encoder, queries, args))
        finally:
            server.stop(grace=1)
    report["wall_seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "live.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
