"""Index choice for ``--factory auto``: exact search while it is fast enough, an ANN index
beyond it, with its search parameters tuned at build time.

The crossover, measured with faiss 1.15.1 on the 2-core build machine (shared with other
jobs, so the best of two runs): one query at a time on one thread, over Gaussian-mixture
vectors (4,096 centres, L2-normalised, inner product); HNSW32 (efConstruction 40) with
efSearch tuned by :func:`tune` to recall@10 >= 0.98 against exact search on 200 held-out
queries::

    items      dim   Flat ms/query   HNSW32 ms/query (efSearch)
     10,000    128       0.13            0.22 (96)
     30,000    128       1.07            0.08 (16)
    100,000    128       3.5             0.08 (24)
    300,000    128      10.9             0.40 (192)
     10,000    512       0.96            1.50 (384)
     30,000    512       4.3             1.23 (256)
    100,000    512      17.3             0.38 (48)
    300,000    512     100               2.4  (768; recall 0.974, short of the target)

Flat is the faster of the two at 10k items and an ANN index from 30k on; Flat costs 0.3-0.6
ns per item and dimension (it reads every vector). Flat is also exact, needs no training or
tuning, is the smallest index and the cheapest to rebuild (every compaction and erasure
rebuilds). So ``auto`` keeps Flat while one query scans at most :data:`FLAT_MAX_WORK`
item-dimensions (8M: 2-4 ms a query here; 62k items at 128-d, 15.6k at 512-d), which keeps
the demo (2,000 items) and ROCO (a few thousand) exact and moves the 1M benchmark to an ANN
index.

Beyond it :func:`choose_factory` takes the first candidate that fits the memory budget:
inverted lists over full vectors (IVF-Flat), IVF-SQ8 (a quarter of the memory), then OPQ +
IVF-PQ with a refine step on SQ8 (or SQ4) codes, which is also the first choice from
:data:`HUGE` items on (tens of millions). Inverted lists rather than an HNSW graph, measured
at 1M 512-d items of the same mixture by bench/scale.py (one FAISS thread per query; recall
on the benchmark's own queries, the knob tuned on the build's held-out ones)::

    index                            build    bytes/vector  knob (tuned)   recall@10   p50 ms
    Flat                               29 s       2048          -            1.000       201
    HNSW32, efConstruction 40         499 s       2320       efSearch 1024   0.929       4.75  (target missed)
    HNSW32, efConstruction 128       2288 s       2320       efSearch 32     0.970       0.35
    IVF4096,Flat                      253 s       2072       nprobe 2        0.997       0.57
    IVF4096,SQ8                       265 s        536       nprobe 2        0.992       0.43

A good graph needs efConstruction 128 (:data:`HNSW_EF_CONSTRUCTION`, used for every HNSW
factory): 4.6x the build time of faiss's default 40, 38 minutes at 1M on 2 cores, and it
still generalised less well from its tuning queries (0.9835) than IVF (0.9935 tuned, 0.997
on fresh queries). IVF builds in minutes (k-means on a sample), its recall is bought with
nprobe, which :func:`tune` raises until the target is met (at nprobe = nlist IVF-Flat is
exact, so the target is always reachable), and a filtered search probes the nearest lists
that hold matching items (server/masked.py) instead of walking a graph with a filter, whose
recall falls when few items match (faiss #4727).

:func:`tune` then picks the cheapest efSearch / nprobe (and refine k_factor) that reaches
recall@10 >= 0.98 against exact search on held-out queries.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

import faiss
import numpy as np

from .errors import InvalidArgument

log = logging.getLogger(__name__)

AUTO = "auto"
TARGET_RECALL = 0.98
FLAT_MAX_WORK = 8_000_000  # items x dims one exact query may scan (2-4 ms here)
HUGE = 10_000_000  # from here on: compressed codes with a refine step, not a graph
HNSW_EF_CONSTRUCTION = 128  # faiss's default (40) leaves a 1M graph short of recall 0.98 at any efSearch
TUNE_QUERIES = 200
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
NPROBE = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
K_FACTOR = (1, 2, 4, 8, 16)
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str | int | None) -> int | None:
    """``"4G"``, ``"512M"``, ``"1.5g"``, ``"2GB"``, ``"1000000"`` -> bytes (binary suffixes);
    None or ``""`` -> None.

    Raises:
        InvalidArgument: not a size.
    """
    if text is None or text == "":
        return None
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), re.IGNORECASE)
        if not match:
            raise InvalidArgument(f"memory budget {text!r} is not a size: use bytes or a suffix, e.g. 4G or 512M")
        value = int(float(match.group(1)) * _SUFFIXES[match.group(2).upper()])
    if value <= 0:
        raise InvalidArgument(f"memory budget must be positive, got {text!r}")
    return value


def flat_max_items(dim: int) -> int:
    """The item count up to which ``auto`` keeps an exact (Flat) index at ``dim``."""
    return FLAT_MAX_WORK // max(1, dim)


def nlist_for(n: int) -> int:
    """IVF lists: about 4 sqrt(n), a power of two, at least 39 training points per list."""
    nlist = 1 << max(4, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    return nlist


def pq_bytes(dim: int) -> int:
    """PQ sub-quantizers (bytes per code): about dim/8, a divisor of dim."""
    target = max(1, dim // 8)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


def estimate_bytes(factory: str, n: int, dim: int) -> int:
    """Rough resident size of an index built with one of :func:`choose_factory`'s strings."""
    if factory == "Flat":
        return n * dim * 4
    if factory.startswith("HNSW"):
        m = int(re.match(r"HNSW(\d+)", factory).group(1))  # type: ignore[union-attr]
        return n * (dim * 4 + (2 * m + 2) * 4 + 16)
    if factory == "SQ8":
        return n * dim
    nlist = int(re.search(r"IVF(\d+)", factory).group(1))  # type: ignore[union-attr]
    coarse = nlist * dim * 4
    if re.fullmatch(r"IVF\d+,Flat", factory):
        return coarse + n * (dim * 4 + 8 + 8)  # vectors, ids, direct map
    if ",SQ8" in factory and "PQ" not in factory:
        return coarse + n * (dim + 8 + 8)  # codes, ids, direct map
    m = int(re.search(r",PQ(\d+)", factory).group(1))  # type: ignore[union-attr]
    size = coarse + dim * dim * 4 + n * (m + 8 + 8)
    if "Refine(SQ8)" in factory:
        size += n * dim
    elif "Refine(SQ4)" in factory:
        size += n * dim // 2
    return size


