"""Filtered search and index choice at scale (issue 9).

512-d vectors drawn from a clustered mixture (``--centres`` Gaussian centres, each cluster
spread over its own low-dimensional subspace plus isotropic noise, cluster sizes log-normal,
everything L2-normalised) are written straight into the base store of a fresh data
directory (fp16 shards and catalog rows, one transaction), with two metadata fields:

- ``bucket``: ``i % 10000`` (the order of the items is random), so that a range
  ``0 <= bucket <= t`` selects exactly 50 %, 10 %, 1 %, 0.1 % or 0.01 % of the items,
  independently of where they lie;
- ``topic``: the item's cluster, numbered in random order; a range over it selects whole
  clusters (10 % of the items, most of them far from a given query): the hard case for a
  graph walked with a filter.

Each index (``--indexes``: ``Flat``, ``auto``, ``auto:budget=<size>``, ``auto:huge``, or a
FAISS factory string) is built by ``write_snapshot`` (identity head) in a worker process
and served by a :class:`SearchEngine` in another, which times ``QueryPath._top_k`` (the
FAISS stage, with the filters and the exact/IDSelector switch, as a server runs it) for
single queries: ``--queries`` held-out points of the same mixture. Recall@10 is taken
against exact search (numpy) over the items that match. Per index: build time (the whole
``write_snapshot``, with its tuning), bytes per vector (the index file / n), load time
(``load_snapshot``, warm page cache), the first filtered search (it builds the metadata
columns), the serving process's RSS, p50/p99 and recall@10 unfiltered and at each
selectivity, with one FAISS thread per search (the server's default) and with FAISS's
default threads (one per core), for every index alike. ``auto:huge`` is auto's choice from ``ann.HUGE``
items on (OPQ-IVF-PQ with an SQ8 refine step), built at ``--n``: the measured compressed
index that the 10M projection starts from.

``--switch`` times both paths of a filtered search (exact search over the matching rows,
and the index's own search with an IDSelector) at a ladder of matching fractions, to place
``EXACT_FILTER_ROWS``. ``--peers`` runs Chroma and LanceDB (the ``bench`` extra) on the
first ``--peer-n`` of the same vectors, with the same queries and filters (10 %, 1 %,
0.1 %), beside xmodal's ``auto`` and ``Flat`` on the same items.

    python bench/scale.py                                  # 1M items: Flat, auto (IVF-Flat), auto under 1G (IVF-SQ8)
    python bench/scale.py --indexes HNSW32,Flat            # the graph, efConstruction 128 (~40 min to build)
    python bench/scale.py --n 20000 --queries 50 --switch  # a quick check
    python bench/scale.py --no-main --peers                # the peers at 200,000 items

Writes ``<out>/scale.json`` (``peers.json`` with ``--no-main``) after each index, so that a
long run leaves what it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

K = 10
BUCKETS = 10_000
SELECTIVITIES = (0.5, 0.1, 0.01, 0.001, 0.0001)
PEER_SELECTIVITIES = (0.1, 0.01, 0.001)
TOPIC_FRACTION = 0.1
SWITCH_FRACTIONS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
CHUNK = 10_000  # items drawn per seed: the first m items are the same for any n >= m
TEXT_ITEMS = 1_000  # the other modality: half of the queries auto tunes an index with
ENCODER_ID = "bench-scale:gaussian-mixture"
WARM_UP = 5
CHROMA_EF_SEARCH = 400
DEFAULT_INDEXES = ("Flat", "auto", "auto:budget=1G")  # HNSW32,Flat (efConstruction 128) takes ~40 min more at 1M
# FAISS threads per search: "1" is what `xmodal serve` does by default (ServeConfig.search_threads), "all"
# FAISS's own default (one OpenMP thread per core), both for every index, so that ratios compare like with like
THREAD_SETTINGS = ("1", "all")
GOAL_SPEEDUP, GOAL_RECALL = 50.0, 0.98  # auto vs Flat at p50, unfiltered
GOAL_FILTER_RECALL, GOAL_FILTER_P99_MS = 0.95, 20.0  # at every selectivity


# -- the vectors ------------------------------------------------------------------------------


@dataclass
class Mixture:
    """Gaussian clusters: a unit centre, a spread of norm ``local`` over the cluster's own
    ``local_dims``-d subspace and isotropic noise of norm ``noise``; then normalised."""

    dim: int
    centres: int
    local_dims: int = 16
    local: float = 0.7
    noise: float = 0.25
    seed: int = 0
    means: np.ndarray = field(init=False, repr=False)
    bases: np.ndarray = field(init=False, repr=False)
    weights: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        means = rng.standard_normal((self.centres, self.dim)).astype(np.float32)
        self.means = means / np.linalg.norm(means, axis=1, keepdims=True)
        self.bases = (rng.standard_normal((self.centres, self.local_dims, self.dim)) / math.sqrt(self.dim)).astype(
            np.float32
        )
        weights = rng.lognormal(0.0, 0.5, self.centres)
        self.weights = weights / weights.sum()

    def draw(self, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(count x dim normalised float32 vectors, their cluster labels)."""
        rng = np.random.default_rng([self.seed, seed])
        labels = rng.choice(self.centres, size=count, p=self.weights)
        out = self.means[labels].copy()
        local = rng.standard_normal((count, self.local_dims)).astype(np.float32) * (
            self.local / math.sqrt(self.local_dims)
        )
        order = np.argsort(labels, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
            out[group] += local[group] @ self.bases[labels[group[0]]]
        out += rng.standard_normal((count, self.dim)).astype(np.float32) * (self.noise / math.sqrt(self.dim))
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out, labels

    def items(self, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """n items (fp16, as the base store keeps them) and their labels, drawn CHUNK at a time."""
        vectors = np.empty((n, self.dim), np.float16)
        labels = np.empty(n, np.int64)
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            x, lab = self.draw(CHUNK, seed * 1_000_003 + start // CHUNK)
            vectors[start:stop], labels[start:stop] = x[: stop - start], lab[: stop - start]
        return vectors, labels


def normalised(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of unit norm (what the identity head makes of base vectors)."""
    x = np.asarray(vectors, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# -- the data directory -----------------------------------------------------------------------


def write_data(root: Path, vectors: np.ndarray, topics: np.ndarray, texts: np.ndarray) -> None:
    """Base shards and catalog rows for ``vectors`` (image items ``img-<i>``, metadata
    bucket and topic) and ``texts`` (text items), in one catalog transaction."""
    from xmodal.indexer.catalog import Catalog, next_seq
    from xmodal.indexer.corpus import IMAGE, TEXT
    from xmodal.indexer.store import BaseStore

    catalog = Catalog(root / "catalog.sqlite")
    store = BaseStore(root / "base", catalog)
    now = time.time()
    rows: list[tuple] = []
    with store.lock():
        for start in range(0, len(vectors), 100_000):
            part = vectors[start : start + 100_000]
            shard = store.write_shard(IMAGE, part)
            for row in range(len(part)):
                i = start + row
                meta = json.dumps({"bucket": i % BUCKETS, "topic": int(topics[i])}, sort_keys=True)
                rows.append((f"img-{i:07d}", IMAGE, "", f"/synthetic/{i}.png", meta, f"h{i}", shard, row, now))
        shard = store.write_shard(TEXT, texts)
        rows += [(f"txt-{i:07d}", TEXT, f"text {i}", "", "{}", f"t{i}", shard, i, now) for i in range(len(texts))]
        with catalog.tx() as db:
            seq = next_seq(db)
            db.executemany(
                "INSERT INTO items (id, modality, text, source, metadata, content_hash, shard, row, added_at, seq) "
                f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {seq})",
                rows,
            )
    catalog.close()


# -- the filters ------------------------------------------------------------------------------


@dataclass
class Case:
    """One measured search: conditions (field, min, max), the rows they match, and the
    exact/IDSelector switch to use (None: the server's default)."""

    name: str
    conditions: list[tuple[str, float, float]]
    mask: np.ndarray | None
    exact_filter_rows: int | None = None
    queries: int | None = None  # the first this many queries (None: all)

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "conditions": self.conditions,
            "exact_filter_rows": self.exact_filter_rows,
            "queries": self.queries,
        }


def pct(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def bucket_case(name: str, n: int, fraction: float, **kw: Any) -> Case:
    top = round(fraction * BUCKETS) - 1
    return Case(name, [("bucket", 0.0, float(top))], (np.arange(n) % BUCKETS) <= top, **kw)


def topic_case(topics: np.ndarray, fraction: float) -> Case:
    """Whole clusters, taken in their (random) numbering until ``fraction`` of the items."""
    counts = np.bincount(topics)
    top = int(np.searchsorted(np.cumsum(counts), fraction * len(topics)))
    mask = topics <= top
    return Case(f"topic {pct(mask.mean())} (whole clusters)", [("topic", 0.0, float(top))], mask)


def main_cases(n: int, topics: np.ndarray, switch: bool, switch_queries: int) -> list[Case]:
    cases = [Case("unfiltered", [], None)]
    cases += [bucket_case(f"bucket {pct(f)}", n, f) for f in SELECTIVITIES]
    cases.append(topic_case(topics, TOPIC_FRACTION))
    if switch:
        for f in SWITCH_FRACTIONS:
            for path, rows in (("exact", n + 1), ("selector", 0)):
                cases.append(bucket_case(f"switch {f:g} {path}", n, f, exact_filter_rows=rows, queries=switch_queries))
    return cases


def ground_truth(vectors: np.ndarray, queries: np.ndarray, cases: list[Case], k: int = K) -> dict[str, list[list[int]]]:
    """Per case and query, the rows of the exact top-k among the rows that match (numpy
    over fp16 vectors normalised as the identity head does), in one pass over the vectors."""
    nq = len(queries)
    best = {c.name: (np.full((k, nq), -np.inf, np.float32), np.full((k, nq), -1, np.int64)) for c in cases}
    for start in range(0, len(vectors), 65_536):
        scores = normalised(vectors[start : start + 65_536]) @ queries.T  # rows x queries
        for case in cases:
            rows = np.arange(start, start + len(scores))
            part = scores
            if case.mask is not None:
                keep = case.mask[start : start + len(scores)]
                rows, part = rows[keep], scores[keep]
            if not len(rows):
                continue
            old_s, old_r = best[case.name]
            all_s = np.concatenate([old_s, part])
            all_r = np.concatenate([old_r, np.broadcast_to(rows[:, None], part.shape)])
            top = np.argpartition(-all_s, k - 1, axis=0)[:k]
            best[case.name] = (np.take_along_axis(all_s, top, 0), np.take_along_axis(all_r, top, 0))
    return {name: [[int(r) for r in col if r >= 0] for col in rows.T] for name, (_, rows) in best.items()}


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    """Mean over queries of |found & truth| / |truth| (queries with an empty truth skipped)."""
    values = [len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=False) if t]
    return float(np.mean(values)) if values else 1.0


def summarise(
    ms: list[float], found: list[list[int]], truth: list[list[int]], cpu_ms: list[float] | None = None
) -> dict[str, float]:
    """p50/p99 of the wall time (and of the search thread's CPU time, which leaves out the
    time other processes held the core: on a shared machine, bursts of their work show as
    wall-time tails only), and recall@10."""
    out = {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "recall_at_10": recall(found, truth),
        "queries": len(ms),
    }
    if cpu_ms:
        out.update(cpu_p50_ms=float(np.percentile(cpu_ms, 50)), cpu_p99_ms=float(np.percentile(cpu_ms, 99)))
    return out


# -- workers (one process each: build time, peak memory and server RSS of their own) ----------


def memory() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss" if key == "VmRSS" else "peak_rss"] = int(value.split()[0]) * 1024
    return out


def run_worker(kind: str, spec: dict[str, Any], folder: Path, tag: str = "") -> dict[str, Any]:
    """Run ``kind``'s worker in a new process on ``spec``; its result (``tag`` names its
    files when a kind runs more than once)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{kind}-{tag}" if tag else kind
    spec_path, result_path = folder / f"{name}.spec.json", folder / f"{name}.result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    result_path.unlink(missing_ok=True)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(spec_path)], check=True)
    return json.loads(result_path.read_text())


class StandInEncoder:
    """What a SearchEngine asks of an encoder when every query is a vector: its identity
    and dimension (no model: the 512-d mixture is the base space)."""

    def __init__(self, identity: str, dim: int):
        self.identity = identity
        self.dim = dim


def build_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from xmodal.indexer import ann
    from xmodal.indexer.catalog import Catalog
    from xmodal.indexer.heads import Head
    from xmodal.indexer.snapshot import DataDir, write_snapshot
    from xmodal.indexer.store import BaseStore

    data = DataDir(spec["data"])
    catalog = Catalog(data.catalog_path)
    store = BaseStore(data.base, catalog)
    factory, budget = spec["index"], None
    if factory.startswith("auto:"):
        factory, _, option = factory.partition(":")
        if option == "huge":  # what auto picks from ann.HUGE items on, at this n
            ann.HUGE = min(ann.HUGE, int(spec["n"]))
        elif option.startswith("budget="):
            budget = ann.parse_bytes(option[len("budget=") :])
        else:
            raise SystemExit(f"unknown auto option {option!r}: use auto:huge or auto:budget=SIZE")
    started = time.perf_counter()
    manifest = write_snapshot(
        data, catalog, store, Head("identity", spec["dim"]), encoder=ENCODER_ID, factory=factory,
        memory_budget=budget, make_current=False,
    )  # fmt: skip
    build_s = time.perf_counter() - started
    folder = data.snapshots / manifest.id
    choice = manifest.index.get("image", {})
    return {
        "snapshot": manifest.id,
        "build_s": build_s,
        "factory": choice.get("factory", manifest.faiss_factory),
        "reason": choice.get("reason", ""),
        "params": choice.get("params", {}),
        "index_bytes": (folder / "image.faiss").stat().st_size,
        "ids_bytes": (folder / "image.ids.npy").stat().st_size,
        "build_peak_rss": memory()["peak_rss"],
    }


def serve_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from xmodal.indexer.corpus import IMAGE
    from xmodal.indexer.encoder import Encoder
    from xmodal.server.engine import SearchEngine
    from xmodal.server.filters import Condition

    before = memory()["rss"]
    threads = 0 if spec.get("threads", "1") == "all" else int(spec.get("threads", "1"))
    engine = SearchEngine(spec["data"], cast(Encoder, StandInEncoder(ENCODER_ID, spec["dim"])), search_threads=threads)
    started = time.perf_counter()
    engine.load_snapshot(spec["snapshot"])
    load_s = time.perf_counter() - started
    loaded = memory()["rss"]
    state, path = engine.view.state(), engine.queries
    default_rows = path.exact_filter_rows
    queries = np.load(spec["queries"])

    def conditions(case: dict[str, Any]) -> tuple[Condition, ...]:
        return tuple(Condition(f, min=lo, max=hi) for f, lo, hi in case["conditions"])

    started = time.perf_counter()  # the first filtered search builds the metadata columns
    path._top_k(state, IMAGE, queries[:1], K, (Condition("bucket", min=0.0, max=0.0),))
    columns_s = time.perf_counter() - started
    cases = {}
    for case in spec["cases"]:
        conds = conditions(case)
        path.exact_filter_rows = default_rows if case["exact_filter_rows"] is None else case["exact_filter_rows"]
        chosen = queries[: case["queries"]] if case["queries"] else queries
        for q in chosen[:WARM_UP]:
            path._top_k(state, IMAGE, q.reshape(1, -1), K, conds)
        ms, cpu_ms, found = [], [], []
        for q in chosen:
            c0, t0 = time.thread_time(), time.perf_counter()
            hits = path._top_k(state, IMAGE, q.reshape(1, -1), K, conds)
            ms.append((time.perf_counter() - t0) * 1e3)
            cpu_ms.append((time.thread_time() - c0) * 1e3)  # this thread's CPU: not the time others took the core
            found.append([int(str(item)[4:]) for item, _ in hits])
        cases[case["name"]] = {"ms": ms, "cpu_ms": cpu_ms, "found": found}
    after = memory()
    engine.close()
    return {
        "load_s": load_s,
        "columns_s": columns_s,
        "rss_before_load": before,
        "rss_loaded": loaded,
        "rss": after["rss"],
        "peak_rss": after["peak_rss"],
        "exact_filter_rows": default_rows,
        "cases": cases,
    }


def chroma_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Chroma (local, persistent): HNSW on inner product, M=32, ef_construction 200 (its
    documented knobs for recall), ef_search 400, set when the collection is made (a
    ``modify`` of it did not change the searches of the process that made it);
    filters as ``where`` (Chroma resolves the metadata filter first and walks the graph
    over the allowed ids)."""
    import chromadb
    from chromadb.config import Settings

    vectors, buckets, queries = (np.load(spec[name]) for name in ("vectors", "buckets", "queries"))
    client = chromadb.PersistentClient(path=spec["dir"], settings=Settings(anonymized_telemetry=False))
    config = {"hnsw": {"space": "ip", "ef_construction": 200, "max_neighbors": 32, "ef_search": CHROMA_EF_SEARCH}}
    collection = client.create_collection("bench", configuration=cast(Any, config), embedding_function=None)
    batch = client.get_max_batch_size()
    started = time.perf_counter()
    for start in range(0, len(vectors), batch):
        stop = min(len(vectors), start + batch)
        collection.add(
            ids=[str(i) for i in range(start, stop)],
            embeddings=vectors[start:stop],
            metadatas=[{"bucket": int(b)} for b in buckets[start:stop]],
        )
    collection.query(query_embeddings=queries[:1], n_results=K)  # anything still queued is indexed
    build_s = time.perf_counter() - started

    def run(where: dict | None) -> tuple[list[float], list[list[int]]]:
        ms, found = [], []
        for q in queries[:WARM_UP]:
            collection.query(query_embeddings=q.reshape(1, -1), n_results=K, where=where, include=[])
        for q in queries:
            t0 = time.perf_counter()
            got = collection.query(query_embeddings=q.reshape(1, -1), n_results=K, where=where, include=[])
            ms.append((time.perf_counter() - t0) * 1e3)
            found.append([int(i) for i in got["ids"][0]])
        return ms, found

    ms, found = run(None)
    cases = {"unfiltered": dict(zip(("ms", "found"), (ms, found), strict=True))}
    for case in spec["cases"]:
        (_, _, top), = case["conditions"]  # fmt: skip
        ms, found = run({"bucket": {"$lte": int(top)}})
        cases[case["name"]] = {"ms": ms, "found": found}
    return {
        "build_s": build_s,
        "settings": config["hnsw"],
        "disk_bytes": _folder_bytes(Path(spec["dir"])),
        **memory(),
        "cases": cases,
        "version": chromadb.__version__,
    }


def lance_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """LanceDB (embedded): IVF_PQ on dot product (num_sub_vectors dim/8), a BTREE scalar
    index on the filtered column, prefilter; nprobes and refine_factor tuned up to
    recall@10 >= 0.98 unfiltered; and, as its docs advise for very selective filters,
    ``bypass_vector_index`` (exact search over the rows that match)."""
    import lancedb
    import pyarrow as pa

    vectors, buckets, queries = (np.load(spec[name]) for name in ("vectors", "buckets", "queries"))
    truth = spec["truth"]
    n, dim = vectors.shape
    db = lancedb.connect(spec["dir"])
    table = pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "bucket": pa.array(buckets.astype(np.int32)),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        }
    )
    started = time.perf_counter()
    tbl = db.create_table("items", table)
    tbl.create_index(metric="dot", index_type="IVF_PQ", num_sub_vectors=dim // 8)
    tbl.create_scalar_index("bucket", index_type="BTREE")
    build_s = time.perf_counter() - started

    def run(where: str | None, nprobes: int, refine: int | None, bypass: bool = False) -> tuple[list, list]:
        def one(q: np.ndarray) -> list[int]:
            query: Any = tbl.search(q)
            query = query.distance_type("dot").limit(K).select(["id", "_distance"])
            if where:
                query = query.where(where, prefilter=True)
            if bypass:
                query = query.bypass_vector_index()
            else:
                query = query.nprobes(nprobes)
                if refine:
                    query = query.refine_factor(refine)
            return query.to_arrow()["id"].to_pylist()

        for q in queries[:WARM_UP]:
            one(q)
        ms, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            found.append(one(q))
            ms.append((time.perf_counter() - t0) * 1e3)
        return ms, found

    tuning: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for nprobes in (10, 20, 40, 80, 160):
        for refine in (None, 10, 30):
            ms, found = run(None, nprobes, refine)
            row: dict[str, Any] = {"nprobes": nprobes, "refine_factor": refine, "run": (ms, found)}
            row.update(recall_at_10=recall(found, truth["unfiltered"]), p50_ms=float(np.percentile(ms, 50)))
            tuning.append(row)
            if row["recall_at_10"] >= GOAL_RECALL and (best is None or row["p50_ms"] < best["p50_ms"]):
                best = row
        if best is not None:
            break
    if best is None:  # the best recall seen
        best = max(tuning, key=lambda t: t["recall_at_10"])
    nprobes, refine, (ms, found) = best["nprobes"], best["refine_factor"], best["run"]
    for row in tuning:
        del row["run"]
    cases = {"unfiltered": {"ms": ms, "found": found}}
    for case in spec["cases"]:
        (_, _, top_bucket), = case["conditions"]  # fmt: skip
        where = f"bucket <= {int(top_bucket)}"
        ms, found = run(where, nprobes, refine)
        cases[case["name"]] = {"ms": ms, "found": found}
        ms, found = run(where, nprobes, refine, bypass=True)
        cases[case["name"] + " (bypass_vector_index)"] = {"ms": ms, "found": found}
    return {
        "build_s": build_s,
        "settings": {
            "index_type": "IVF_PQ",
            "metric": "dot",
            "num_sub_vectors": dim // 8,
            "nprobes": nprobes,
            "refine_factor": refine,
            "prefilter": True,
            "scalar_index": "BTREE(bucket)",
        },  # fmt: skip
        "tuning": tuning,
        "disk_bytes": _folder_bytes(Path(spec["dir"])),
        **memory(),
        "cases": cases,
        "version": lancedb.__version__,
    }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


WORKERS = {"build": build_worker, "serve": serve_worker, "chroma": chroma_worker, "lance": lance_worker}


# -- the runs ---------------------------------------------------------------------------------


def evaluate_index(
    name: str,
    data: Path,
    n: int,
    dim: int,
    cases: list[Case],
    truth: dict,
    queries_path: Path,
    work: Path,
    threads: tuple[str, ...] = THREAD_SETTINGS,
) -> dict[str, Any]:
    """Build one index (worker), serve it (a worker per thread setting), score every case."""
    folder = work / "workers" / name.replace("/", "_").replace(",", "_").replace(":", "_").replace("=", "_")
    print(f"\n== {name}: building ({n:,} items) ...", flush=True)
    built = run_worker("build", {"data": str(data), "index": name, "n": n, "dim": dim}, folder)
    print(f"   {built['factory']} in {built['build_s']:.1f} s; {built['reason']}; params {built['params']}", flush=True)
    if built["factory"] == "Flat":  # the switch matters for ANN indexes; Flat scans either way
        cases = [c for c in cases if not c.name.startswith("switch")]
    spec = {
        "data": str(data),
        "snapshot": built["snapshot"],
        "dim": dim,
        "queries": str(queries_path),
        "cases": [c.spec() for c in cases],
    }
    runs = {}
    for setting in threads:
        served = run_worker("serve", {**spec, "threads": setting}, folder, f"t{setting}")
        scored = {
            c.name: summarise(
                served["cases"][c.name]["ms"],
                served["cases"][c.name]["found"],
                truth[c.name],
                served["cases"][c.name].get("cpu_ms"),
            )
            for c in cases
        }
        for case in cases:
            scored[case.name]["matching"] = n if case.mask is None else int(case.mask.sum())
        runs[setting] = {**{key: value for key, value in served.items() if key != "cases"}, "cases": scored}
    served, results = runs[threads[0]], runs[threads[0]]["cases"]
    return {
        "index": name,
        **{key: built[key] for key in ("factory", "reason", "params", "build_s", "index_bytes", "ids_bytes")},
        "bytes_per_vector": built["index_bytes"] / n,
        "build_peak_rss": built["build_peak_rss"],
        **{key: served[key] for key in ("load_s", "columns_s", "rss_before_load", "rss_loaded", "rss", "peak_rss")},
        "exact_filter_rows": served["exact_filter_rows"],
        "cases": results,
        "threads": {setting: run["cases"] for setting, run in runs.items()},
    }


def judge(flat: dict[str, Any], auto: dict[str, Any], shown: list[str]) -> dict[str, Any]:
    """The issue's goals for one thread setting (cases by name, of Flat and of auto)."""
    speedup = flat["unfiltered"]["p50_ms"] / auto["unfiltered"]["p50_ms"]
    filtered = [auto[c] for c in shown if c != "unfiltered"]
    goals: dict[str, Any] = {
        "auto_vs_flat_p50_speedup": speedup,
        "speedup_met": speedup >= GOAL_SPEEDUP,
        "auto_recall": auto["unfiltered"]["recall_at_10"],
        "recall_met": auto["unfiltered"]["recall_at_10"] >= GOAL_RECALL,
        "filtered_min_recall": min(c["recall_at_10"] for c in filtered),
        "filtered_max_p99_ms": max(c["p99_ms"] for c in filtered),
    }
    goals["filtered_met"] = (
        goals["filtered_min_recall"] >= GOAL_FILTER_RECALL and goals["filtered_max_p99_ms"] <= GOAL_FILTER_P99_MS
    )
    return goals


def gib(size: float) -> str:
    return f"{size / (1 << 30):.2f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.0f} MiB"


def index_table(rows: list[dict[str, Any]], case_names: list[str]) -> str:
    """Markdown: one line per index and case; p50/p99 with one FAISS thread per search (the
    server's default) and, where measured, with FAISS's default threads (one per core)."""
    lines = [
        "| index | build (peak RSS) | bytes/vector | load | columns | server RSS | search | p50 | p99 | recall@10 "
        "| p50 / p99, all threads |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for i, name in enumerate(case_names):
            c = row["cases"][name]
            every = row.get("threads", {}).get("all", {}).get(name)
            wide = f"{every['p50_ms']:.2f} / {every['p99_ms']:.2f} ms" if every else "-"
            head = (
                f"| {row['index']} = `{row['factory']}` | {row['build_s']:.0f} s ({gib(row['build_peak_rss'])}) | "
                f"{row['bytes_per_vector']:.0f} | {row['load_s']:.2f} s | {row['columns_s']:.1f} s | {gib(row['rss'])} "
                if i == 0
                else "| | | | | | "
            )
            lines.append(
                f"{head}| {name} | {c['p50_ms']:.2f} ms | {c['p99_ms']:.2f} ms | {c['recall_at_10']:.3f} | {wide} |"
            )
    return "\n".join(lines)


def switch_table(rows: list[dict[str, Any]], n: int) -> tuple[str, dict[str, Any]]:
    """Markdown of the exact vs IDSelector ladder per index and thread setting, and the
    crossover of each (matching rows where the IDSelector path becomes faster at p50)."""
    lines = [
        "| index | threads | matching rows | exact p50 / p99 | IDSelector p50 / p99 | IDSelector recall@10 |",
        "|---|---|---|---|---|---|",
    ]
    crossings: dict[str, Any] = {}
    for row in rows:
        for setting, cases in row.get("threads", {"1": row["cases"]}).items():
            ladder = []
            for f in SWITCH_FRACTIONS:
                exact, sel = cases.get(f"switch {f:g} exact"), cases.get(f"switch {f:g} selector")
                if exact is None or sel is None:
                    continue
                ladder.append((round(f * n), exact, sel))
                lines.append(
                    f"| {row['index']} | {setting} | {round(f * n):,} | "
                    f"{exact['p50_ms']:.2f} / {exact['p99_ms']:.2f} ms | "
                    f"{sel['p50_ms']:.2f} / {sel['p99_ms']:.2f} ms | {sel['recall_at_10']:.3f} |"
                )
            if ladder:
                crossings[f"{row['index']} ({setting} threads)"] = crossover(ladder)
    return "\n".join(lines), crossings


def crossover(ladder: list[tuple[int, dict, dict]]) -> Any:
    """Matching rows where the IDSelector search overtakes the exact one at p50 (the last
    sign change, interpolated in log-log), or which one wins everywhere."""
    found: Any = None
    for (m0, e0, s0), (m1, e1, s1) in zip(ladder, ladder[1:], strict=False):
        d0, d1 = math.log(e0["p50_ms"] / s0["p50_ms"]), math.log(e1["p50_ms"] / s1["p50_ms"])
        if d0 <= 0 < d1:  # exact faster below, IDSelector faster above
            t = -d0 / (d1 - d0)
            found = round(math.exp(math.log(m0) + t * (math.log(m1) - math.log(m0))))
    if found is None:
        if all(e["p50_ms"] <= s["p50_ms"] for _, e, s in ladder):
            return f"exact faster up to {ladder[-1][0]}"
        if all(e["p50_ms"] > s["p50_ms"] for _, e, s in ladder):
            return f"IDSelector faster from {ladder[0][0]}"
        return "mixed"
    return found


def projection_10m(row: dict[str, Any], n: int, dim: int, target: int = 10_000_000) -> dict[str, Any]:
    """Memory and latency at ``target`` items from the compressed index measured at ``n``.

    Memory: the index's bytes per vector (codes, ids, refine codes) times ``target``, plus
    the per-item cost of the serving process beyond the index (id map, row dict, metadata
    columns: (RSS - RSS before load - index file) / n), plus the coarse centroids for the
    nlist auto would pick. Latency: the coarse quantizer's scan grows with nlist; the list
    scan with the items per list (n / nlist) at the same nprobe; measured here by timing
    both parts, as a flat search over nlist centroids and the rest of the p50.
    """
    import faiss

    from xmodal.indexer import ann
    from xmodal.server.masked import SEARCH_THREADS, search_threads

    nlist_now, nlist_then = ann.nlist_for(n), ann.nlist_for(target)
    per_item_server = max(0.0, (row["rss"] - row["rss_before_load"] - row["index_bytes"]) / n)
    index_then = row["bytes_per_vector"] * target + (nlist_then - nlist_now) * dim * 4
    rng = np.random.default_rng(0)
    coarse = {}
    for nlist in (nlist_now, nlist_then):
        flat = faiss.IndexFlatIP(dim)
        flat.add(normalised(rng.standard_normal((nlist, dim))))
        q = normalised(rng.standard_normal((50, dim)))
        times = []
        with search_threads(SEARCH_THREADS):  # as the server searches
            for x in q:
                t0 = time.perf_counter()
                flat.search(x.reshape(1, -1), int(row["params"].get("nprobe", 16)))
                times.append((time.perf_counter() - t0) * 1e3)
        coarse[nlist] = float(np.median(times))
    p50 = row["cases"]["unfiltered"]["p50_ms"]
    scan_now = max(0.0, p50 - coarse[nlist_now])
    growth = (target / nlist_then) / (n / nlist_now)
    return {
        "from_index": row["factory"],
        "measured_at": n,
        "nlist": {"measured": nlist_now, "projected": nlist_then},
        "index_bytes": index_then,
        "server_bytes_per_item_beyond_index": per_item_server,
        "server_rss": row["rss_before_load"] + index_then + per_item_server * target,
        "coarse_ms": coarse,
        "list_growth": growth,
        "p50_ms": coarse[nlist_then] + scan_now * growth,
        "base_store_bytes": target * dim * 2,
        "build_float32_bytes": target * dim * 4,
    }


def write_json(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = "peers.json" if results.get("peers_only") else "scale.json"
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=float))
    os.replace(tmp, out / name)


def machine() -> dict[str, Any]:
    import faiss

    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    mem = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": mem,
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "date": dt.date.today().isoformat(),
    }


def run_main(args, mixture: Mixture, queries: np.ndarray, work: Path, results: dict[str, Any]) -> None:
    started = time.perf_counter()
    vectors, labels = mixture.items(args.n)
    texts, _ = mixture.items(TEXT_ITEMS, seed=2)
    topics = np.random.default_rng(3).permutation(args.centres)[labels]
    data = work / "main"
    write_data(data, vectors, topics, texts)
    print(f"{args.n:,} x {args.dim}-d items written in {time.perf_counter() - started:.1f} s", flush=True)
    cases = main_cases(args.n, topics, args.switch, args.switch_queries)
    started = time.perf_counter()
    truth = ground_truth(vectors, queries, cases)
    print(f"exact top-{K} for {len(cases)} cases in {time.perf_counter() - started:.1f} s", flush=True)
    queries_path = work / "queries.npy"
    np.save(queries_path, queries)
    main: dict[str, Any] = {"n": args.n, "cases": {c.name: {"conditions": c.conditions} for c in cases}, "indexes": []}
    results["main"] = main
    for name in args.indexes:
        row = evaluate_index(name, data, args.n, args.dim, cases, truth, queries_path, work)
        main["indexes"].append(row)
        write_json(args.out, results)
        shown = [c.name for c in cases if not c.name.startswith("switch")]
        print(index_table([row], shown), flush=True)
        if args.switch:
            print(switch_table([row], args.n)[0], flush=True)
    rows = main["indexes"]
    shown = [c.name for c in cases if not c.name.startswith("switch")]
    print("\n" + index_table(rows, shown))
    flat = next((r for r in rows if r["factory"] == "Flat" and r["index"] == "Flat"), None)
    auto = next((r for r in rows if r["index"] == "auto"), None)
    if flat and auto:
        main["goals"] = {}
        for setting in auto["threads"]:
            goals = judge(flat["threads"][setting], auto["threads"][setting], shown)
            main["goals"][setting] = goals
            print(
                f"\n[{'one FAISS thread' if setting == '1' else 'all FAISS threads'} per search] auto "
                f"({auto['factory']}) vs Flat, unfiltered p50: "
                f"{goals['auto_vs_flat_p50_speedup']:.1f}x faster (goal >= {GOAL_SPEEDUP:g}x: "
                f"{'met' if goals['speedup_met'] else 'NOT met'}); recall@10 {goals['auto_recall']:.3f} (goal >= "
                f"{GOAL_RECALL}: {'met' if goals['recall_met'] else 'NOT met'}); filtered: recall@10 >= "
                f"{goals['filtered_min_recall']:.3f}, p99 <= {goals['filtered_max_p99_ms']:.2f} ms (goal >= "
                f"{GOAL_FILTER_RECALL}, <= {GOAL_FILTER_P99_MS:g} ms: {'met' if goals['filtered_met'] else 'NOT met'})"
            )
    if args.switch:
        table, crossings = switch_table(rows, args.n)
        main["switch"] = crossings
        print("\nexact search over the matching rows vs the index's search with an IDSelector:\n" + table)
        print(f"crossover (matching rows where the IDSelector search becomes faster at p50): {crossings}")
    compressed = next((r for r in rows if r["index"] == "auto:huge"), None) or next(
        (r for r in rows if "IVF" in r["factory"] and ("SQ" in r["factory"] or "PQ" in r["factory"])), None
    )
    if compressed is not None:
        main["projection_10m"] = projection_10m(compressed, args.n, args.dim)
        p = main["projection_10m"]
        print(
            f"\n10M projection from {p['from_index']} at {args.n:,}: index {gib(p['index_bytes'])}, server RSS "
            f"{gib(p['server_rss'])}, p50 {p['p50_ms']:.1f} ms (base store {gib(p['base_store_bytes'])} fp16)"
        )
    write_json(args.out, results)


def run_peers(args, mixture: Mixture, queries: np.ndarray, work: Path, results: dict[str, Any]) -> None:
    n = args.peer_n
    vectors, labels = mixture.items(n)
    texts, _ = mixture.items(TEXT_ITEMS, seed=2)
    topics = np.random.default_rng(3).permutation(args.centres)[labels]
    data = work / "peers"
    write_data(data, vectors, topics, texts)
    cases = [Case("unfiltered", [], None)] + [bucket_case(f"bucket {pct(f)}", n, f) for f in PEER_SELECTIVITIES]
    truth = ground_truth(vectors, queries, cases)
    queries_path = work / "queries.npy"
    np.save(queries_path, queries)
    peers: dict[str, Any] = {"n": n, "xmodal": [], "systems": {}}
    results["peers"] = peers
    for name in args.peer_indexes:
        peers["xmodal"].append(
            evaluate_index(name, data, n, args.dim, cases, truth, queries_path, work / "peer-xmodal")
        )
        write_json(args.out, results)
    files = work / "peer-files"
    files.mkdir(parents=True, exist_ok=True)
    np.save(files / "vectors.npy", normalised(vectors))  # the very vectors the xmodal index holds
    np.save(files / "buckets.npy", np.arange(n) % BUCKETS)
    spec = {
        "vectors": str(files / "vectors.npy"),
        "buckets": str(files / "buckets.npy"),
        "queries": str(queries_path),
        "truth": {"unfiltered": truth["unfiltered"]},
        "cases": [c.spec() for c in cases[1:]],
    }
    if args.peer_rows_from:  # the engines' rows of an earlier run (same vectors, queries and filters)
        earlier = json.loads(Path(args.peer_rows_from).read_text())["peers"]
        if earlier["n"] != n:
            raise SystemExit(f"--peer-rows-from holds a run at {earlier['n']:,} items, not {n:,}")
        peers["systems"] = earlier["systems"]
        peers["systems_from"] = str(args.peer_rows_from)
    for system in args.peer_systems:
        print(f"\n== {system} ({n:,} items) ...", flush=True)
        folder = work / f"peer-{system}"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            got = run_worker(system, {**spec, "dir": str(folder / "db")}, folder)
        except (subprocess.CalledProcessError, OSError) as exc:
            print(f"   {system} failed: {exc}", flush=True)
            peers["systems"][system] = {"error": str(exc)}
            continue
        scored = {}
        for name, value in got.pop("cases").items():
            base = name.replace(" (bypass_vector_index)", "")
            scored[name] = summarise(value["ms"], value["found"], truth[base])
        peers["systems"][system] = {**got, "cases": scored}
        write_json(args.out, results)
    print("\n" + peer_table(peers))
    write_json(args.out, results)


def peer_table(peers: dict[str, Any]) -> str:
    names = ["unfiltered"] + [f"bucket {pct(f)}" for f in PEER_SELECTIVITIES]
    lines = ["| system | build | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]

    def cell(c: dict[str, float] | None) -> str:
        return "-" if c is None else f"{c['p50_ms']:.2f} ms / {c['recall_at_10']:.3f}"

    for row in peers["xmodal"]:
        cells = [cell(row["cases"].get(name)) for name in names]
        lines.append(
            f"| xmodal {row['index']} (`{row['factory']}`) | {row['build_s']:.0f} s | " + " | ".join(cells) + " |"
        )
    for system, row in peers["systems"].items():
        if "error" in row:
            lines.append(f"| {system} | failed: {row['error'][:80]} |" + " |" * len(names))
            continue
        cells = [cell(row["cases"].get(name)) for name in names]
        lines.append(f"| {system} {row['version']} | {row['build_s']:.0f} s | " + " | ".join(cells) + " |")
        bypass = [row["cases"].get(f"{name} (bypass_vector_index)") for name in names]
        if any(bypass):
            lines.append(f"| {system}, bypass_vector_index | | " + " | ".join(cell(c) for c in bypass) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="items (image vectors) in the main run")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--centres", type=int, default=4096, help="clusters of the mixture")
    parser.add_argument("--queries", type=int, default=200, help="held-out queries, one at a time")
    parser.add_argument("--indexes", nargs="+", default=list(DEFAULT_INDEXES), help="Flat, auto, auto:huge, ...")
    parser.add_argument("--switch", action="store_true", help="time exact vs IDSelector filtered search")
    parser.add_argument("--switch-queries", type=int, default=100)
    parser.add_argument("--main", action=argparse.BooleanOptionalAction, default=True, help="the --n run")
    parser.add_argument("--peers", action="store_true", help="Chroma and LanceDB at --peer-n (the bench extra)")
    parser.add_argument("--peer-n", type=int, default=200_000)
    parser.add_argument("--peer-indexes", nargs="+", default=["Flat", "auto"])
    parser.add_argument(
        "--peer-systems", nargs="*", default=["chroma", "lance"], choices=["chroma", "lance"], help="engines to run"
    )
    parser.add_argument(
        "--peer-rows-from", type=Path, default=None, help="take the engines' rows from an earlier run's JSON"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results/scale"))
    parser.add_argument("--workdir", type=Path, default=None, help="data directories (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep --workdir's contents")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, spec_path = args.worker
        spec = json.loads(Path(spec_path).read_text())
        result = WORKERS[kind](spec)
        Path(spec["result"]).write_text(json.dumps(result, default=float))
        return 0
    if args.n % BUCKETS or args.peer_n % BUCKETS:
        parser.error(f"--n and --peer-n must be multiples of {BUCKETS} (the bucket field selects exact fractions)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="xmodal-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    mixture = Mixture(args.dim, args.centres)
    queries = normalised(mixture.draw(args.queries, seed=999_999)[0])
    results: dict[str, Any] = {
        "machine": machine(),
        "config": {
            "n": args.n,
            "dim": args.dim,
            "centres": args.centres,
            "queries": args.queries,
            "k": K,
            "mixture": {"local_dims": mixture.local_dims, "local": mixture.local, "noise": mixture.noise},
            "text_items": TEXT_ITEMS,
            "command": " ".join(["python", "bench/scale.py", *(argv if argv is not None else sys.argv[1:])]),
        },
    }
    if not args.main:
        results["peers_only"] = True  # written to peers.json, beside a main run's scale.json
    print(
        f"{os.cpu_count()} cores; mixture of {args.centres} clusters, {args.dim}-d; {args.queries} queries; work {work}"
    )
    try:
        if args.main:
            run_main(args, mixture, queries, work, results)
        if args.peers:
            run_peers(args, mixture, queries, work, results)
    finally:
        results["wall_s"] = time.perf_counter() - started
        write_json(args.out, results)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nwall time {results['wall_s']:.0f} s; figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
