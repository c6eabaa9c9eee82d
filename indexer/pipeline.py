"""The index flow: corpus -> catalog + base shards -> head -> snapshot, idempotently.

Images are read, decoded and preprocessed in worker threads while the encoder runs
batches in the calling thread. Every ``shard_size`` items a base shard is written and
its rows committed to the catalog, so a run killed part way resumes where it stopped and
adds nothing twice.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from .catalog import Catalog, text_hash
from .corpus import IMAGE, TEXT, read_corpus
from .encoder import Encoder
from .errors import InvalidArgument, XmodalError
from .adapt import fit_from_catalog
from .heads import DEFAULT_HEAD
from .images import decode_image
from .snapshot import DEFAULT_FACTORY, DataDir, Snapshot, write_snapshot
from .store import BaseStore
from .train import FitConfig

DEFAULT_BATCH_SIZE = 64
DEFAULT_SHARD_SIZE = 1024


@dataclass
class IndexReport:
    items: dict = field(default_factory=dict)  # added / changed / unchanged
    pairs_added: int = 0
    embedded: dict = field(default_factory=lambda: {IMAGE: 0, TEXT: 0})
    failed: list = field(default_factory=list)  # (item id, reason) of images skipped
    removed_debris: list = field(default_factory=list)
    snapshot: dict | None = None
    snapshot_written: bool = False
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    image_seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"items: {self.items.get('added', 0)} added, {self.items.get('changed', 0)} changed, "
            f"{self.items.get('unchanged', 0)} unchanged; pairs added: {self.pairs_added}",
            f"embedded: {self.embedded[IMAGE]} images, {self.embedded[TEXT]} texts in {self.seconds:.1f} s"
            + (f" ({self.embedded[IMAGE] / self.image_seconds:.1f} images/s)" if self.embedded[IMAGE] and self.image_seconds else ""),
        ]
        if self.removed_debris:
            lines.append(f"removed {len(self.removed_debris)} leftover file(s) of an interrupted run")
        if self.failed:
            shown = ", ".join(item_id for item_id, _ in self.failed[:10])
            more = f" and {len(self.failed) - 10} more" if len(self.failed) > 10 else ""
            lines.append(f"skipped {len(self.failed)} undecodable image(s): {shown}{more} "
                         f"(first reason: {self.failed[0][1]})")
        lines.extend(self.notes)
        if self.snapshot:
            verb = "wrote" if self.snapshot_written else "up to date:"
            counts = self.snapshot["counts"]
            lines.append(f"{verb} snapshot {self.snapshot['id']} ({self.snapshot['head']['kind']} head, "
                         f"{counts[IMAGE]} images, {counts[TEXT]} texts, {self.snapshot['faiss_factory']})")
            metrics = self.snapshot.get("metrics") or {}
            for name, label in (("zero_shot", "zero-shot"), ("adapted", "adapted ")):
                for direction, m in sorted(metrics.get(name, {}).items(), reverse=True):
                    lines.append(f"  {label} {direction.replace('_to_', '->')} on {m['queries']} held-out queries: "
                                 f"R@1 {m['recall@1']:.3f}  R@5 {m['recall@5']:.3f}  R@10 {m['recall@10']:.3f}  "
                                 f"MRR {m['mrr']:.3f}")
        return "\n".join(lines)


def _hash_file(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return "unreadable:" + path  # the decode step reports it


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, depth: int) -> Iterator:
    """pool.map that keeps at most ``depth`` results in flight (bounded memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(seq: list, size: int) -> Iterator[list]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


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
    progress: bool = True,
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
        batch_size: encoder batch size.
        shard_size: items per base shard (and per crash-safe commit).
        workers: image decoding threads (default: cores, at most 4).
        factory: FAISS index factory string (inner product).
        progress: show progress bars on stderr.

    Raises:
        CorpusError: unreadable corpus. FailedPrecondition: another encoder built this
        directory. InvalidArgument: bad options.
    """
    if batch_size < 1 or shard_size < 1:
        raise InvalidArgument("batch_size and shard_size must be at least 1")
    started = time.perf_counter()
    report = IndexReport()
    parsed = read_corpus(corpus)
    data = DataDir(data_dir)
    data.root.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(data.catalog_path)
    store = BaseStore(data.base, catalog)
    head = head or FitConfig(kind=DEFAULT_HEAD)
    report.removed_debris = [str(p) for p in store.clean() + data.clean()]
    catalog.bind_encoder(encoder.identity, model=encoder.spec.requested[0], pretrained=encoder.spec.requested[1])
    workers = workers or max(1, min(4, os.cpu_count() or 1))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xmodal-decode") as pool:
        hashes = list(pool.map(
            lambda item: _hash_file(item.source) if item.modality == IMAGE else text_hash(item.text),
            parsed.items))
        report.items = catalog.upsert_items(zip(parsed.items, hashes))
        report.pairs_added = catalog.add_pairs(parsed.pairs)

        texts = catalog.pending(TEXT)
        with tqdm(total=len(texts), desc="encoding texts", unit="text", disable=not progress, file=sys.stderr) as bar:
            for chunk in _batches(texts, shard_size):
                vectors = [encoder.encode_texts([r["text"] for r in batch]) for batch in _batches(chunk, batch_size)]
                for batch in _batches(chunk, batch_size):
                    bar.update(len(batch))
                store.append(TEXT, [r["id"] for r in chunk], np.concatenate(vectors))
                report.embedded[TEXT] += len(chunk)

        images = catalog.pending(IMAGE)
        image_started = time.perf_counter()

        def prepare(row):
            try:
                with open(row["source"], "rb") as handle:
                    data_bytes = handle.read()
                return row["id"], encoder.image_tensor(decode_image(data_bytes)), None
            except OSError as exc:
                return row["id"], None, f"cannot read {row['source']}: {exc.strerror or exc}"
            except XmodalError as exc:
                return row["id"], None, str(exc)

        with tqdm(total=len(images), desc="encoding images", unit="img", disable=not progress, file=sys.stderr) as bar:
            for chunk in _batches(images, shard_size):
                ids: list[str] = []
                vectors = []
                failures: dict[str, str] = {}
                batch_ids: list[str] = []
                batch_tensors: list[torch.Tensor] = []
                for item_id, tensor, error in _bounded_map(pool, prepare, chunk, depth=batch_size * 2):
                    if error is not None:
                        failures[item_id] = error
                        bar.update(1)
                        continue
                    batch_ids.append(item_id)
                    batch_tensors.append(tensor)
                    if len(batch_tensors) == batch_size:
                        vectors.append(encoder.encode_image_tensors(torch.stack(batch_tensors)))
                        ids += batch_ids
                        bar.update(len(batch_ids))
                        batch_ids, batch_tensors = [], []
                if batch_tensors:
                    vectors.append(encoder.encode_image_tensors(torch.stack(batch_tensors)))
                    ids += batch_ids
                    bar.update(len(batch_ids))
                if failures:
                    catalog.set_failed(failures)
                if ids:
                    store.append(IMAGE, ids, np.concatenate(vectors))
                report.embedded[IMAGE] += len(ids)
        report.image_seconds = time.perf_counter() - image_started

    report.failed = catalog.failed(IMAGE)
    changed = report.embedded[IMAGE] or report.embedded[TEXT] or report.items.get("changed") or report.pairs_added
    current = data.current_id()
    live = Snapshot(data.snapshots / current) if current else None
    if live is not None and not changed and live.manifest["head"]["kind"] == head.kind \
            and live.manifest["faiss_factory"] == factory and live.encoder == encoder.identity:
        report.snapshot = live.manifest
    else:
        config = head
        train_pairs = catalog.count_pairs()["train"]
        if config.kind != "identity" and train_pairs < config.min_pairs:
            report.notes.append(f"only {train_pairs} train pairs (a {config.kind} head needs {config.min_pairs}): "
                                "wrote an identity (zero-shot) head; add pairs and run `xmodal fit`")
            config = FitConfig(kind="identity")
        fitted, fit_report, metrics = fit_from_catalog(catalog, store, config, label_field=label_field,
                                                       progress=progress)
        if fitted.kind != "identity":
            report.notes.append(fit_report.summary())
        if metrics.get("feedback_pairs"):
            report.notes.append(f"the head also trained on {metrics['feedback_pairs']} feedback pairs")
        report.snapshot = write_snapshot(data, catalog, store, fitted, encoder=encoder.identity, factory=factory,
                                         parent_id=current, metrics=metrics)
        report.snapshot_written = True
    report.seconds = time.perf_counter() - started
    catalog.close()
    return report