def _mib(size: int) -> str:
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f} GiB"
    return f"{size / (1 << 20):.0f} MiB" if size >= 1 << 20 else f"{size / (1 << 10):.0f} KiB"


def choose_factory(
    n: int, dim: int, memory_budget: int | None = None, *, flat_max: int | None = None
) -> tuple[str, str]:
    """(FAISS factory string, why) for ``n`` vectors of ``dim`` under ``memory_budget`` bytes.

    Args:
        memory_budget: bytes the index may take (None: no limit).
        flat_max: the crossover item count (default :func:`flat_max_items`).
    """
    flat_max = flat_max_items(dim) if flat_max is None else flat_max
    budget = f" within the {_mib(memory_budget)} budget" if memory_budget else ""

    def fits(factory: str) -> bool:
        return memory_budget is None or estimate_bytes(factory, n, dim) <= memory_budget

    if n <= flat_max:
        if fits("Flat"):
            return "Flat", f"{n} items <= crossover {flat_max} at {dim}-d: exact search is fast enough"
        if n < 39 * 16 and fits("SQ8"):
            return "SQ8", f"{n} items, Flat ({_mib(estimate_bytes('Flat', n, dim))}) is over the budget: 8-bit codes"
    nlist, m = nlist_for(n), pq_bytes(dim)
    if n <= flat_max:
        big = f"{n} items, but Flat ({_mib(estimate_bytes('Flat', n, dim))}) is over the budget"
    else:
        big = f"{n} items > crossover {flat_max} at {dim}-d"
    pq = f"OPQ{m},IVF{nlist},PQ{m}np"  # np: no polysemous training (slow, unused here)
    if n < HUGE:
        full = f"IVF{nlist},Flat"
        if fits(full):
            return full, (
                f"{big}: inverted lists over full vectors{budget} ({_mib(estimate_bytes(full, n, dim))}): exact "
                "scores in the lists probed, and filtered searches probe the nearest lists holding matches"
            )
        ivf = f"IVF{nlist},SQ8"
        if fits(ivf):
            return ivf, (
                f"{big}: IVF-Flat ({_mib(estimate_bytes(full, n, dim))}) is over the budget; "
                f"inverted lists of 8-bit codes ({_mib(estimate_bytes(ivf, n, dim))})"
            )
        why = f"{big}: IVF-Flat and IVF-SQ8 are over the budget"
    else:
        why = f"{n} items >= {HUGE}: compressed codes with a refine step"
    for refine in ("Refine(SQ8)", "Refine(SQ4)"):
        factory = f"{pq},{refine}"
        if fits(factory):
            return (
                factory,
                f"{why}; OPQ-IVF-PQ reranked on {refine[7:-1]} codes ({_mib(estimate_bytes(factory, n, dim))})",
            )
    return pq, f"{why}; only OPQ-IVF-PQ codes fit ({_mib(estimate_bytes(pq, n, dim))}), recall may fall short"


