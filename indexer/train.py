"""Fitting heads on cached base embeddings, on the CPU.

Mini-batches of (image, text) base-vector pairs, AdamW with weight decay, symmetric
InfoNCE with a learnable temperature (plus optional label losses), early stopping on
validation recall@10 checked each epoch (epoch 0 is the untrained or warm-start head,
so a fit never returns a head that validates worse than where it started), fixed seeds.

Two pulls toward zero-shot keep small corpora from overfitting: a penalty on the residual
``||g(x)||^2`` weighted ``norm_penalty / N`` for N training pairs (it grows as pairs get
few, as ProLIP's 1/N), and, when old-style items are given as ``replay``, a distillation
term keeping their projections where the teacher (the live head, or zero-shot) put them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .catalog import Catalog
from .corpus import IMAGE, TEXT
from .errors import InvalidArgument
from .evaluate import retrieval_metrics
from .heads import DEFAULT_HEAD, DEFAULT_HIDDEN, HEAD_KINDS, TRAINABLE_KINDS, Head, PCAProjection
from .losses import InfoNCELoss, pairwise_label_loss, paper_pairwise_loss, supcon_loss
from .store import BaseStore
from .vectors import Vectors, base_dim, load_vectors

MIN_PAIRS = 32


@dataclass(kw_only=True)
class FitConfig:
    """How to fit a head. Validated on creation."""

    kind: str = DEFAULT_HEAD
    dim_out: int | None = None
    hidden: int = DEFAULT_HIDDEN
    epochs: int = 200
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-2
    patience: int = 15
    temperature: float = 0.07
    learn_temperature: bool = True
    pairwise_weight: float = 0.0  # label-aware pairwise loss (needs labels)
    pairwise_margin: float = 0.2
    supcon_weight: float = 0.0  # supervised contrastive loss (needs labels)
    supcon_temperature: float = 0.1
    hard_negative_weight: float = 4.0  # each item marked wrong (feedback) counts as this many negatives
    min_pairs: int = MIN_PAIRS
    max_seconds: float | None = 900.0
    seed: int = 0
    # The gate (xmodal.indexer.gate): a head goes live only when its validation gain over the
    # live head is above the noise at this confidence (a paired test, Bonferroni-corrected
    # over the blends tried); otherwise the live head (zero-shot at first) stays.
    confidence: float = 0.95
    blends: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # a in normalize(x + a g(x)), chosen on validation
    norm_penalty: float = 10.0  # weight of ||g(x)||^2 is norm_penalty / (training pairs)
    cv_below: int = 200  # fewer validation pairs than this: cross-validate a new head instead
    cv_folds: int = 5
    replay_weight: float = 4.0  # distillation on replayed old-style embeddings (4 kept the old style; see docs)
    paper_temperature: float = 0.1  # the paper head's pairwise label loss

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise InvalidArgument(f"unknown head kind {self.kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        for name in ("epochs", "batch_size", "hidden", "min_pairs"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise InvalidArgument("batch_size must be at least 2 (contrastive batches need negatives)")
        for name in ("lr", "temperature", "supcon_temperature", "hard_negative_weight"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "weight_decay",
            "pairwise_weight",
            "supcon_weight",
            "patience",
            "norm_penalty",
            "cv_below",
            "replay_weight",
        ):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 < self.confidence < 1:
            raise InvalidArgument(f"confidence must be in (0, 1), e.g. 0.95; got {self.confidence}")
        self.blends = tuple(float(b) for b in self.blends)
        if not self.blends or not all(0 < b <= 1 for b in self.blends):
            raise InvalidArgument(f"blends must be values in (0, 1], got {self.blends}")
        if self.cv_folds < 2:
            raise InvalidArgument(f"cv_folds must be at least 2, got {self.cv_folds}")
        if not self.paper_temperature > 0:
            raise InvalidArgument(f"paper_temperature must be positive, got {self.paper_temperature}")


@dataclass
class PairSet:
    """Aligned pairs of base vectors: row i of ``image`` goes with row i of ``text``.

    ``image_keys``/``text_keys`` group rows that share an image / an identical caption
    (they count as positives of each other). Pair sets built from a catalog use
    :func:`item_key`, one key space for all of them, so the same image in corpus pairs and
    in feedback pairs is one group. ``labels`` (-1 = none) and ``weights`` are optional.

    Hard negatives (optional, from feedback's irrelevant ids): ``hard`` holds base vectors,
    ``hard_rows`` the pair row each one answers wrongly, and ``hard_is_image`` whether it is
    an image (a wrong answer to the row's text) or a text (a wrong answer to its image).
    """

    image: np.ndarray
    text: np.ndarray
    image_keys: np.ndarray
    text_keys: np.ndarray
    labels: np.ndarray | None = None
    weights: np.ndarray | None = None
    hard: np.ndarray | None = None
    hard_rows: np.ndarray | None = None
    hard_is_image: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.image)
        if len(self.text) != n or len(self.image_keys) != n or len(self.text_keys) != n:
            raise InvalidArgument("a PairSet needs as many texts and keys as images")
        for name in ("labels", "weights"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise InvalidArgument(f"{name} must have one entry per pair")
        if self.weights is not None and not np.all(np.isfinite(self.weights) & (self.weights >= 0)):
            raise InvalidArgument("pair weights must be finite and non-negative")
        hard = (self.hard, self.hard_rows, self.hard_is_image)
        if any(v is not None for v in hard):
            if any(v is None for v in hard) or not len(self.hard) == len(self.hard_rows) == len(self.hard_is_image):
                raise InvalidArgument("hard negatives need vectors, rows and modalities of one length")
            if len(self.hard_rows) and (self.hard_rows.min() < 0 or self.hard_rows.max() >= n):
                raise InvalidArgument("a hard negative points at a pair row that does not exist")

    def __len__(self) -> int:
        return len(self.image)

    @property
    def n_hard(self) -> int:
        return 0 if self.hard is None else len(self.hard)

    def subset(self, rows: np.ndarray) -> PairSet:
        rows = np.asarray(rows)
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        hard: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None] = (None, None, None)
        if self.hard is not None and self.hard_rows is not None and self.hard_is_image is not None:
            where = np.full(len(self), -1, np.int64)
            where[rows] = np.arange(len(rows))
            moved = where[self.hard_rows]
            keep = moved >= 0
            hard = (self.hard[keep], moved[keep], self.hard_is_image[keep])
        return PairSet(
            self.image[rows],
            self.text[rows],
            self.image_keys[rows],
            self.text_keys[rows],
            pick(self.labels),
            pick(self.weights),
            *hard,
        )

    @staticmethod
    def concat(parts: list[PairSet]) -> PairSet:
        """Concatenate pair sets. Keys are kept as they are: build the parts in one key
        space (:func:`item_key`), so that an image or caption shared by two parts stays one
        group instead of becoming its own negative."""
        labels = (
            None
            if all(p.labels is None for p in parts)
            else np.concatenate([p.labels if p.labels is not None else np.full(len(p), -1) for p in parts])
        )
        weights = (
            None
            if all(p.weights is None for p in parts)
            else np.concatenate([p.weights if p.weights is not None else np.ones(len(p), np.float32) for p in parts])
        )
        hard: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None] = (None, None, None)
        if any(p.n_hard for p in parts):
            dim = parts[0].image.shape[1]
            offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
            hard = (
                np.concatenate([p.hard if p.n_hard else np.zeros((0, dim), np.float32) for p in parts]),
                np.concatenate(
                    [
                        p.hard_rows + o if p.n_hard else np.zeros(0, np.int64)
                        for p, o in zip(parts, offsets, strict=True)
                    ]
                ),
                np.concatenate([p.hard_is_image if p.n_hard else np.zeros(0, bool) for p in parts]),
            )
        return PairSet(
            np.concatenate([p.image for p in parts]),
            np.concatenate([p.text for p in parts]),
            np.concatenate([p.image_keys for p in parts]),
            np.concatenate([p.text_keys for p in parts]),
            labels,
            weights,
            *hard,
        )


def item_key(kind: str, value: str) -> int:
    """A grouping key for :class:`PairSet`, equal wherever the same thing appears:
    ``item_key("image", image_id)``, ``item_key("text", content_hash)``."""
    return int.from_bytes(hashlib.sha256(f"{kind}:{value}".encode()).digest()[:8], "big") >> 1


@dataclass
class FitReport:
    kind: str
    pairs: int
    epochs: int = 0
    best_epoch: int = 0
    seconds: float = 0.0
    stopped: str = ""  # "early", "epochs", "time", "no training"
    val_before: float | None = None
    val_best: float | None = None
    temperature: float | None = None
    curve: list = field(default_factory=list)  # [{"epoch", "loss", "val_recall@10"}]
    gate: str = ""  # what the gate decided, and why (new heads)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gate = f"; {self.gate}" if self.gate else ""
        if self.val_before is None:
            return f"{self.kind} head fitted on {self.pairs} pairs in {self.seconds:.1f} s{gate}"
        return (
            f"{self.kind} head: {self.pairs} pairs, {self.epochs} epochs ({self.stopped}), best epoch "
            f"{self.best_epoch}, {self.seconds:.1f} s; validation recall@10 {self.val_before:.3f} -> "
            f"{self.val_best:.3f}{gate}"
        )


def relevance(pairs: PairSet) -> list[set[int]]:
    """For row i: the rows that share its image or its caption (all right answers)."""
    return [
        set(
            np.flatnonzero((pairs.image_keys == pairs.image_keys[i]) | (pairs.text_keys == pairs.text_keys[i])).tolist()
        )
        for i in range(len(pairs))
    ]


def validation_recall(head: Head, pairs: PairSet, k: int = 10, relevant: list[set[int]] | None = None) -> float:
    """Mean of text->image and image->text recall@k over a pair set (galleries = its rows;
    queries go through their query adapters, galleries do not)."""
    relevant = relevant if relevant is not None else relevance(pairs)
    t2i = retrieval_metrics(
        head.project(TEXT, pairs.text, query=True), head.project(IMAGE, pairs.image), relevant, ks=(k,)
    )[f"recall@{k}"]
    i2t = retrieval_metrics(
        head.project(IMAGE, pairs.image, query=True), head.project(TEXT, pairs.text), relevant, ks=(k,)
    )[f"recall@{k}"]
    return (t2i + i2t) / 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit_head(
    train: PairSet,
    val: PairSet | None,
    config: FitConfig,
    *,
    warm_start: Head | None = None,
    progress: bool = False,
    score: Callable[[Head], float | None] | None = None,
    replay: dict[str, np.ndarray] | None = None,
    teacher: Head | None = None,
) -> tuple[Head, FitReport]:
    """Fit a head of ``config.kind`` on ``train``; early-stop on ``val``.

    Args:
        train: training pairs (base vectors).
        val: validation pairs; without them the head trains for ``config.epochs``.
        config: kind, sizes, optimiser and loss settings.
        warm_start: a head of the same kind and sizes to start from (refits).
        progress: show a progress bar over epochs.
        score: optional ``score(head) -> float`` to early-stop on instead of ``val``'s
            recall@10 (refits use their gate's own figure).
        replay: base vectors of old-style items by modality (a mixed archive): their
            projections are distilled toward ``teacher``'s (``config.replay_weight``).
        teacher: the head whose projections of ``replay`` to keep (default zero-shot).

    Returns:
        (head, report). The head is in eval mode; a residual head trains and returns at
        blend 1 (the gate chooses the blend).

    Raises:
        InvalidArgument: fewer than ``config.min_pairs`` training pairs, a warm start of
            another kind or size, label losses without labels.
    """
    started = time.perf_counter()
    seed_everything(config.seed)
    dim_in = int(train.image.shape[1])  # an empty pair set still has the base dimension
    report = FitReport(kind=config.kind, pairs=len(train))
    options: dict = {"hidden": config.hidden} if config.kind in ("mlp", "shared") else {}
    if config.kind == "identity":
        head = Head("identity", dim_in or (warm_start.dim_in if warm_start else 1))
        report.stopped = "no training"
        report.seconds = time.perf_counter() - started
        return head.eval(), report
    if len(train) < config.min_pairs:
        raise InvalidArgument(
            f"a {config.kind} head needs at least {config.min_pairs} training pairs, got "
            f"{len(train)}: add pairs, or use --head identity"
        )
    head = Head(config.kind, dim_in, config.dim_out, options)
    if config.kind == "pca":
        pca = head.projections["shared"]
        if not isinstance(pca, PCAProjection):
            raise InvalidArgument("a pca head projects through one shared PCAProjection")
        pca.fit(np.concatenate([train.image, train.text]))
        report.stopped = "no training"
        report.seconds = time.perf_counter() - started
        return head.eval(), report
    if warm_start is not None:
        if _unblended(warm_start.config) != head.config:
            raise InvalidArgument(f"cannot warm-start a {head.config} head from a {warm_start.config} head")
        head.load_state_dict(warm_start.state_dict())  # trained at blend 1, whatever the live blend
    elif head.dim_out != dim_in and config.kind != "paper":
        head.init_skip_from_pca(np.concatenate([train.image, train.text]))
    needs_labels = config.pairwise_weight or config.supcon_weight or config.kind == "paper"
    if needs_labels and (train.labels is None or (train.labels < 0).all()):
        raise InvalidArgument(
            "label losses need labels (so does the paper head): give items a label in their metadata (--label-field)"
        )
    loop = _TrainingLoop(head, list(head.parameters()), train, val, config, None, score)
    if replay:
        loop.distil(replay, teacher or Head("identity", dim_in))
    loop.run(report, started, progress)
    return head.eval(), report


def _unblended(config: dict) -> dict:
    options = {k: v for k, v in config["options"].items() if k != "blend"}
    return {**config, "options": options}


def fit_query_adapter(
    live: Head,
    modality: str,
    train: PairSet,
    val: PairSet | None,
    config: FitConfig,
    *,
    progress: bool = False,
    score: Callable[[Head], float | None] | None = None,
) -> tuple[Head, FitReport]:
    """Train only a query-side adapter for ``modality`` on top of a frozen ``live`` head
    (warm-started from its adapter, if it has one). Documents projected by ``live`` stay
    valid for the result, so its indexes can be reused as they are.

    Returns:
        (a new head: ``live``'s projections plus the trained adapter, report)
    """
    started = time.perf_counter()
    seed_everything(config.seed)
    report = FitReport(kind=f"{live.kind}+{modality}-query-adapter", pairs=len(train))
    if len(train) < config.min_pairs:
        raise InvalidArgument(f"a query refit needs at least {config.min_pairs} training pairs, got {len(train)}")
    head = copy.deepcopy(live)
    head.add_query_adapter(modality, hidden=config.hidden)
    for parameter in head.parameters():
        parameter.requires_grad_(False)
    params = list(head.query_adapters[modality].parameters())
    for parameter in params:
        parameter.requires_grad_(True)
    _train(head, params, train, val, config, report, started, progress=progress, query_modality=modality, score=score)
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    return head.eval(), report


def _train(
    head: Head,
    params: list,
    train: PairSet,
    val: PairSet | None,
    config: FitConfig,
    report: FitReport,
    started: float,
    *,
    progress: bool,
    query_modality: str | None = None,
    score: Callable[[Head], float | None] | None = None,
) -> None:
    """The shared loop: InfoNCE (+ label losses), AdamW, early stopping on validation
    recall from epoch 0; leaves the best state in ``head`` and fills ``report``."""
    _TrainingLoop(head, params, train, val, config, query_modality, score).run(report, started, progress)


class _Batches:
    """A pair set as tensors, and the hard negatives of any batch of its rows."""

    def __init__(self, train: PairSet):
        self.n = len(train)
        self.image = torch.from_numpy(np.ascontiguousarray(train.image, dtype=np.float32))
        self.text = torch.from_numpy(np.ascontiguousarray(train.text, dtype=np.float32))
        self.image_keys = torch.from_numpy(train.image_keys)
        self.text_keys = torch.from_numpy(train.text_keys)
        self.labels = torch.from_numpy(train.labels) if train.labels is not None else None
        self.weights = torch.from_numpy(train.weights.astype(np.float32)) if train.weights is not None else None
        self.has_hard = bool(train.n_hard)
        if train.n_hard:
            self.hard = torch.from_numpy(np.ascontiguousarray(train.hard, dtype=np.float32))
            self.hard_rows = torch.from_numpy(np.asarray(train.hard_rows, np.int64))
            self.hard_is_image = torch.from_numpy(np.asarray(train.hard_is_image, bool))
            self.position = torch.full((len(train),), -1, dtype=torch.int64)

    def hard_negatives(self, rows: torch.Tensor) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
        """(loss argument, modality, vectors, batch rows) of the hard negatives of ``rows``."""
        if not self.has_hard:
            return []
        self.position[rows] = torch.arange(len(rows))
        local = self.position[self.hard_rows]
        self.position[rows] = -1
        chosen = local >= 0
        out = []
        for name, modality, mask in (
            ("hard_images", IMAGE, self.hard_is_image),
            ("hard_texts", TEXT, ~self.hard_is_image),
        ):
            pick = chosen & mask
            if pick.any():
                out.append((name, modality, self.hard[pick], local[pick]))
        return out


class _TrainingLoop:
    """Epochs of shuffled batches, validated after each; keeps the best state."""

    def __init__(
        self,
        head: Head,
        params: list,
        train: PairSet,
        val: PairSet | None,
        config: FitConfig,
        query_modality: str | None,
        score: Callable[[Head], float | None] | None,
    ):
        self.head, self.config, self.query_modality = head, config, query_modality
        self.loss_fn = InfoNCELoss(config.temperature, config.learn_temperature)
        params = params + [p for p in self.loss_fn.parameters() if p.requires_grad]
        self.optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.batches = _Batches(train)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.val, self.score = val, score
        self.val_relevant = relevance(val) if val is not None and len(val) and score is None else None
        # ||g(x)||^2 weighted norm_penalty / N: strong for a few pairs, negligible for thousands
        self.penalty = (
            config.norm_penalty / max(len(train), 1) if head.kind in TRAINABLE_KINDS and query_modality is None else 0.0
        )
        self.replay: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def distil(self, replay: dict[str, np.ndarray], teacher: Head) -> None:
        """Keep old-style items where ``teacher`` projects them: each step adds
        ``replay_weight`` x mean (1 - cos(head(x), teacher(x))) over a batch of them."""
        for modality, vectors in replay.items():
            if len(vectors):
                target = torch.from_numpy(teacher.project(modality, vectors))
                self.replay[modality] = (torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)), target)

    def validate(self) -> float | None:
        if self.val_relevant is None and self.score is None:
            return None
        self.head.eval()
        if self.score is not None:
            value = self.score(self.head)
        else:
            value = validation_recall(self.head, self.val, relevant=self.val_relevant)  # type: ignore[arg-type]
        self.head.train()
        return value

    def batch_loss(self, rows: torch.Tensor) -> torch.Tensor:
        head, config, b, qm = self.head, self.config, self.batches, self.query_modality
        updates: list[torch.Tensor] | None = [] if self.penalty else None
        img = head(IMAGE, b.image[rows], qm == IMAGE, updates)
        txt = head(TEXT, b.text[rows], qm == TEXT, updates)
        if head.kind == "paper":  # the paper's setup: its pairwise label loss alone
            both_labels = torch.cat([b.labels[rows], b.labels[rows]])  # type: ignore[index]
            return paper_pairwise_loss(torch.cat([img, txt]), both_labels, config.paper_temperature)
        ik, tk = b.image_keys[rows], b.text_keys[rows]
        positives = (ik[:, None] == ik[None, :]) | (tk[:, None] == tk[None, :])
        hard = {
            name: (head(modality, vectors, qm == modality), local)
            for name, modality, vectors, local in b.hard_negatives(rows)
        }
        loss = self.loss_fn(
            img,
            txt,
            positives,
            b.weights[rows] if b.weights is not None else None,
            hard_weight=config.hard_negative_weight,
            **hard,
        )
        if b.labels is not None and (config.pairwise_weight or config.supcon_weight):
            both = torch.cat([img, txt])
            both_labels = torch.cat([b.labels[rows], b.labels[rows]])
            if config.pairwise_weight:
                loss = loss + config.pairwise_weight * pairwise_label_loss(both, both_labels, config.pairwise_margin)
            if config.supcon_weight:
                loss = loss + config.supcon_weight * supcon_loss(both, both_labels, config.supcon_temperature)
        if updates:
            loss = loss + self.penalty * torch.stack(updates).mean()
        for modality, (vectors, target) in self.replay.items():
            pick = torch.randint(len(vectors), (min(len(rows), len(vectors)),), generator=self.generator)
            kept = (head(modality, vectors[pick]) * target[pick]).sum(-1)
            loss = loss + config.replay_weight * (1 - kept).mean()
        return loss

    def epoch(self) -> float:
        """One pass over the shuffled pairs; returns the mean batch loss."""
        order = torch.randperm(self.batches.n, generator=self.generator)
        total, count = 0.0, 0
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start : start + self.config.batch_size]
            if len(rows) < 2:
                continue
            loss = self.batch_loss(rows)
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
            total += loss.item()
            count += 1
        return total / max(count, 1)

    def run(self, report: FitReport, started: float, progress: bool) -> None:
        """Train until the epochs, the patience or the time cap run out; restore the best."""
        config = self.config
        best_state = copy.deepcopy(self.head.state_dict())
        report.val_before = report.val_best = self.validate()
        report.curve.append({"epoch": 0, "loss": None, "val_recall@10": report.val_before})
        since_best = 0
        report.stopped = "epochs"
        bar = tqdm(
            range(1, config.epochs + 1),
            desc=f"fitting {report.kind}",
            unit="epoch",
            disable=not progress,
            file=sys.stderr,
        )
        self.head.train()
        for epoch in bar:
            loss = self.epoch()
            current = self.validate()
            report.epochs = epoch
            report.curve.append({"epoch": epoch, "loss": loss, "val_recall@10": current})
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{current:.3f}" if current is not None else "-")
            if current is None or current > (report.val_best or 0) + 1e-9:
                report.val_best, report.best_epoch, since_best = current, epoch, 0
                best_state = copy.deepcopy(self.head.state_dict())
            else:
                since_best += 1
                if since_best >= config.patience > 0:
                    report.stopped = "early"
                    break
            if config.max_seconds and time.perf_counter() - started > config.max_seconds:
                report.stopped = "time"
                break
        bar.close()
        self.head.load_state_dict(best_state)
        report.temperature = float(torch.exp(-self.loss_fn.logit_scale.detach()))
        report.seconds = time.perf_counter() - started


def pairs_from_catalog(
    catalog: Catalog, store: BaseStore, split: str, *, label_field: str | None = None, vectors: Vectors | None = None
) -> PairSet:
    """The pairs of a split with their base vectors (pairs with a missing vector are left out).

    Args:
        vectors: the store's vectors already loaded, to avoid re-reading.
    """
    vectors = vectors or load_vectors(store)
    images, texts = vectors[IMAGE], vectors[TEXT]
    pairs = [(i, t) for i, t in catalog.pairs(split) if i in images.rows and t in texts.rows]
    if not pairs:
        empty = np.zeros((0, base_dim(vectors)), np.float32)
        return PairSet(empty, empty, np.zeros(0, np.int64), np.zeros(0, np.int64))
    info = catalog.get_items([t for _, t in pairs] + [i for i, _ in pairs])
    image_keys = [item_key("image", image_id) for image_id, _ in pairs]
    text_keys = [item_key("text", info[text_id]["content_hash"]) for _, text_id in pairs]
    return PairSet(
        images.array[[images.rows[i] for i, _ in pairs]],
        texts.array[[texts.rows[t] for _, t in pairs]],
        np.asarray(image_keys, np.int64),
        np.asarray(text_keys, np.int64),
        _labels(info, pairs, label_field) if label_field else None,
    )


def _labels(info: dict, pairs: list[tuple[str, str]], label_field: str) -> np.ndarray:
    """Class ids of the pairs from a metadata field of the image (else of the text); -1: none."""
    label_ids: dict[str, int] = {}
    labels = []
    for image_id, text_id in pairs:
        meta = json.loads(info[image_id]["metadata"])
        value = meta.get(label_field, json.loads(info[text_id]["metadata"]).get(label_field))
        labels.append(-1 if value is None else label_ids.setdefault(str(value), len(label_ids)))
    return np.asarray(labels, np.int64)


__all__ = [
    "FitConfig",
    "FitReport",
    "PairSet",
    "item_key",
    "fit_head",
    "fit_query_adapter",
    "pairs_from_catalog",
    "validation_recall",
    "TRAINABLE_KINDS",
]
