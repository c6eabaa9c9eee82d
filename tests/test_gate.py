"""The gate on its own: its figures, its early-stopping score and its promotion rule."""

from __future__ import annotations

import numpy as np
import pytest

from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.gate import CORPUS, FEEDBACK, Gate
from xmodal.indexer.heads import Head
from xmodal.indexer.train import FitConfig, FitReport, PairSet, fit_head, validation_recall
from xmodal.indexer.vectors import ModalityVectors

from test_heads import DIM, shifted_pairs

NO_VECTORS = {IMAGE: ModalityVectors.empty(DIM), TEXT: ModalityVectors.empty(DIM)}


def empty_pairs() -> PairSet:
    empty = np.zeros((0, DIM), np.float32)
    return PairSet(empty, empty, np.zeros(0, np.int64), np.zeros(0, np.int64))


@pytest.fixture(scope="module")
def heads():
    """A zero-shot head, and a head trained on the shift (clearly better on held-out pairs)."""
    trained, _ = fit_head(shifted_pairs(600, seed=1), None, FitConfig(kind="mlp", epochs=25, hidden=128, seed=0))
    return Head("identity", DIM), trained


def report(best_epoch: int) -> FitReport:
    return FitReport(kind="mlp", pairs=1, best_epoch=best_epoch)


def test_figures_are_recall_at_10_of_each_held_out_set(heads):
    zero_shot, trained = heads
    val = shifted_pairs(200, seed=2)
    gate = Gate(val, [], NO_VECTORS)
    figures = gate.figures(trained)
    assert figures[CORPUS] == pytest.approx(validation_recall(trained, val)) and figures[FEEDBACK] is None
    assert gate.score(trained) == pytest.approx(figures[CORPUS])
    assert gate.figures(trained)[CORPUS] > gate.figures(zero_shot)[CORPUS] + 0.3


def test_without_a_reference_every_fit_is_accepted_and_no_data_means_no_score(heads):
    zero_shot, _ = heads
    gate = Gate(empty_pairs(), [], NO_VECTORS)
    assert gate.figures(zero_shot) == {CORPUS: None, FEEDBACK: None}
    assert gate.score(zero_shot) is None  # a new head then trains for all its epochs
    assert gate.decide({CORPUS: None, FEEDBACK: None}, report(0), must_improve=True).accepted
    guarding = gate.protecting(zero_shot, tolerance=0.01)
    assert guarding.score(zero_shot) == 0.0  # nothing shows a refit is better: it cannot win


def test_a_guarding_gate_refuses_a_head_worse_beyond_the_tolerance(heads):
    zero_shot, trained = heads
    gate = Gate(shifted_pairs(200, seed=2), [], NO_VECTORS)
    guarding = gate.protecting(trained, tolerance=0.01)
    assert guarding.reference == gate.figures(trained)
    worse = gate.figures(zero_shot)
    assert guarding.worse(worse) == [CORPUS]
    assert guarding.score(zero_shot) == -1.0  # such an epoch never counts as the best
    decision = guarding.decide(worse, report(3), must_improve=False)
    assert not decision.accepted and CORPUS in decision.message and "tolerance 0.01" in decision.message


def test_a_clear_gain_is_accepted(heads):
    zero_shot, trained = heads
    gate = Gate(shifted_pairs(200, seed=2), [], NO_VECTORS).protecting(zero_shot, tolerance=0.01)
    better = gate.figures(trained)
    assert gate.worse(better) == [] and gate.score(trained) == pytest.approx(better[CORPUS])
    assert gate.decide(better, report(4), must_improve=True).accepted


def test_a_warm_start_that_never_improved_is_rejected(heads):
    _, trained = heads
    gate = Gate(shifted_pairs(200, seed=2), [], NO_VECTORS).protecting(trained, tolerance=0.01)
    same = gate.figures(trained)
    decision = gate.decide(same, report(0), must_improve=True)
    assert not decision.accepted and "nothing new to promote" in decision.message
    assert gate.decide(same, report(0), must_improve=False).accepted


def test_one_query_less_on_a_tiny_validation_set_is_not_a_regression():
    """With n held-out queries the tolerance is at least 1/n."""
    gate = Gate(shifted_pairs(8, seed=3), [], NO_VECTORS, reference={CORPUS: 0.75, FEEDBACK: None}, tolerance=0.01)
    assert gate.worse({CORPUS: 0.75 - 1 / 8, FEEDBACK: None}) == []
    assert gate.worse({CORPUS: 0.75 - 2 / 8, FEEDBACK: None}) == [CORPUS]