# -- building ------------------------------------------------------------------------------


def new_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index of ``factory``; HNSW graphs are built with
    efConstruction :data:`HNSW_EF_CONSTRUCTION` (faiss's own default is 40)."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexHNSW):
            layer.hnsw.efConstruction = max(layer.hnsw.efConstruction, HNSW_EF_CONSTRUCTION)
    return index


def min_training_items(factory: str) -> int:
    """The fewest vectors ``factory`` can be trained on: one per IVF list, 2^nbits for PQ
    codes (256 for the usual 8 bits), 1 otherwise."""
    need = 1
    lists = re.search(r"IVF(\d+)", factory)
    if lists:
        need = int(lists.group(1))
    for pq in re.finditer(r"PQ\d+(?:x(\d+))?", factory):  # PQ and OPQ: 2^nbits centroids per sub-space
        need = max(need, 1 << int(pq.group(1) or 8))
    return need


def train(index: faiss.Index, rows: np.ndarray, factory: str) -> None:
    """Train ``index`` (of ``factory``) on ``rows``.

    Raises:
        InvalidArgument: too few rows for the factory's clusterings (faiss's own error
            reads "nx >= k"), naming the minimum and what to use instead.
    """
    need = min_training_items(factory)
    if len(rows) < need:
        raise _too_few(factory, len(rows), need)
    try:
        index.train(rows)
    except RuntimeError as exc:  # a clustering this parse did not foresee (IMI, nbits > 8, ...)
        found = re.search(
            r"training points \((\d+)\) should be at least as large as number of clusters \((\d+)\)", str(exc)
        )
        if found is None:
            raise
        raise _too_few(factory, len(rows), int(found.group(2))) from None


def _too_few(factory: str, have: int, need: int) -> InvalidArgument:
    return InvalidArgument(
        f"--factory {factory!r} needs at least {need} items of a modality to train on, and one has {have}: "
        "use --factory auto (it keeps Flat for a corpus this small) or --factory Flat"
    )


# -- the layers of an index ---------------------------------------------------------------


def _layers(index: faiss.Index) -> list[Any]:
    """The index and the ones it wraps, outermost first (refine, pre-transform, id map)."""
    layers = [faiss.downcast_index(index)]
    while True:
        top = layers[-1]
        if isinstance(top, faiss.IndexRefine):
            layers.append(faiss.downcast_index(top.base_index))
        elif isinstance(top, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
            layers.append(faiss.downcast_index(top.index))
        else:
            return layers


def unwrapped(index: faiss.Index) -> Any:
    """The index, downcast to its class, when nothing wraps it (no refine step, pre-transform
    or id map: its rows are the ids a selector sees); else None."""
    layers = _layers(index)
    return layers[0] if len(layers) == 1 else None


def family(index: faiss.Index) -> str:
    """``"hnsw"``, ``"ivf"`` or ``"flat"`` (anything without a search-time knob)."""
    inner = _layers(index)[-1]
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVF):
        return "ivf"
    return "flat"


def needs_typed_params(index: faiss.Index) -> bool:
    """Whether per-call parameters must be of a family's type (not plain SearchParameters)."""
    return len(_layers(index)) > 1 or family(index) != "flat"


def _refine(index: faiss.Index) -> faiss.IndexRefine | None:
    return next((layer for layer in _layers(index) if isinstance(layer, faiss.IndexRefine)), None)


def prepare(index: faiss.Index) -> None:
    """After building: let IVF indexes reconstruct a row by id (lookups by item id)."""
    inner = _layers(index)[-1]
    if isinstance(inner, faiss.IndexIVF) and inner.direct_map.no():
        inner.make_direct_map()


def apply_parameters(index: faiss.Index, tuned: dict[str, Any] | None) -> None:
    """Make the tuned values the index's defaults (searches without per-call parameters)."""
    tuned = tuned or {}
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexRefine) and "k_factor" in tuned:
            layer.k_factor = float(tuned["k_factor"])
        elif isinstance(layer, faiss.IndexHNSW) and "efSearch" in tuned:
            layer.hnsw.efSearch = int(tuned["efSearch"])
        elif isinstance(layer, faiss.IndexIVF) and "nprobe" in tuned:
            layer.nprobe = int(tuned["nprobe"])


