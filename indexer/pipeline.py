"""The index flow: corpus -> catalog + base shards -> head -> snapshot, idempotently.

Images are read, decoded and preprocessed in worker threads while the encoder runs
batches in the calling thread. Every ``shard_size`` items a base shard is written and
its rows committed to the catalog, so a run killed part way resumes where it stopped and
adds nothing twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from . import ann, dicom
from .adapt import write_fitted
from .catalog import Catalog, text_hash
from .clinical import DicomSettings, HeaderReader, key_for, read_clinical, stored_settings, update_settings
from .corpus import IMAGE, TEXT, Corpus, read_corpus
from .encoder import Encoder
from .errors import InvalidArgument, XmodalError
from .images import DEFAULT_MAX_PIXELS, decode_image
from .manifest import Manifest
from .snapshot import DEFAULT_FACTORY, DataDir, Snapshot
from .store import BaseStore, write_blob
from .train import FitConfig

if TYPE_CHECKING:
    from .ray_pipeline import RayEmbedder, RayOptions

DEFAULT_BATCH_SIZE = 64
DEFAULT_SHARD_SIZE = 1024


@dataclass
class IndexReport:
    items: dict = field(default_factory=dict)  # added / changed / unchanged
    pairs_added: int = 0
    embedded: dict = field(default_factory=lambda: {IMAGE: 0, TEXT: 0})
    failed: list = field(default_factory=list)  # (item id, reason) of images skipped
    skipped: list = field(default_factory=list)  # (source, reason) of corpus files left out (DICOM without pixels...)
    removed_debris: list = field(default_factory=list)
    snapshot: Manifest | None = None
    snapshot_written: bool = False
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    image_seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"items: {self.items.get('added', 0)} added, {self.items.get('changed', 0)} changed, "
            f"{self.items.get('unchanged', 0)} unchanged; pairs added: {self.pairs_added}",
            f"embedded: {self.embedded[IMAGE]} images, {self.embedded[TEXT]} texts in {self.seconds:.1f} s"
            + (
                f" ({self.embedded[IMAGE] / self.image_seconds:.1f} images/s)"
                if self.embedded[IMAGE] and self.image_seconds
                else ""
            ),
        ]
        if self.skipped:
            shown = "; ".join(f"{source}: {reason}" for source, reason in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            lines.append(f"left out {len(self.skipped)} file(s) of the corpus: {shown}{more}")
        if self.removed_debris:
            lines.append(f"removed {len(self.removed_debris)} leftover file(s) of an interrupted run")
        if self.failed:
            shown = ", ".join(item_id for item_id, _ in self.failed[:10])
            more = f" and {len(self.failed) - 10} more" if len(self.failed) > 10 else ""
            lines.append(
                f"skipped {len(self.failed)} undecodable image(s): {shown}{more} (first reason: {self.failed[0][1]})"
            )
        lines.extend(self.notes)
        if self.snapshot:
            verb = "wrote" if self.snapshot_written else "up to date:"
            counts = self.snapshot.counts
            lines.append(
                f"{verb} snapshot {self.snapshot.id} ({self.snapshot.head_kind} head, "
                f"{counts[IMAGE]} images, {counts[TEXT]} texts, {self.snapshot.faiss_factory})"
            )
            for modality, choice in sorted(self.snapshot.index.items()):
                lines.append(f"  {modality} index: {ann.describe(choice)}")
            metrics = self.snapshot.metrics
            for name, label in (("zero_shot", "zero-shot"), ("adapted", "adapted ")):
                for direction, m in sorted(metrics.get(name, {}).items(), reverse=True):
                    lines.append(
                        f"  {label} {direction.replace('_to_', '->')} on {m['queries']} held-out queries: "
                        f"R@1 {m['recall@1']:.3f}  R@5 {m['recall@5']:.3f}  R@10 {m['recall@10']:.3f}  "
                        f"MRR {m['mrr']:.3f}"
                    )
        return "\n".join(lines)


def _hash_file(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return "unreadable:" + hashlib.sha256(path.encode()).hexdigest()  # the decode step reports it


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, depth: int) -> Iterator:
    """pool.map that keeps at most ``depth`` results in flight (bounded memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def prepare_image(
    encoder: Encoder, row, settings: DicomSettings, key: bytes
) -> tuple[torch.Tensor | None, str | None, bytes | None]:
    """Read and preprocess one image item (``row``: its ``path`` or ``source``):
    (tensor, error, de-identified copy of a DICOM file). The one decode path of both the
    local pipeline and the Ray actors, so that both make the same vectors."""
    try:
        with open(row["path"] or row["source"], "rb") as handle:
            data_bytes = handle.read()
        if not dicom.is_dicom(data_bytes):
            return encoder.image_tensor(decode_image(data_bytes)), None, None
        clinical = read_clinical(data_bytes, settings, key, max_pixels=DEFAULT_MAX_PIXELS)
        return encoder.image_tensor(clinical.image), None, clinical.deidentified
    except OSError as exc:
        return None, f"cannot read {row['source']}: {exc.strerror or 'unreadable'}", None
    except XmodalError as exc:
        return None, str(exc), None


def _batches(seq: list, size: int) -> Iterator[list]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


@dataclass(kw_only=True)
class IndexOptions:
    """How ``xmodal index`` embeds a corpus. Validated on creation."""

    batch_size: int = DEFAULT_BATCH_SIZE  # encoder batch size
    shard_size: int = DEFAULT_SHARD_SIZE  # items per base shard (and per crash-safe commit)
    workers: int | None = None  # image decoding threads (default: cores, at most 4)
    factory: str = DEFAULT_FACTORY  # "auto" or a FAISS index factory string (inner product)
    memory_budget: int | None = None  # bytes an index may take, for "auto" (None: no limit)
    progress: bool = True  # progress bars on stderr

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.shard_size < 1:
            raise InvalidArgument("batch_size and shard_size must be at least 1")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise InvalidArgument(f"memory_budget must be a positive number of bytes, got {self.memory_budget}")
        if self.workers is not None and self.workers < 1:
            raise InvalidArgument(f"workers must be at least 1, got {self.workers}")


def index_corpus(
    corpus: str | Path,
    data_dir: str | Path,
    encoder: Encoder,
    *,
    head: FitConfig | None = None,
    label_field: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    factory: str = DEFAULT_FACTORY,
    memory_budget: int | None = None,
    progress: bool = True,
    dicom_window: dicom.Window | None = None,
    dicom_fields: tuple[str, ...] | None = None,
    allow_burned_in: bool | None = None,
    ray: RayOptions | RayEmbedder | None = None,
) -> IndexReport:
    """Index a corpus into a data directory (idempotent; resumes after a crash).

    Args:
        corpus: a folder with captions.jsonl/csv, or a JSONL manifest (see corpus.py).
        data_dir: the deployment's data directory (created if missing).
        encoder: the frozen encoder; must match the one the directory was built with.
        head: how to fit the head of the new snapshot (default: FitConfig(), an mlp); with
            too few train pairs for a trained kind, an identity head is written and the
            report says why.
        label_field: metadata field holding a class label (for label-aware losses).
        batch_size, shard_size, workers, factory, memory_budget, progress: see
            :class:`IndexOptions`.
        dicom_window, dicom_fields, allow_burned_in: how DICOM files are read (see
            xmodal.indexer.clinical); stored in the catalog, so later runs and the server
            read them the same way. None keeps what the catalog holds.
        ray: embed texts and images on Ray (see xmodal.indexer.ray_pipeline): options for
            a session of this run's own, or a RayEmbedder the caller has entered. The
            catalog and base-store commits stay in this process. None: in this process.

    Raises:
        CorpusError: unreadable corpus. FailedPrecondition: another encoder built this
        directory. InvalidArgument: bad options.
    """
    options = IndexOptions(
        batch_size=batch_size,
        shard_size=shard_size,
        workers=workers,
        factory=factory,
        memory_budget=memory_budget,
        progress=progress,
    )
    started = time.perf_counter()
    data = DataDir(data_dir)
    # the corpus is read before the data directory is touched: a bad corpus leaves nothing behind
    settings = stored_settings(data.catalog_path).replace(
        window=dicom_window, fields=dicom_fields, allow_burned_in=allow_burned_in
    )
    parsed = read_corpus(corpus, dicom=HeaderReader(settings, lambda: key_for(data.root)))
    remote: contextlib.AbstractContextManager = contextlib.nullcontext(ray)
    if ray is not None:
        from . import ray_pipeline

        if isinstance(ray, ray_pipeline.RayOptions):  # a Ray session of this run's own
            remote = ray_pipeline.RayEmbedder(ray)
    with remote as embedder:
        report = _index(data, encoder, options, parsed, settings, embedder, head, label_field)
    report.seconds = time.perf_counter() - started
    return report


def _index(
    data: DataDir,
    encoder: Encoder,
    options: IndexOptions,
    parsed: Corpus,
    settings: DicomSettings,
    embedder: RayEmbedder | None,
    head: FitConfig | None,
    label_field: str | None,
) -> IndexReport:
    run = _IndexRun(data, encoder, options)
    try:
        run.dicom = update_settings(run.catalog, settings)
        run.report.skipped = parsed.skipped
        with ThreadPoolExecutor(
            max_workers=options.workers or max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="xmodal-decode"
        ) as pool:
            run.register(parsed, pool)
            if embedder is not None:  # texts and images through one actor pool (one model load)
                embedder.embed(run)
            else:
                run.embed_texts()
                run.embed_images(pool)
        run.write_snapshot(head or FitConfig(), label_field)
    finally:
        run.catalog.close()
    return run.report


class _IndexRun:
    """One run of :func:`index_corpus`, step by step, filling its report."""

    def __init__(self, data: DataDir, encoder: Encoder, options: IndexOptions):
        data.create()
        self.data, self.encoder, self.options = data, encoder, options
        self.catalog = Catalog(data.catalog_path)
        self.store = BaseStore(data.base, self.catalog)
        self.dicom = DicomSettings()
        self.dicom_key = key_for(data.root)
        self.report = IndexReport()
        self.report.removed_debris = [str(p) for p in self.store.clean() + data.clean()]
        self.catalog.bind_encoder(
            encoder.identity, model=encoder.spec.requested[0], pretrained=encoder.spec.requested[1]
        )

    def _bar(self, total: int, desc: str, unit: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.options.progress, file=sys.stderr)

    def register(self, parsed: Corpus, pool: ThreadPoolExecutor) -> None:
        """Catalog rows for every item (keyed by id and content hash) and every pair."""
        hashes = list(
            pool.map(
                lambda item: _hash_file(item.path) if item.modality == IMAGE else text_hash(item.text), parsed.items
            )
        )
        self.report.items = self.catalog.upsert_items(zip(parsed.items, hashes, strict=True))
        self.report.pairs_added = self.catalog.add_pairs(parsed.pairs)

    def embed_texts(self) -> None:
        """Encode the texts without a base vector, one committed shard at a time."""
        texts = self.catalog.pending(TEXT)
        batch_size = self.options.batch_size
        with self._bar(len(texts), "encoding texts", "text") as bar:
            for chunk in _batches(texts, self.options.shard_size):
                vectors = []
                for batch in _batches(chunk, batch_size):
                    vectors.append(self.encoder.encode_texts([r["text"] for r in batch]))
                    bar.update(len(batch))
                self.store.append(TEXT, [r["id"] for r in chunk], np.concatenate(vectors))
                self.report.embedded[TEXT] += len(chunk)

    def _prepare(self, row) -> tuple[str, torch.Tensor | None, str | None, str | None]:
        """Read and preprocess one image (in a worker thread): (id, tensor, error, blob). A
        DICOM file's de-identified copy is written under blobs/ (GetItems returns it)."""
        tensor, error, copy = prepare_image(self.encoder, row, self.dicom, self.dicom_key)
        if copy is None:
            return row["id"], tensor, error, None
        try:
            return row["id"], tensor, None, write_blob(self.data.root, copy)
        except OSError as exc:
            return row["id"], None, f"cannot read {row['source']}: {exc.strerror or 'unreadable'}", None

    def embed_images(self, pool: ThreadPoolExecutor) -> None:
        """Decode images in ``pool`` while the encoder runs batches; one shard per chunk."""
        images = self.catalog.pending(IMAGE)
        started = time.perf_counter()
        with self._bar(len(images), "encoding images", "img") as bar:
            for chunk in _batches(images, self.options.shard_size):
                ids, vectors = self._embed_image_chunk(chunk, pool, bar)
                if ids:
                    self.store.append(IMAGE, ids, np.concatenate(vectors))
                self.report.embedded[IMAGE] += len(ids)
        self.report.image_seconds = time.perf_counter() - started
        self.report.failed = self.catalog.failed(IMAGE)

    def _embed_image_chunk(self, chunk: list, pool: ThreadPoolExecutor, bar: tqdm) -> tuple[list[str], list]:
        """Encode one shard's worth of images; failures are recorded in the catalog."""
        ids: list[str] = []
        vectors: list[np.ndarray] = []
        failures: dict[str, str] = {}
        blobs: dict[str, str] = {}
        batch_ids: list[str] = []
        batch: list[torch.Tensor] = []
        prepared = _bounded_map(pool, self._prepare, chunk, depth=self.options.batch_size * 2)
        for item_id, tensor, error, blob in prepared:
            if error is not None:
                failures[item_id] = error
                bar.update(1)
                continue
            if blob is not None:
                blobs[item_id] = blob
            batch_ids.append(item_id)
            batch.append(tensor)
            if len(batch) == self.options.batch_size:
                vectors.append(self.encoder.encode_image_tensors(torch.stack(batch)))
                ids += batch_ids
                bar.update(len(batch_ids))
                batch_ids, batch = [], []
        if batch:
            vectors.append(self.encoder.encode_image_tensors(torch.stack(batch)))
            ids += batch_ids
            bar.update(len(batch_ids))
        if failures:
            self.catalog.set_failed(failures)
        if blobs:
            self.catalog.set_blobs(blobs)  # before the shard commit: an embedded DICOM item always has its copy
        return ids, vectors

    def _up_to_date(self, live: Snapshot | None, config: FitConfig) -> bool:
        """Nothing changed since ``live`` was written with the same head kind and index."""
        report = self.report
        changed = report.embedded[IMAGE] or report.embedded[TEXT] or report.items.get("changed") or report.pairs_added
        return (
            live is not None
            and not changed
            and live.manifest.head_kind == config.kind
            and self._same_index(live.manifest)
            and live.encoder == self.encoder.identity
        )

    def _same_index(self, manifest: Manifest) -> bool:
        """``manifest``'s indexes are what the options ask for: the same request, or (for
        ``auto``, on a snapshot made before it) the factories ``auto`` would choose now."""
        options = self.options
        if manifest.requested_factory == options.factory and manifest.memory_budget == options.memory_budget:
            return True
        if options.factory != ann.AUTO or manifest.factory_requested is not None:
            return False
        return all(
            manifest.modality_factory(m) == ann.choose_factory(n, manifest.dim, options.memory_budget)[0]
            for m, n in manifest.counts.items()
        )

    def write_snapshot(self, config: FitConfig, label_field: str | None) -> None:
        """Fit a head (an identity one while there are too few pairs) and write the snapshot,
        unless the live one is still up to date."""
        current = self.data.current_id()
        live = Snapshot(self.data.snapshots / current) if current else None
        if self._up_to_date(live, config):
            self.report.snapshot = live.manifest if live else None
            return
        train_pairs = self.catalog.count_pairs()["train"]
        if config.kind != "identity" and train_pairs < config.min_pairs:
            self.report.notes.append(
                f"only {train_pairs} train pairs (a {config.kind} head needs {config.min_pairs}): "
                "wrote an identity (zero-shot) head; add pairs and run `xmodal fit`"
            )
            config = FitConfig(kind="identity")
        manifest, fit_report = write_fitted(
            self.data,
            self.catalog,
            self.store,
            config,
            encoder=self.encoder.identity,
            factory=self.options.factory,
            memory_budget=self.options.memory_budget,
            parent_id=current,
            label_field=label_field,
            progress=self.options.progress,
        )
        if config.kind != "identity":
            self.report.notes.append(fit_report.summary())
        if manifest.metrics.get("feedback_pairs"):
            self.report.notes.append(f"the head also trained on {manifest.metrics['feedback_pairs']} feedback pairs")
        self.report.snapshot = manifest
        self.report.snapshot_written = True
