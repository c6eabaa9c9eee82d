"""The k best rows of an index among those a mask keeps (a metadata filter less the hidden
rows), chosen per index family so that recall holds at every selectivity; and the FAISS
thread count of one search.

- Flat: exact. Few kept rows are scored where they lie (fvec_inner_products_by_idx, no
  copy); more are scanned in place with a bitmap selector (each row's bit is read, only the
  kept rows are scored).
- IVF (nothing wrapped around it): the lists are ranked by their centroid as for any search
  and the lists holding no kept row are skipped; the nearest of the others are probed
  (search_preassigned, a bitmap selector: only kept rows are scored) until they hold the
  cover: :data:`IVF_COVER` times the rows the tuned nprobe covers unfiltered, at least
  :data:`IVF_MIN_COVER`, or :data:`IVF_FAR_COVER` when the lists an unfiltered search would
  probe hold fewer than k kept rows or far fewer than the selectivity predicts (part of the
  answer lies away from the query: whole clusters elsewhere, or small clusters with a few
  kept rows each, where every centroid scores about the same and the best kept rows are
  spread over many lists); and never more than :data:`IVF_MAX_SCAN`
  entries read. When few rows are kept every list holding one is probed: exact. Where the
  lists probed hold under 2 % kept rows, those rows are gathered and scored instead of the
  lists being scanned (a scan reads every entry's id). IVF-SQ8
  with an IDSelector and its tuned nprobe of 2 found 0.163 of the top 10 on a whole-cluster
  filter before (docs/benchmarks.md).
- HNSW: exact over the graph's stored vectors when few rows match; when many match, the
  unfiltered search for k / selectivity x :data:`POST_FILTER_MARGIN` candidates, filtered
  afterwards (exact up to the graph's recall whenever k of them match: a kept row scoring
  higher would be among the candidates); when that comes up short (the kept rows lie away
  from the query), an exact scan of the stored vectors; the graph walked with an
  IDSelector and a beam widened by 1 / selectivity only over compressed storage or very
  many kept rows (on whole-cluster filters the walk found 0.60-0.75 of the top 10).
- Anything else (pre-transforms, refine steps, id maps): exact over reconstructed vectors
  when few rows match, else the index's search with an IDSelector and its knob widened by
  1 / selectivity (and exact when that finds fewer than k).

One query's search is pinned to :data:`SEARCH_THREADS` OpenMP threads by
:func:`search_threads`: faiss parallelises a single query's flat scan over the database,
and on the 2-core server two contending threads made a 1M Flat query 2.5x slower (400 ms vs
159 ms) and left nothing for the other requests.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import faiss as _faiss
import numpy as np

from xmodal.indexer import ann

# faiss's type stubs lack the SWIG helpers and parameter classes used here (and type the
# inverted lists as optional): it is typed as Any in this module
faiss: Any = _faiss

SEARCH_THREADS = 1  # OpenMP threads per search (0 or None: faiss's default, one per core)
EXACT_FILTER_ROWS = 20_000  # HNSW and wrapped indexes: fewer matching rows than this, exact search over them
GATHER_ROWS = 4_096  # flat storage: up to this many kept rows scored where they lie, more scanned with a bitmap
MAX_EF_SEARCH = 4096
POST_FILTER_MARGIN = 2.0  # HNSW: candidates = k / selectivity x this
POST_FILTER_MAX_K = 1024  # HNSW: the most candidates an unfiltered search is asked for
HNSW_SCAN_ROWS = 262_144  # HNSW over full vectors: up to this many kept rows scanned exactly when post-filtering fails
EXACT_FALLBACK_ROWS = 262_144  # wrapped indexes: up to this many kept rows searched exactly when a search finds < k
IVF_COVER = 2.0  # IVF: kept rows the probed lists hold, in multiples of nprobe x the mean list size,
IVF_MIN_COVER = 2_048  # and at least this many,
IVF_FAR_COVER = 32_768  # or this many when the lists an unfiltered search probes hold few of them,
IVF_MAX_SCAN = 262_144  # until the lists probed hold this many entries (kept or not: each is read)
GATHER_DENSITY = 50  # IVF: lists holding fewer kept rows than 1 in this many entries: gather, not scan


@contextlib.contextmanager
def search_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` OpenMP threads in this thread (None or 0: unchanged).

    faiss.omp_set_num_threads sets the calling thread's OpenMP setting only, so a search
    pinned here does not slow an index build in another thread; the old value comes back
    afterwards (a gRPC worker thread may run a compaction next)."""
    if not threads:
        yield
        return
    before = faiss.omp_get_max_threads()
    if before == threads:
        yield
        return
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def masked_search(
    index: Any, xq: np.ndarray, k: int, mask: np.ndarray, *, exact_rows: int = EXACT_FILTER_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), best first, of the k best rows of ``index`` (a snapshot's
    ModalityIndex, or a delta's flat index) among those where ``mask`` is True.

    Args:
        xq: one query, (1, dim) float32.
        exact_rows: HNSW and wrapped indexes search exactly over at most this many rows.
    """
    count = int(np.count_nonzero(mask))
    if not count:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    xq = np.ascontiguousarray(xq, dtype=np.float32).reshape(1, -1)
    k = min(k, count)
    faiss_index = getattr(index, "index", index)
    plain = ann.unwrapped(faiss_index)
    if isinstance(plain, faiss.IndexIVF):
        return _ivf(index, plain, xq, k, mask, count)
    if isinstance(plain, faiss.IndexHNSW):
        return _hnsw(index, plain, xq, k, mask, count, exact_rows)
    if isinstance(plain, faiss.IndexFlat):
        return _flat(plain, xq, k, mask, count)
    if count <= exact_rows:
        return _gathered(faiss_index, xq, k, np.flatnonzero(mask))
    return _with_selector(index, xq, k, mask, count)


def _result(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = rows >= 0
    return scores[keep], rows[keep]


class _Bitmap:
    """An IDSelectorBitmap over ``mask`` with the bits it points at (faiss keeps a raw pointer)."""

    def __init__(self, mask: np.ndarray):
        self.bits = np.packbits(mask, bitorder="little")
        self.selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(self.bits))


# -- flat ----------------------------------------------------------------------------------


def _flat(flat: faiss.IndexFlat, xq: np.ndarray, k: int, mask: np.ndarray, count: int):
    """Exact: the kept rows scored where they lie when few, else scanned with a bitmap."""
    if count <= GATHER_ROWS:
        rows = np.flatnonzero(mask)
        if flat.metric_type == faiss.METRIC_INNER_PRODUCT and flat.code_size == 4 * flat.d:
            scores = np.empty(len(rows), np.float32)
            faiss.fvec_inner_products_by_idx(
                faiss.swig_ptr(scores), faiss.swig_ptr(xq), flat.get_xb(), faiss.swig_ptr(rows), flat.d, 1, len(rows)
            )
            top = np.argpartition(-scores, k - 1)[:k] if len(rows) > k else np.arange(len(rows))
            top = top[np.argsort(-scores[top], kind="stable")]
            return scores[top], rows[top]
        return _gathered(flat, xq, k, rows)
    bitmap = _Bitmap(mask)
    params = faiss.SearchParameters()
    params.sel = bitmap.selector
    scores, found = flat.search(xq, k, params=params)
    return _result(scores[0], found[0])


def _gathered(index: faiss.Index, xq: np.ndarray, k: int, rows: np.ndarray):
    """Exact over the stored vectors of ``rows`` (reconstructed: IVF gets a direct map on first use)."""
    try:
        vectors = index.reconstruct_batch(rows)
    except RuntimeError:
        faiss.extract_index_ivf(index).make_direct_map()
        vectors = index.reconstruct_batch(rows)
    # faiss's scan for one query runs on this thread (numpy's matrix product would use BLAS threads)
    scores, found = faiss.knn(xq, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    return _result(scores[0], np.where(found[0] >= 0, rows[np.maximum(found[0], 0)], -1))


# -- IVF -----------------------------------------------------------------------------------


class _Lists:
    """What filtered searches need of an IVF index, computed once per loaded index: the
    rows of each list, contiguous (``rows[offsets[l]:offsets[l + 1]]``), the list of each
    row, and the centroids (a view of the flat quantizer's storage, no copy)."""

    def __init__(self, ivf: faiss.IndexIVF):
        self.nlist, self.n = ivf.nlist, ivf.ntotal
        self.of_row = np.full(self.n, -1, np.int32)
        if ivf.direct_map.type == faiss.DirectMap.Array:
            self.of_row[:] = faiss.vector_to_array(ivf.direct_map.array) >> 32  # (list << 32 | offset)
        else:
            invlists = ivf.invlists
            for lst in range(ivf.nlist):
                size = invlists.list_size(lst)
                if size:
                    ids = invlists.get_ids(lst)
                    self.of_row[faiss.rev_swig_ptr(ids, size).copy()] = lst
                    invlists.release_ids(lst, ids)
        self.rows = np.argsort(self.of_row, kind="stable").astype(np.int32)
        self.offsets = np.searchsorted(self.of_row[self.rows], np.arange(self.nlist + 1)).astype(np.int64)
        quantizer = faiss.downcast_index(ivf.quantizer)
        self.centroids = None
        if isinstance(quantizer, faiss.IndexFlat) and quantizer.metric_type == faiss.METRIC_INNER_PRODUCT:
            self.centroids = faiss.rev_swig_ptr(quantizer.get_xb(), ivf.nlist * ivf.d).reshape(ivf.nlist, ivf.d)
            self.quantizer = quantizer  # the view above points into it

    def ranked(self, ivf: faiss.IndexIVF, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lists, centroid scores), nearest first: every list."""
        if self.centroids is None:
            scores, lists = ivf.quantizer.search(xq, self.nlist)
            keep = lists[0] >= 0
            return lists[0][keep], scores[0][keep]
        scores = np.empty(self.nlist, np.float32)
        faiss.fvec_inner_products_ny(
            faiss.swig_ptr(scores), faiss.swig_ptr(xq), faiss.swig_ptr(self.centroids), xq.shape[1], self.nlist
        )
        order = np.argsort(-scores)
        return order, scores[order]

    def kept(self, lists: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """How many rows ``mask`` keeps in each of ``lists``."""
        starts, stops = self.offsets[lists], self.offsets[lists + 1]
        sizes = stops - starts
        if not sizes.sum():
            return np.zeros(len(lists), np.int64)
        rows = np.concatenate([self.rows[a:b] for a, b in zip(starts.tolist(), stops.tolist(), strict=True)])
        counts = np.zeros(len(lists), np.int64)
        nonempty = sizes > 0
        counts[nonempty] = np.add.reduceat(mask[rows].astype(np.int32), np.cumsum(sizes)[nonempty] - sizes[nonempty])
        return counts


_lists: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lists_lock = threading.Lock()


def ivf_lists(owner: Any, ivf: faiss.IndexIVF) -> _Lists:
    """The :class:`_Lists` of a loaded index (``owner``: immutable, the cache key)."""
    with _lists_lock:
        found = _lists.get(owner)
    if found is None:
        found = _Lists(ivf)
        with _lists_lock:
            _lists[owner] = found
    return found


def _ivf(owner: Any, ivf: faiss.IndexIVF, xq: np.ndarray, k: int, mask: np.ndarray, count: int):
    """Probe the nearest lists that hold kept rows until they hold the cover or the scan
    reaches IVF_MAX_SCAN entries (all of them when few rows are kept: exact), reading only
    the kept rows (a bitmap selector)."""
    tuned = getattr(owner, "tuned", {}) or {}
    nprobe = max(1, int(tuned.get("nprobe", ivf.nprobe)))
    lists = ivf_lists(owner, ivf)
    ranked, centroid_scores = lists.ranked(ivf, xq)
    sizes = (lists.offsets[1:] - lists.offsets[:-1])[ranked]
    near = max(k, IVF_COVER * nprobe * lists.n / lists.nlist, IVF_MIN_COVER)
    rows = None
    if count <= lists.n // 4:  # few enough kept rows to count them all at once
        rows = np.flatnonzero(mask)
        held = np.bincount(lists.of_row[rows], minlength=lists.nlist)[ranked]
    else:  # most rows kept: count list by list, nearest first, as far as needed
        held = np.zeros(0, np.int64)
        while len(held) < len(ranked):
            held = np.concatenate([held, lists.kept(ranked[len(held) : len(held) + max(16, len(held))], mask)])
            if _probed(held, sizes, _cover(held, sizes, nprobe, near, count / lists.n, k)) < len(held):
                break
    probe = _probed(held, sizes, _cover(held, sizes, nprobe, near, count / lists.n, k))
    useful = np.flatnonzero(held[:probe])
    if len(useful) < nprobe:  # at least the tuned nprobe lists that hold kept rows
        useful = np.flatnonzero(held)[:nprobe]
    if not len(useful):
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    if rows is not None and held[useful].sum() * GATHER_DENSITY < sizes[useful].sum():
        # sparse: a scan would read mostly rows the mask drops (~30 ns each); gather the kept ones (~1.6 us each)
        inside = np.zeros(lists.nlist, bool)
        inside[ranked[useful]] = True
        return _gathered(ivf, xq, k, rows[inside[lists.of_row[rows]]])
    bitmap = _Bitmap(mask)
    params = faiss.SearchParametersIVF()
    params.nprobe = len(useful)
    params.sel = bitmap.selector
    assign = np.ascontiguousarray(ranked[useful].reshape(1, -1), dtype=np.int64)
    centroids = np.ascontiguousarray(centroid_scores[useful].reshape(1, -1), dtype=np.float32)
    scores = np.empty((1, k), np.float32)
    found = np.empty((1, k), np.int64)
    ivf.search_preassigned_c(
        1,
        faiss.swig_ptr(xq),
        k,
        faiss.swig_ptr(assign),
        faiss.swig_ptr(centroids),
        faiss.swig_ptr(scores),
        faiss.swig_ptr(found),
        False,
        params,
    )
    return _result(scores[0], found[0])


def _cover(held: np.ndarray, sizes: np.ndarray, nprobe: int, near: float, selectivity: float, k: int) -> float:
    """Kept rows to probe: ``near``, unless the nprobe lists an unfiltered search probes hold
    fewer than k kept rows, or clearly fewer than the selectivity predicts (3 standard
    deviations below: a filter independent of the vectors, as a 10 % one on 200 rows, is not
    mistaken for one that is not). Then part of the answer lies away from the query (whole
    clusters elsewhere; or clusters so small that a filter leaves a few rows in each: 200,000
    items, 10 %), where every centroid scores about the same in high dimension and the best
    kept rows are spread over many lists: IVF_FAR_COVER."""
    own = held[:nprobe].sum()
    expected = selectivity * sizes[: min(nprobe, len(held))].sum()
    if own >= k and own >= expected - 3 * math.sqrt(expected):
        return near
    return max(near, IVF_FAR_COVER)


def _probed(held: np.ndarray, sizes: np.ndarray, cover: float) -> int:
    """How many of the ranked lists (``held`` kept rows of ``sizes``) to go through: until
    the ones holding kept rows hold ``cover`` of them, or hold IVF_MAX_SCAN entries."""
    kept = np.cumsum(held)
    scanned = np.cumsum(np.where(held > 0, sizes[: len(held)], 0))
    enough = np.flatnonzero((kept >= cover) | (scanned >= IVF_MAX_SCAN))
    return int(enough[0]) + 1 if len(enough) else len(held)


# -- HNSW ----------------------------------------------------------------------------------


def _hnsw(owner: Any, hnsw: faiss.IndexHNSW, xq: np.ndarray, k: int, mask: np.ndarray, count: int, exact_rows):
    """Exact when few rows are kept; the unfiltered search post-filtered when many are; an
    exact scan of the stored vectors when that comes up short (the kept rows lie away from
    the query, where a walk with a selector finds few of the best: 0.60-0.75 of the top 10
    on whole-cluster filters); the graph walked with a selector and a wider beam only over
    compressed storage or very many kept rows."""
    storage = faiss.downcast_index(hnsw.storage)
    flat = isinstance(storage, faiss.IndexFlat)
    if count <= exact_rows:
        return _flat(storage, xq, k, mask, count) if flat else _gathered(hnsw, xq, k, np.flatnonzero(mask))
    tuned = getattr(owner, "tuned", {}) or {}
    ef = int(tuned.get("efSearch", hnsw.hnsw.efSearch))
    n = len(mask)
    wanted = math.ceil(k * n / count * POST_FILTER_MARGIN)
    if wanted <= POST_FILTER_MAX_K:
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef, wanted)
        scores, found = _result(*(a[0] for a in hnsw.search(xq, min(wanted, n), params=params)))
        kept = mask[found]
        if kept.sum() >= k:  # exact up to the graph's recall: a kept row scoring higher is among them
            return scores[kept][:k], found[kept][:k]
    if flat and count <= HNSW_SCAN_ROWS:
        return _flat(storage, xq, k, mask, count)
    bitmap = _Bitmap(mask)
    params = faiss.SearchParametersHNSW()
    params.efSearch = int(min(MAX_EF_SEARCH, max(ef, k) * n / count))
    params.sel = bitmap.selector
    scores, found = _result(*(a[0] for a in hnsw.search(xq, k, params=params)))
    if len(found) < k and flat:  # the walk ran out of kept rows it could reach
        return _flat(storage, xq, k, mask, count)
    return scores, found


# -- anything else -------------------------------------------------------------------------


def _with_selector(index: Any, xq: np.ndarray, k: int, mask: np.ndarray, count: int):
    """The index's own search with a bitmap selector, its knob widened by 1 / selectivity."""
    bitmap = _Bitmap(mask)
    faiss_index = getattr(index, "index", index)
    params: Any = ann.search_parameters(faiss_index, getattr(index, "tuned", None), bitmap.selector)
    widen = len(mask) / count
    inner = params.xmodal_inner
    if hasattr(inner, "efSearch"):
        inner.efSearch = int(min(MAX_EF_SEARCH, max(inner.efSearch, k) * widen))
    elif hasattr(inner, "nprobe"):
        nlist = faiss.extract_index_ivf(faiss_index).nlist
        inner.nprobe = int(min(nlist, math.ceil(inner.nprobe * widen)))
    scores, found = _result(*(a[0] for a in faiss_index.search(xq, k, params=params)))
    if len(found) < k and count <= EXACT_FALLBACK_ROWS:  # the probed lists held too few kept rows
        return _gathered(faiss_index, xq, k, np.flatnonzero(mask))
    return scores, found


__all__ = ["EXACT_FILTER_ROWS", "SEARCH_THREADS", "ivf_lists", "masked_search", "search_threads"]
