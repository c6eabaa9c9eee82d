"""The gate on its own: its figures, its early-stopping score and its promotion rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.gate import CORPUS, FEEDBACK, Gate, judge_scores
from xmodal.indexer.heads import Head
from xmodal.indexer.significance import detectable_gain, paired_gain_test
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


# -- the paired test: a gain must be above the noise ------------------------------------------


def test_the_paired_test_is_exact_on_few_queries_and_seeded_beyond():
    # 5 queries, each better by the same amount: only the all-positive sign pattern of the
    # 2^5 is as large, so p = 1/32
    gain, p = paired_gain_test(np.full(5, 0.5), np.zeros(5))
    assert gain == pytest.approx(0.5) and p == pytest.approx(1 / 32)
    assert paired_gain_test(np.zeros(5), np.full(5, 0.1)) == (pytest.approx(-0.1), 1.0)  # a loss: no gain
    rng = np.random.default_rng(0)
    a, b = rng.random(300), rng.random(300)
    assert paired_gain_test(a, b) == paired_gain_test(a, b)  # seeded: the same p every time


def test_a_gain_within_noise_is_refused_and_a_clear_gain_accepted():
    """Seeded per-query figures with per-query differences of sd 0.25: a mean gain of +0.02
    over 60 queries is noise; +0.15 over the same queries is not."""
    rng = np.random.default_rng(7)
    reference = rng.random(60)
    spread = rng.normal(0, 0.25, 60)
    spread -= spread.mean()
    noisy, clear = reference + 0.02 + spread, reference + 0.15 + spread
    small = judge_scores({None: noisy}, reference, confidence=0.95)
    assert small.gain == pytest.approx(0.02) and not small.significant and small.p_value > 0.05
    big = judge_scores({None: clear}, reference, confidence=0.95)
    assert big.significant and big.p_value < 0.01 and big.threshold == pytest.approx(0.05)


def test_several_candidates_must_each_pass_a_corrected_threshold():
    """A p of about 0.02 passes alone at 95% but not as the best of four blends (0.05 / 4)."""
    rng = np.random.default_rng(3)
    reference = rng.random(100)
    for shift in np.linspace(0.02, 0.08, 61):
        candidate = np.clip(reference + shift + rng.normal(0, 0.2, 100), 0, 1)
        _, p = paired_gain_test(candidate, reference)
        if 0.0125 < p < 0.05:
            break
    else:
        pytest.fail("no seeded case with 0.0125 < p < 0.05")
    assert judge_scores({1.0: candidate}, reference, confidence=0.95).significant
    others = {b: reference.copy() for b in (0.25, 0.5, 0.75)}
    verdict = judge_scores({**others, 1.0: candidate}, reference, confidence=0.95)
    assert not verdict.significant and verdict.threshold == pytest.approx(0.0125)
    assert len(verdict.candidates) == 4 and "within noise" in verdict.summary()


def test_the_gate_refuses_a_perturbation_of_zero_shot_and_accepts_a_trained_head(heads):
    """Real heads on real validation pairs: random small weights in g change a few ranks
    both ways (no gain beyond noise); the trained head is clearly better."""
    zero_shot, trained = heads
    gate = Gate(shifted_pairs(120, seed=2), [], NO_VECTORS)
    jittered = Head("mlp", DIM, options={"hidden": 16})
    torch.manual_seed(0)
    with torch.no_grad():
        for module in jittered.projections.values():
            module.fc2.weight.normal_(0, 0.02)
    verdict = gate.judge(jittered, zero_shot, (0.5, 1.0))
    assert not verdict.significant and verdict.queries == 120
    clear = gate.judge(trained, zero_shot, (0.25, 0.5, 0.75, 1.0))
    assert clear.significant and clear.blend is not None and clear.gain > 0.2
    decision = gate.protecting(zero_shot, 0.01).decide(
        gate.figures(jittered), report(2), must_improve=False, verdict=verdict
    )
    assert not decision.accepted and "the live head stays" in decision.message and "p=" in decision.message


def test_what_a_validation_size_can_detect_shrinks_with_the_square_root():
    at_200 = detectable_gain(200, 0.3, confidence=0.95, candidates=4)
    assert detectable_gain(800, 0.3, confidence=0.95, candidates=4) == pytest.approx(at_200 / 2)
    assert detectable_gain(200, 0.3, confidence=0.95, candidates=1) < at_200