def search_parameters(
    index: faiss.Index, tuned: dict[str, Any] | None, sel: faiss.IDSelector | None = None
) -> faiss.SearchParameters | None:
    """Per-call search parameters of the type the index family needs (HNSW, IVF, nested in
    pre-transform and refine parameters) holding the tuned values and the IDSelector
    ``sel``; None when there is nothing to set.

    The returned object keeps Python references to what it points at (``sel`` is the
    caller's to keep alive)."""
    tuned = tuned or {}
    layers = _layers(index)
    inner = layers[-1]
    params: Any
    if isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = int(tuned.get("efSearch", inner.hnsw.efSearch))
    elif isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = int(tuned.get("nprobe", inner.nprobe))
    elif sel is None and len(layers) == 1:
        return None
    else:
        params = faiss.SearchParameters()
    if sel is not None:
        params.sel = sel
    refs: list = [sel]
    outer: Any
    for layer in reversed(layers[:-1]):
        if isinstance(layer, faiss.IndexRefine):
            outer = faiss.IndexRefineSearchParameters()
            outer.k_factor = float(tuned.get("k_factor", layer.k_factor))
            outer.base_index_params = params
        elif isinstance(layer, faiss.IndexPreTransform):
            outer = faiss.SearchParametersPreTransform()
            outer.index_params = params
        else:  # an id map: rows are the ids we filter on only without one; pass the selector up
            continue
        refs.append(params)
        params = outer
    params.xmodal_refs = refs  # faiss holds raw pointers: keep the nested objects alive
    params.xmodal_inner = refs[1] if len(refs) > 1 else params  # the family's own (efSearch, nprobe)
    return params


# -- tuning --------------------------------------------------------------------------------


