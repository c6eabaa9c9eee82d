"""``xmodal index --ray``: reading, decoding and encoding on a Ray cluster.

The work that grows with the corpus runs as Ray Data ``map_batches`` over a pool of actors,
each holding the frozen encoder (one GPU per actor where the cluster has GPUs). The driver
(the ``xmodal index`` process) keeps everything that must happen once: the catalog
commits, the base-store writes, the de-identified copies under blobs/ and the resume
logic. It sends the items without a base vector, receives ``(id, vector, error, copy)``
per item in the order it sent them, and commits one base shard per ``shard_size`` items
exactly as the local pipeline does, so both paths write the same shards.

Failures: an actor's work has no side effects (it only reads files and returns arrays),
so Ray Data may restart a killed actor and retry its batches (``max_restarts`` and
``max_task_retries`` are unlimited); if the whole dataset fails anyway (a node lost with
its objects), the driver starts a new one over the items still without a vector, up to
``RayOptions.attempts`` times. A killed driver resumes like a local run: committed shards
stay, the rest is sent again.

Ray is an optional extra (``pip install 'xmodal[ray]'``); this module imports it only when
a run asks for it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import errors
from .clinical import DicomSettings
from .corpus import IMAGE, TEXT
from .errors import FailedPrecondition, InvalidArgument, XmodalError
from .store import write_blob

if TYPE_CHECKING:
    from .pipeline import _IndexRun

LOG = logging.getLogger(__name__)

AUTO = "auto"
# Items per Ray dataset: bounds the driver's memory and the dataset's block count; each
# window starts a fresh actor pool (one model load per actor, seconds against the window's
# hours on CPUs or minutes on GPUs).
WINDOW = 262_144
INSTALL_HINT = "pip install 'xmodal[ray]'"


@dataclass(kw_only=True)
class RayOptions:
    """Where and how wide ``xmodal index --ray`` runs. Validated on creation."""

    address: str = AUTO  # "auto": ray.init()'s choice (RAY_ADDRESS, a cluster started here, else a local Ray)
    workers: int | None = None  # encoder actors (default: one per GPU, else one per core as memory allows)
    cpus_per_worker: float | None = None  # CPUs each actor reserves (default: its node's share)
    attempts: int = 3  # whole-dataset runs before giving up, on top of Ray's own retries
    allow_pickle: bool = False  # the encoder was loaded with allow_pickle: the actors load it the same way

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise InvalidArgument("--ray: the address is empty; give a cluster's head as host:port, or auto")
        if self.workers is not None and self.workers < 1:
            raise InvalidArgument(f"--ray-workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise InvalidArgument(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")
        if self.attempts < 1:
            raise InvalidArgument(f"attempts must be at least 1, got {self.attempts}")


def import_ray() -> Any:
    """The ``ray`` module, or FailedPrecondition naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (the Data library is the part xmodal uses)
    except ImportError:
        raise FailedPrecondition(f"--ray needs Ray Data, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class _Layout:
    """The actor pool's shape on the cluster it runs on."""

    workers: int
    cpus: float
    gpus: float
    threads: int  # torch threads (and decoding threads) per actor


# What one CPU encoder actor holds besides its model's weights: a Python process with torch,
# a batch's activations and the decoded images (ViT-B-32, 605 MB of weights, peaked at
# 1.5 GB with a batch of 32 on one thread).
ACTOR_OVERHEAD_BYTES = 1 << 30
WEIGHTS_FACTOR = 1.5  # the weights, plus the state dict while a checkpoint loads


def actor_bytes(model: torch.nn.Module) -> int:
    """A CPU encoder actor's memory, estimated from its model's weights."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(WEIGHTS_FACTOR * weights) + ACTOR_OVERHEAD_BYTES


def _layout(ray: Any, options: RayOptions, memory_per_actor: int = ACTOR_OVERHEAD_BYTES) -> _Layout:
    """The pool: one actor per GPU on a GPU cluster; on CPUs, one actor per core of each node,
    as many as the node's memory (Ray's ``memory`` resource) holds at ``memory_per_actor``
    each. On CPUs small actors measured best: an actor of 1 CPU runs one torch thread and
    its node's actors decode and encode side by side, where one actor of all the cores
    spends part of each batch in torch's thread synchronisation."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    resources = [n.get("Resources", {}) for n in nodes]
    node_cpus = [float(r.get("CPU", 0)) for r in resources if float(r.get("CPU", 0)) > 0]
    node_memory = [float(r.get("memory", 0)) for r in resources if float(r.get("CPU", 0)) > 0]
    if not node_cpus:  # a head may offer no CPUs
        node_cpus, node_memory = [float(os.cpu_count() or 1)], [0.0]
    total_gpus = float(ray.cluster_resources().get("GPU", 0))
    if total_gpus >= 1:
        workers = options.workers or int(total_gpus)
        per_node = max(1, math.ceil(workers / max(1, len(nodes))))
        # an actor asking for more CPUs than a node has would never be placed
        cpus = options.cpus_per_worker or max(1.0, math.floor(min(node_cpus) / per_node))
        return _Layout(workers=workers, cpus=cpus, gpus=1.0, threads=max(1, int(cpus)))
    if options.workers:
        per_node = max(1, math.ceil(options.workers / len(node_cpus)))
        cpus = options.cpus_per_worker or max(1.0, math.floor(min(node_cpus) / per_node))
        return _Layout(workers=options.workers, cpus=cpus, gpus=0.0, threads=max(1, int(cpus)))
    # actors each node can hold: one per core, fewer where memory is short (never none)
    fits = [
        max(1, min(int(c), int(m // memory_per_actor) if m else int(c)))
        for c, m in zip(node_cpus, node_memory, strict=True)
    ]
    cpus = options.cpus_per_worker or max(
        1.0, float(min(math.floor(c / k) for c, k in zip(node_cpus, fits, strict=True)))
    )
    workers = sum(max(1, min(k, math.floor(c / cpus))) for c, k in zip(node_cpus, fits, strict=True))
    return _Layout(workers=workers, cpus=cpus, gpus=0.0, threads=max(1, int(cpus)))


class _EncoderActor:
    """One actor of the pool: loads the frozen encoder once, then turns batches of items
    into base vectors. Pure: it reads files and returns arrays, so a retried batch is
    harmless. DICOM files go through the same ``read_clinical`` as a local run; their
    de-identified copies come back as bytes for the driver to write."""

    def __init__(
        self,
        *,
        model: str,
        pretrained: str | None,
        identity: str,
        allow_pickle: bool,
        threads: int,
        device: str | None,
        dicom: DicomSettings,
    ):
        from .encoder import load_encoder

        kwargs: dict[str, Any] = {"threads": threads, "allow_pickle": allow_pickle}
        if device is not None:
            kwargs["device"] = device
        self.encoder = load_encoder(model, pretrained, **kwargs)
        if self.encoder.identity != identity:
            raise FailedPrecondition(
                f"a Ray worker loaded {self.encoder.identity}, not {identity}: install the same model files on "
                "every node (a local path must hold the same file everywhere)"
            )
        self.dicom = dicom
        # read_clinical derives ids with this key; the embed step does not use them, so the
        # data directory's own key never leaves the driver
        self.key = os.urandom(32)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="xmodal-ray-decode")
        self.batches = 0
        self.counting = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Texts and images of one batch -> one result row per item, in the same order:
        id, vector (zeros where the item failed), error ("" if none), DICOM copy (b"")."""
        from .pipeline import prepare_image

        with self.counting:  # two batches may run at once (CALLS_PER_ACTOR)
            self.batches += 1
            number = self.batches
        if os.environ.get(TEST_HOOK):
            _wait_to_be_killed(os.environ[TEST_HOOK], number)
        ids = [str(i) for i in batch["id"]]
        modalities = [str(m) for m in batch["modality"]]
        errors = [""] * len(ids)
        copies = [b""] * len(ids)
        vectors = np.zeros((len(ids), self.encoder.dim), np.float32)
        texts = [i for i, m in enumerate(modalities) if m == TEXT]
        if texts:
            vectors[texts] = self.encoder.encode_texts([str(batch["text"][i]) for i in texts])
        images = [i for i, m in enumerate(modalities) if m == IMAGE]
        rows = [{"path": str(batch["path"][i]) or None, "source": str(batch["source"][i])} for i in images]
        prepared = list(self.pool.map(lambda row: prepare_image(self.encoder, row, self.dicom, self.key), rows))
        good, tensors = [], []
        for i, (tensor, error, copy) in zip(images, prepared, strict=True):
            errors[i], copies[i] = error or "", copy or b""
            if tensor is not None:
                good.append(i)
                tensors.append(tensor)
        if good:
            vectors[good] = self.encoder.encode_image_tensors(torch.stack(tensors))
        return {
            "id": np.array(ids, dtype=object),
            "vector": vectors,
            "error": np.array(errors, dtype=object),
            "copy": np.array(copies, dtype=object),
        }


TEST_HOOK = "XMODAL_RAY_TEST_KILL"


def _wait_to_be_killed(folder: str, batches: int) -> None:
    """Tests: on its second batch, the first actor to get there says so (``<pid>.busy``
    in ``folder``) and waits for the test to kill it mid-batch; once the test has left
    ``killed`` there, every actor (the restarted one too) goes on."""
    killed = os.path.join(folder, "killed")
    if batches != 2 or os.path.exists(killed):
        return
    with open(os.path.join(folder, f"{os.getpid()}.busy"), "w") as handle:
        handle.write(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not os.path.exists(killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the kill is on its way to whichever actor the test chose


CALLS_PER_ACTOR = 2  # batches in flight in one actor: one decodes while the other encodes


def _actor_pool(ray: Any, workers: int) -> Any:
    """The actor pool: each actor runs two batches at once, so that the decoding of one
    overlaps the forward pass of the other (the encoder's lock keeps one forward at a time),
    as the local pipeline's decoding threads do. One batch at a time, an actor alternated
    decode and encode: on 2 cores one actor ran at 0.86x the local pipeline once started,
    0.88-0.92x with two (docs/benchmarks.md). A Ray Data without these options runs one
    batch at a time per actor."""
    parameters = inspect.signature(ray.data.ActorPoolStrategy).parameters
    if "enable_true_multi_threading" in parameters and "max_concurrent_calls_per_actor" in parameters:
        return ray.data.ActorPoolStrategy(
            size=workers, max_concurrent_calls_per_actor=CALLS_PER_ACTOR, enable_true_multi_threading=True
        )
    return ray.data.ActorPoolStrategy(size=workers)


def _blocks_arg() -> str:
    import ray.data

    parameters = inspect.signature(ray.data.from_items).parameters
    return "override_num_blocks" if "override_num_blocks" in parameters else "parallelism"  # Ray < 2.10


def _supports_device() -> bool:
    from .encoder import load_encoder

    return "device" in inspect.signature(load_encoder).parameters


@contextlib.contextmanager
def _ordered(ray: Any) -> Iterator[None]:
    """Ray Data returns batches in the order they were sent (so shards match a local run)
    and keeps its own progress bars to itself; the caller's context is restored after."""
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved


@dataclass
class RayTimings:
    """Where the last embed step's time went (bench/ray_index.py reports them)."""

    items: int = 0
    seconds: float = 0.0  # the whole step: actor start-up, encoding, the driver's commits
    first_result: float = 0.0  # until the first batch came back (actor start-up, model load, one batch)


class RayEmbedder:
    """The embed step of a run on Ray: ``index_corpus(..., ray=RayOptions(...))`` makes one
    for the run (connecting to Ray, or starting a local Ray, and shutting down what it
    started); a caller that runs several indexings may enter one itself and pass it."""

    def __init__(self, options: RayOptions):
        self.options = options
        self.ray = import_ray()
        self.started_ray = False
        self.timings = RayTimings()

    def __enter__(self) -> RayEmbedder:
        ray = self.ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            if self.options.address != AUTO:
                kwargs["address"] = self.options.address
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise FailedPrecondition(
                    f"--ray {self.options.address}: cannot start or reach Ray ({str(exc).splitlines()[0][:200]})"
                ) from None
            self.started_ray = True
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        self.blocks_arg = _blocks_arg()
        self.layout = _layout(ray, self.options)  # refined in embed(), once the model is known
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.started_ray:
            self.ray.shutdown()

    def describe(self) -> str:
        layout = self.layout
        kind = f"{layout.gpus:g} GPU + {layout.cpus:g} CPU" if layout.gpus else f"{layout.cpus:g} CPU"
        return f"Ray: {layout.workers} encoder actor(s) of {kind} each"

    def embed(self, run: _IndexRun) -> None:
        """The run's embed step: every text, then every image, without a base vector yet,
        through one actor pool (the model is loaded once per actor). Items committed by an
        earlier attempt (or an earlier, killed run) are not sent again."""
        ray = self.ray
        self.layout = _layout(ray, self.options, actor_bytes(run.encoder.model))
        LOG.info("%s", self.describe())
        run.report.notes.append(self.describe() + " (texts and images share them: images/s counts both)")
        self.timings = RayTimings()
        started = time.perf_counter()
        for attempt in range(1, self.options.attempts + 1):
            rows = [(TEXT, r) for r in run.catalog.pending(TEXT)] + [(IMAGE, r) for r in run.catalog.pending(IMAGE)]
            if not rows:
                break
            try:
                for start in range(0, len(rows), WINDOW):
                    self._embed_rows(run, rows[start : start + WINDOW])
                break
            except ray.exceptions.RayError as exc:
                error = _xmodal_error(exc)
                if error is not None:  # xmodal refused in a worker: running again would fail the same way
                    raise error from None
                if attempt == self.options.attempts:
                    raise
                LOG.warning(
                    "Ray run %d of %d failed (%s); sending the uncommitted items again",
                    attempt,
                    self.options.attempts,
                    str(exc).splitlines()[0][:200],
                )
        self.timings.seconds = time.perf_counter() - started
        run.report.image_seconds = self.timings.seconds
        run.report.failed = run.catalog.failed(IMAGE)

    def _dataset(self, run: _IndexRun, rows: Sequence[tuple[str, Any]]) -> Any:
        ray, layout, encoder = self.ray, self.layout, run.encoder
        items = [
            {
                "id": r["id"],
                "modality": modality,
                "text": (r["text"] or "") if modality == TEXT else "",
                "path": r["path"] or "",
                "source": r["source"] or "",
            }
            for modality, r in rows
        ]
        model, pretrained = encoder.spec.requested
        device = "cuda" if layout.gpus and _supports_device() else None
        # Ray Data restarts a killed actor and retries its batches (max_restarts and
        # max_task_retries default to -1 for actor pools): the work is idempotent.
        # One block per encoder batch: results reach the driver batch by batch (a block is
        # returned whole), the actors share the work evenly, and a killed actor loses one batch
        blocks = math.ceil(len(items) / run.options.batch_size)
        source = ray.data.from_items(items, **{self.blocks_arg: blocks})
        return source.map_batches(
            _EncoderActor,
            fn_constructor_kwargs={
                "model": model,
                "pretrained": pretrained,
                "identity": encoder.identity,
                "allow_pickle": self.options.allow_pickle,
                "threads": layout.threads,
                "device": device,
                "dicom": run.dicom,
            },
            batch_size=run.options.batch_size,
            batch_format="numpy",
            compute=_actor_pool(ray, layout.workers),
            num_cpus=layout.cpus,
            num_gpus=layout.gpus or None,
        )

    def _embed_rows(self, run: _IndexRun, rows: Sequence[tuple[str, Any]]) -> None:
        """One dataset over ``rows`` (texts first): results come back in the order sent, and
        a shard is committed per ``shard_size`` items of a modality, as a local run does."""
        shard_size = run.options.shard_size
        chunk = _Chunk(rows[0][0])
        started = time.perf_counter()
        with run._bar(len(rows), "encoding (Ray)", "item") as bar, _ordered(self.ray):
            position = 0
            for batch in self._dataset(run, rows).iter_batches(batch_size=None, batch_format="numpy"):
                if not self.timings.first_result:
                    self.timings.first_result = time.perf_counter() - started
                for item_id, vector, error, copy in zip(
                    batch["id"], batch["vector"], batch["error"], batch["copy"], strict=True
                ):
                    modality, row = rows[position]
                    if item_id != row["id"]:
                        raise XmodalError(f"Ray returned item {item_id!r} where {row['id']!r} was due")
                    if modality != chunk.modality or len(chunk) == shard_size:
                        chunk.commit(run)
                        chunk = _Chunk(modality)
                    chunk.add(run, str(item_id), vector, str(error), bytes(copy))
                    position += 1
                    bar.update(1)
            if position != len(rows):
                raise XmodalError(f"Ray returned {position} of {len(rows)} items")
            chunk.commit(run)
        self.timings.items += position


class _Chunk:
    """One shard's worth of results, committed the way the local pipeline commits them."""

    def __init__(self, modality: str) -> None:
        self.modality = modality
        self.ids: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.failures: dict[str, str] = {}
        self.blobs: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.ids) + len(self.failures)

    def add(self, run: _IndexRun, item_id: str, vector: np.ndarray, error: str, copy: bytes) -> None:
        if error:
            self.failures[item_id] = error
            return
        if copy:
            self.blobs[item_id] = write_blob(run.data.root, copy)
        self.ids.append(item_id)
        self.vectors.append(vector)

    def commit(self, run: _IndexRun) -> None:
        modality = self.modality
        if self.failures:
            run.catalog.set_failed(self.failures)
        if self.blobs:
            run.catalog.set_blobs(self.blobs)  # before the shard commit: an embedded DICOM item always has its copy
        if self.ids:
            run.store.append(modality, self.ids, np.stack(self.vectors))
        run.report.embedded[modality] += len(self.ids)


def _xmodal_error(exc: Exception) -> XmodalError | None:
    """The xmodal error a worker raised (a wrong model on a node...), out of the Ray error
    that carries it: a task's error keeps the exception, a dead actor only its text."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, XmodalError):
        return cause
    found = re.search(r"xmodal\.indexer\.errors\.(\w+): ([^\n]*)", str(exc))
    kind = getattr(errors, found.group(1), None) if found else None
    if found and isinstance(kind, type) and issubclass(kind, XmodalError):
        return kind(found.group(2))
    return None
