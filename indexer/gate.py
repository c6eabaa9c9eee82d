"""The gate: how a head is judged on held-out data, and whether it may go live.

One gate judges every fit (``xmodal index``, ``xmodal fit``, the server's refits). Its
figures are recall@10 on the corpus validation pairs and on the held-out slice of the
feedback; a fit early-stops on their mean (:meth:`Gate.score`).

A gate with a ``reference`` (the live head's figures, for refits) also guards: an epoch
whose figures fall below the reference by more than the tolerance never counts as the
best one, and a head that validates worse, or that no epoch improved, is rejected
(:meth:`Gate.decide`). A gate without a reference (offline fits of a new head) accepts
what early stopping returns, which never validates worse than its starting point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .feedback import HeldOutQuery, feedback_recall
from .heads import Head
from .train import FitReport, PairSet, relevance, validation_recall
from .vectors import Vectors

CORPUS = "corpus_val_recall@10"
FEEDBACK = "feedback_val_recall@10"
FIGURES = (CORPUS, FEEDBACK)


@dataclass
class Decision:
    accepted: bool
    message: str = ""


@dataclass
class Gate:
    """Held-out figures of heads, and the promotion rule.

    Args:
        corpus_val: the corpus validation pairs.
        val_queries: the held-out feedback queries.
        vectors: the base vectors (galleries of the feedback queries).
        reference: figures of the head to protect (the live one); None: nothing to protect.
        tolerance: how far below the reference a figure may fall.
    """

    corpus_val: PairSet
    val_queries: list[HeldOutQuery]
    vectors: Vectors
    reference: dict[str, float | None] | None = None
    tolerance: float = 0.0
    _relevant: list[set[int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._relevant = relevance(self.corpus_val)  # built once, scored every epoch

    def sizes(self) -> dict[str, int]:
        return {CORPUS: len(self.corpus_val), FEEDBACK: len(self.val_queries)}

    def figures(self, head: Head) -> dict[str, float | None]:
        """Recall@10 of ``head`` on each held-out set (None where the set is empty)."""
        corpus = validation_recall(head, self.corpus_val, relevant=self._relevant) if len(self.corpus_val) else None
        return {CORPUS: corpus, FEEDBACK: feedback_recall(head, self.val_queries, self.vectors)}

    def protecting(self, head: Head, tolerance: float) -> Gate:
        """This gate, guarding ``head``'s current figures."""
        return Gate(self.corpus_val, self.val_queries, self.vectors, self.figures(head), tolerance)

    def worse(self, figures: dict[str, float | None]) -> list[str]:
        """The figures that fall below the reference beyond the tolerance. One query more
        or less is not a regression: with n held-out queries the tolerance is at least 1/n,
        so tiny validation sets do not reject by chance."""
        if self.reference is None:
            return []
        sizes = self.sizes()
        worse = []
        for name in FIGURES:
            before, after = self.reference[name], figures[name]
            if (
                before is not None
                and after is not None
                and after < before - max(self.tolerance, 1.0 / max(sizes[name], 1))
            ):
                worse.append(name)
        return worse

    def score(self, head: Head) -> float | None:
        """What a fit early-stops on: the mean of the figures; -1 for a head the gate would
        reject (so the best epoch is always one that can be promoted). Without any held-out
        data: None for a new head (train all epochs), 0 when guarding a live head (it
        cannot be shown to be better)."""
        figures = self.figures(head)
        if self.worse(figures):
            return -1.0
        values = [v for v in figures.values() if v is not None]
        if not values:
            return None if self.reference is None else 0.0
        return sum(values) / len(values)

    def decide(self, figures: dict[str, float | None], report: FitReport, *, must_improve: bool) -> Decision:
        """Whether a fitted head (with these figures) may replace the reference.

        Args:
            must_improve: the fit started from the reference head (warm start or a query
                adapter), so a best epoch of 0 means it learned nothing new.
        """
        if self.reference is None:
            return Decision(True)
        if must_improve and report.best_epoch == 0:
            return Decision(
                False,
                "no epoch validated better than the live head without falling below it beyond "
                f"the tolerance on either figure (tolerance {self.tolerance}): nothing new to promote",
            )
        worse = self.worse(figures)
        if worse:
            return Decision(
                False, f"new head validates worse than live on {', '.join(worse)} (tolerance {self.tolerance})"
            )
        return Decision(True)


__all__ = ["CORPUS", "FEEDBACK", "Decision", "Gate"]
