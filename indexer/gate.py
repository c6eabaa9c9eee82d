"""The gate: how a head is judged on held-out data, and whether it may go live.

One gate judges every fit (``xmodal index``, ``xmodal fit``, the server's refits). Its
figures are recall@10 on the corpus validation pairs and on the held-out slice of the
feedback; a fit early-stops on their mean (:meth:`Gate.score`).

**The rule.** A head goes live only when its gain over the live head (zero-shot for a new
data directory) is above the noise: on the same held-out queries, per query whether a
right answer is in the top 10 (a corpus pair counts once, the mean of its text->image and
image->text hits; a held-out feedback query once), a one-sided paired randomization test
(xmodal.indexer.significance; on hits it is the exact McNemar / sign test of the queries
that changed) at ``confidence`` (0.95), Bonferroni-corrected over the candidates tried on
those queries: the blends ``a`` of ``normalize(x + a g(x))`` for a residual head
(:meth:`Gate.judge`). The chosen blend is the significant one with the
largest mean gain. Otherwise the live head stays, and the decision says so with the
figures. (A new head that fails serves at blend 0, exactly zero-shot.)

A gate with a ``reference`` (the live head's figures, for refits) also guards: an epoch
whose figures fall below the reference by more than the tolerance never counts as the
best one, and a head that validates worse, or that no epoch improved, is rejected
(:meth:`Gate.decide`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .corpus import IMAGE, TEXT
from .evaluate import first_ranks
from .feedback import HeldOutQuery, feedback_recall
from .heads import Head
from .significance import paired_gain_test
from .train import FitReport, PairSet, relevance, validation_recall
from .vectors import Vectors, other_modality

K = 10  # the gate's figures are recall@10
DEFAULT_CONFIDENCE = 0.95  # FitConfig.confidence; verdicts are still reported when a gate does not require one
CORPUS = "corpus_val_recall@10"
FEEDBACK = "feedback_val_recall@10"
FIGURES = (CORPUS, FEEDBACK)


@dataclass
class Decision:
    accepted: bool
    message: str = ""


@dataclass
class Verdict:
    """The paired test of a head's candidates (blends) against the reference head.

    ``blend`` is the chosen candidate (None for a head that does not blend), ``gain`` and
    ``p_value`` its mean per-query gain in hits at 10 (a recall@10 gain) and p; ``threshold`` is what p had
    to be below: (1 - confidence) / candidates."""

    significant: bool
    blend: float | None
    gain: float
    p_value: float
    threshold: float
    queries: int
    candidates: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        where = "" if self.blend is None else f" at blend {self.blend:g}"
        head = f"gain above noise{where}" if self.significant else f"gain within noise (best{where})"
        return (
            f"{head}: recall@10 {self.gain:+.4f} on {self.queries} held-out queries, "
            f"paired randomization test p={self.p_value:.4f} (needed < {self.threshold:.4f}: "
            f"{len(self.candidates)} candidate(s))"
        )

    def to_dict(self) -> dict:
        return {
            "significant": self.significant,
            "blend": self.blend,
            "gain": self.gain,
            "p_value": self.p_value,
            "threshold": self.threshold,
            "queries": self.queries,
            "candidates": self.candidates,
        }


def pair_scores(head: Head, pairs: PairSet, relevant: list[set[int]], queries: np.ndarray | None = None) -> np.ndarray:
    """Per pair: the mean of its text->image and image->text hits at 10 (1 when a right
    answer is in the top 10: recall@10's own per-query figure). The gallery is every row of
    ``pairs``; the queries are the rows ``queries`` (default all), through their adapters."""
    rows = np.arange(len(pairs)) if queries is None else np.asarray(queries)
    if not len(rows):
        return np.zeros(0)
    wanted = [relevant[r] for r in rows]
    t2i = first_ranks(head.project(TEXT, pairs.text[rows], query=True), head.project(IMAGE, pairs.image), wanted)
    i2t = first_ranks(head.project(IMAGE, pairs.image[rows], query=True), head.project(TEXT, pairs.text), wanted)
    return ((t2i <= K).astype(np.float64) + (i2t <= K)) / 2


def feedback_scores(head: Head, queries: list[HeldOutQuery], vectors: Vectors) -> np.ndarray:
    """Per held-out feedback query: 1 when a right answer is in the top 10 of the whole
    gallery of the other modality (the queries of :func:`feedback_recall`)."""
    out = np.zeros(len(queries))
    for modality in (IMAGE, TEXT):
        chosen = [n for n, q in enumerate(queries) if q.modality == modality]
        other = other_modality(modality)
        if not chosen or not len(vectors[other]):
            continue
        gallery = head.project(other, vectors[other].array)
        projected = head.project(modality, np.stack([queries[n].embedding for n in chosen]), query=True)
        out[chosen] = first_ranks(projected, gallery, [queries[n].relevant for n in chosen]) <= K
    return out


def judge_scores(candidates: dict[float | None, np.ndarray], reference: np.ndarray, confidence: float) -> Verdict:
    """The gate's rule on per-query figures already computed (for cross-validation).

    Args:
        candidates: blend (None: a head that does not blend) -> per-query figures.
        reference: the live head's per-query figures on the same queries.
    """
    threshold = (1 - confidence) / max(len(candidates), 1)
    tested = [(blend, *paired_gain_test(scores, reference)) for blend, scores in candidates.items()]
    passed = [t for t in tested if t[2] < threshold]
    # the largest gain; on a tie the smaller blend (the nearer to zero-shot)
    blend, gain, p = max(passed or tested, key=lambda t: (t[1], -(t[0] or 0.0)))
    rows = [{"blend": b, "gain": g, "p_value": q} for b, g, q in tested]
    return Verdict(bool(passed), blend, gain, p, threshold, len(reference), rows)


@dataclass
class Gate:
    """Held-out figures of heads, and the promotion rule.

    Args:
        corpus_val: the corpus validation pairs.
        val_queries: the held-out feedback queries.
        vectors: the base vectors (galleries of the feedback queries).
        reference: figures of the head to protect (the live one); None: nothing to protect.
        tolerance: how far below the reference a figure may fall.
        confidence: of the paired test a head's gain must pass (:meth:`judge`).
    """

    corpus_val: PairSet
    val_queries: list[HeldOutQuery]
    vectors: Vectors
    reference: dict[str, float | None] | None = None
    tolerance: float = 0.0
    confidence: float | None = 0.95  # None: no significance test (only the tolerance rule)
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
        return Gate(self.corpus_val, self.val_queries, self.vectors, self.figures(head), tolerance, self.confidence)

    def per_query(self, head: Head) -> np.ndarray:
        """``head``'s per-query figures on the held-out queries: corpus pairs, then feedback."""
        return np.concatenate(
            [pair_scores(head, self.corpus_val, self._relevant), feedback_scores(head, self.val_queries, self.vectors)]
        )

    def judge(self, head: Head, reference: Head, blends: tuple[float, ...] | None = None) -> Verdict:
        """Whether ``head`` (at one of ``blends``, when given) beats ``reference`` beyond
        the noise on the held-out queries; picks the blend (see the module's rule)."""
        base = self.per_query(reference)
        candidates: dict[float | None, np.ndarray]
        if blends:
            candidates = {b: self.per_query(head.blended(b)) for b in blends}
        else:
            candidates = {None: self.per_query(head)}
        return judge_scores(candidates, base, self.confidence if self.confidence is not None else DEFAULT_CONFIDENCE)

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

    def decide(
        self,
        figures: dict[str, float | None],
        report: FitReport,
        *,
        must_improve: bool,
        verdict: Verdict | None = None,
    ) -> Decision:
        """Whether a fitted head (with these figures) may replace the reference.

        Args:
            must_improve: the fit started from the reference head (warm start or a query
                adapter), so a best epoch of 0 means it learned nothing new.
            verdict: the paired test against the reference (:meth:`judge`); a gain within
                noise is rejected.
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
        if verdict is not None and self.confidence is not None and not verdict.significant:
            return Decision(False, f"the live head stays: {verdict.summary()}")
        return Decision(True, verdict.summary() if verdict is not None and self.confidence is not None else "")


__all__ = ["CORPUS", "FEEDBACK", "Decision", "Gate", "Verdict", "feedback_scores", "judge_scores", "pair_scores"]
