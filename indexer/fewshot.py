"""Cross-validation of a new head when the validation split is too small to trust.

With tens or hundreds of pairs, a validation split of a few dozen is too small both to
early-stop on and to judge a head by. Then the train and validation pairs are pooled and
split into k folds by image (every pair of one image in one fold). For each fold a head is
fitted on the others (early-stopped on a fifth of them, held out by image), and every pair
of the held-out fold is scored by that head, at each blend, and by zero-shot, searching the
whole pooled gallery (as a live search would): every pair is a held-out query once, so the
gate's paired test (xmodal.indexer.gate) sees all of them.
The head that goes live is then fitted on all the pooled pairs for the median number of
epochs the folds chose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .gate import Verdict, judge_scores, pair_scores
from .heads import Head
from .train import FitConfig, FitReport, PairSet, fit_head, relevance

log = logging.getLogger(__name__)
INNER_FRACTION = 0.2  # of a fold's training pairs, held out (by image) to early-stop on


@dataclass
class CrossValidation:
    candidates: dict[float, np.ndarray]  # blend -> per-pair out-of-fold figures
    zero_shot: np.ndarray
    best_epochs: list[int]

    @property
    def epochs(self) -> int:
        """What the final fit trains for: the folds' median best epoch (at least 1)."""
        return max(1, int(round(float(np.median(self.best_epochs))))) if self.best_epochs else 1


def _by_image(keys: np.ndarray, parts: int, seed: int) -> np.ndarray:
    """A part number per row, equal for rows of one image, parts of near-equal size."""
    unique = np.unique(keys)
    order = np.random.default_rng(seed).permutation(len(unique))
    part = np.empty(len(unique), np.int64)
    part[order] = np.arange(len(unique)) % parts
    return part[np.searchsorted(unique, keys)]


def cross_validate(pairs: PairSet, config: FitConfig, **fit: Any) -> CrossValidation:
    """Out-of-fold per-pair figures of ``config``'s head at each blend, and zero-shot's;
    ``fit``: more arguments of every fold's :func:`~.train.fit_head` (replay, teacher)."""
    folds = min(config.cv_folds, len(np.unique(pairs.image_keys)))
    fold = _by_image(pairs.image_keys, folds, config.seed)
    n = len(pairs)
    candidates = {b: np.zeros(n) for b in config.blends}
    identity = Head("identity", int(pairs.image.shape[1]))
    inner_config = replace(config, min_pairs=2)
    relevant = relevance(pairs)
    zero_shot = pair_scores(identity, pairs, relevant)
    best_epochs = []
    for f in range(folds):
        held_rows, rest_rows = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        rest = pairs.subset(rest_rows)
        inner = _by_image(rest.image_keys, max(2, round(1 / INNER_FRACTION)), config.seed + 1 + f) == 0
        if inner.all() or not inner.any():
            inner = np.arange(len(rest)) % 5 == 0
        head, report = fit_head(
            rest.subset(np.flatnonzero(~inner)), rest.subset(np.flatnonzero(inner)), inner_config, **fit
        )
        best_epochs.append(report.best_epoch)
        for blend in config.blends:
            candidates[blend][held_rows] = pair_scores(head.blended(blend), pairs, relevant, held_rows)
        log.debug("fold %d: best epoch %d of %d", f, report.best_epoch, report.epochs)
    return CrossValidation(candidates, zero_shot, best_epochs)


def cross_validated_fit(
    pairs: PairSet, config: FitConfig, *, progress: bool = False, **fit: Any
) -> tuple[Head, FitReport, Verdict, CrossValidation]:
    """Cross-validate, judge (the gate's rule on the out-of-fold figures), then fit the head
    on all ``pairs`` for the folds' median epochs. The head is returned at blend 1; the
    caller applies the verdict's blend (or 0). ``fit``: more arguments of each
    :func:`~.train.fit_head` (replay, teacher)."""
    cv = cross_validate(pairs, config, **fit)
    candidates: dict[float | None, np.ndarray] = dict(cv.candidates.items())
    verdict = judge_scores(candidates, cv.zero_shot, config.confidence)
    head, report = fit_head(pairs, None, replace(config, epochs=cv.epochs, patience=0), progress=progress, **fit)
    # validation figures of the report: cross-validated recall@10 of zero-shot, and of the
    # head that goes live (the chosen blend, or zero-shot again when the gain is noise)
    report.val_before = float(cv.zero_shot.mean())
    chosen = cv.candidates.get(verdict.blend) if verdict.significant and verdict.blend is not None else None
    report.val_best = float(chosen.mean()) if chosen is not None else report.val_before
    report.best_epoch = report.epochs
    report.stopped = f"{len(cv.best_epochs)}-fold cross-validation: median best epoch {cv.epochs}"
    return head, report, verdict, cv


__all__ = ["CrossValidation", "cross_validate", "cross_validated_fit"]