def held_out_queries(vectors: np.ndarray, count: int = TUNE_QUERIES, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """Queries like the base vectors but not in the index: sampled rows plus Gaussian noise
    (``noise`` is the noise vector's expected norm), normalised."""
    rng = np.random.default_rng(seed)
    n, dim = vectors.shape
    rows = rng.choice(n, size=min(count, n), replace=False)
    queries = vectors[rows] + rng.standard_normal((len(rows), dim)).astype(np.float32) * (noise / math.sqrt(dim))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    faiss.normalize_L2(queries)
    return queries


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Rows of the exact top-k by inner product (no copy of ``vectors``: 2 GB less at 1M 512-d)."""
    xb = np.ascontiguousarray(vectors, dtype=np.float32)
    return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), xb, k, metric=faiss.METRIC_INNER_PRODUCT)[1]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    k = truth.shape[1]
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / (len(truth) * k)


def _measure(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, tuned: dict) -> tuple[float, float]:
    """(recall@k, seconds for the batch) with ``tuned`` as per-call parameters."""
    params = search_parameters(index, tuned)
    started = time.perf_counter()
    found = index.search(queries, truth.shape[1], params=params)[1]
    return recall_at(found, truth), time.perf_counter() - started


def tune(
    index: faiss.Index,
    vectors: np.ndarray,
    queries: np.ndarray | None = None,
    *,
    k: int = 10,
    target: float = TARGET_RECALL,
) -> dict[str, Any]:
    """The cheapest search parameters of ``index`` (built over ``vectors``) that reach
    recall@``k`` >= ``target`` against exact search on held-out ``queries`` (default
    :func:`held_out_queries`).

    Returns:
        e.g. ``{"efSearch": 48, "recall_at_10": 0.987, "queries": 200, "target": 0.98}``;
        ``{"nprobe": .., "k_factor": ..}`` for refined IVF indexes. When no value reaches
        the target, the best one found and ``"target_reached": False``. Empty for an
        exact index.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    layers = _layers(index)
    if not len(vectors) or (len(layers) == 1 and isinstance(layers[0], faiss.IndexFlat)):
        return {}  # exact
    kind = family(index)
    queries = held_out_queries(vectors) if queries is None else np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(vectors))
    truth = exact_neighbours(vectors, queries, k)
    label = f"recall_at_{k}"
    if kind == "hnsw":
        grid = [{"efSearch": ef} for ef in EF_SEARCH if ef >= k] or [{"efSearch": k}]
        best = _first_reaching(index, queries, truth, grid, target)
    elif kind == "ivf":
        nlist = layers[-1].nlist
        probes = [p for p in NPROBE if p < nlist] + [nlist]
        if _refine(index) is not None:
            candidates = []
            for k_factor in K_FACTOR:
                grid = [{"nprobe": p, "k_factor": k_factor} for p in probes]
                found = _first_reaching(index, queries, truth, grid, target)
                candidates.append(found)
                if found[1] >= target and k_factor > 1 and candidates[-2][1] >= target:
                    break  # a larger k_factor only rescans more
            reached = [c for c in candidates if c[1] >= target]
            best = min(reached, key=lambda c: c[2]) if reached else max(candidates, key=lambda c: c[1])
        else:
            best = _first_reaching(index, queries, truth, [{"nprobe": p} for p in probes], target)
    else:
        best = ({}, *_measure(index, queries, truth, {}))
    tuned, recall, _ = best
    result: dict[str, Any] = {**tuned, label: round(recall, 4), "queries": len(queries), "target": target}
    if recall < target:
        result["target_reached"] = False
    return result


def _first_reaching(
    index: faiss.Index, queries: np.ndarray, truth: np.ndarray, grid: list[dict], target: float
) -> tuple[dict, float, float]:
    """The first setting of ``grid`` (cheapest first) reaching ``target``, else the best seen."""
    best: tuple[dict, float, float] | None = None
    for setting in grid:
        recall, seconds = _measure(index, queries, truth, setting)
        if best is None or recall > best[1]:
            best = (setting, recall, seconds)
        if recall >= target:
            # timing of the first reaching setting, measured again now that caches are warm
            return setting, recall, min(seconds, _measure(index, queries, truth, setting)[1])
    assert best is not None
    return best


def describe(choice: dict[str, Any]) -> str:
    """One line: ``HNSW32,Flat (why), efSearch=48 reaching recall@10 0.99``."""
    params = choice.get("params") or {}
    knobs = ", ".join(f"{key}={value}" for key, value in params.items() if key in ("efSearch", "nprobe", "k_factor"))
    recall = next(((key, value) for key, value in params.items() if key.startswith("recall_at_")), None)
    text = f"{choice['factory']} ({choice['reason']})"
    if knobs:
        text += f", {knobs}"
    if recall:
        missed = " (short of the target)" if params.get("target_reached") is False else ""
        text += f" reaching recall@{recall[0][10:]} {recall[1]:.3f}{missed}"
    return text


__all__ = [
    "AUTO",
    "FLAT_MAX_WORK",
    "TARGET_RECALL",
    "apply_parameters",
    "choose_factory",
    "describe",
    "estimate_bytes",
    "family",
    "flat_max_items",
    "held_out_queries",
    "min_training_items",
    "needs_typed_params",
    "new_index",
    "parse_bytes",
    "prepare",
    "search_parameters",
    "train",
    "tune",
    "unwrapped",
]
