"""Adaptation that never hurts: blending with zero-shot, the gate on a new head (with
cross-validation when validation is small), the norm penalty, replay of old-style items,
and the paper's own head as a baseline. Seeded synthetic pair sets (tests/test_heads.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from xmodal.indexer.adapt import TrainingData, fit_training_data
from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.errors import InvalidArgument
from xmodal.indexer.heads import Head, load_head
from xmodal.indexer.train import FitConfig, PairSet, fit_head, validation_recall
from xmodal.indexer.vectors import ModalityVectors

from test_heads import DIM, shifted_pairs

NO_VECTORS = {IMAGE: ModalityVectors.empty(DIM), TEXT: ModalityVectors.empty(DIM)}
QUICK = FitConfig(kind="mlp", hidden=64, epochs=15, patience=4, seed=0)


@pytest.fixture(scope="module")
def trained() -> Head:
    head, _ = fit_head(shifted_pairs(600, seed=1), None, replace(QUICK, epochs=20))
    return head


def unrelated_pairs(n: int, seed: int) -> PairSet:
    """Texts drawn independently of their images: nothing to learn, only noise to fit."""
    rng = np.random.default_rng(seed)
    image, text = rng.standard_normal((2, n, DIM))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    keys = np.arange(n)
    return PairSet(image.astype(np.float32), text.astype(np.float32), keys, keys.copy())


def test_blending_at_zero_is_exactly_zero_shot(trained):
    pairs = shifted_pairs(200, seed=5)
    zero_shot = Head("identity", DIM)
    at_zero = trained.blended(0.0)
    for modality, x in ((IMAGE, pairs.image), (TEXT, pairs.text)):
        np.testing.assert_array_equal(at_zero.project(modality, x), zero_shot.project(modality, x))
        assert not np.allclose(trained.project(modality, x), zero_shot.project(modality, x), atol=1e-3)
    half = trained.blended(0.5)  # in between: normalize(x + 0.5 g(x))
    assert validation_recall(zero_shot, pairs) < validation_recall(half, pairs) <= 1.0
    assert trained.blend == 1.0 and half.blend == 0.5  # blended() copies, never changes the head


def test_a_blended_head_saves_its_blend_and_an_unblended_one_saves_as_before(trained, tmp_path):
    half = trained.blended(0.5)
    half.save(tmp_path / "half")
    loaded = load_head(tmp_path / "half")
    assert loaded.blend == 0.5 and loaded.digest() == half.digest() != trained.digest()
    x = shifted_pairs(50, seed=6).text
    np.testing.assert_array_equal(loaded.project(TEXT, x), half.project(TEXT, x))
    trained.save(tmp_path / "plain")  # blend 1: head.json as written before blending existed
    assert "blend" not in json.loads((tmp_path / "plain" / "head.json").read_text())["options"]
    assert load_head(tmp_path / "plain").blend == 1.0
    with pytest.raises(InvalidArgument, match="blend"):
        trained.blended(1.5)
    with pytest.raises(InvalidArgument, match="residual"):
        Head("pca", DIM).set_blend(0.5)


def fit_new(train: PairSet, val: PairSet, config: FitConfig = QUICK):
    return fit_training_data(TrainingData(NO_VECTORS, train, val, None, None, [], 0), config)


def test_a_new_head_that_learns_only_noise_leaves_zero_shot_live():
    """Unrelated pairs (cross-validated: 10 validation pairs are too few to trust)."""
    result = fit_new(unrelated_pairs(150, seed=1), unrelated_pairs(10, seed=2))
    assert result.verdict is not None and not result.verdict.significant
    assert result.head.kind == "mlp" and result.head.blend == 0.0  # exactly zero-shot, as the test above shows
    assert result.verdict.queries == 160  # every pooled pair was a held-out query once
    assert "zero-shot stays live (4 candidate(s), cross-validated)" in result.report.summary()


def test_a_new_head_with_a_clear_gain_goes_live_at_its_chosen_blend():
    result = fit_new(shifted_pairs(400, seed=1), shifted_pairs(20, seed=2))  # cross-validated
    assert result.verdict.significant and result.head.blend == result.verdict.blend > 0
    assert "goes live" in result.report.summary()
    test = shifted_pairs(300, seed=9)
    assert validation_recall(result.head, test) > validation_recall(Head("identity", DIM), test) + 0.02
    big = fit_new(shifted_pairs(600, seed=1), shifted_pairs(250, seed=2))  # validated, not cross-validated
    assert big.verdict.significant and big.verdict.queries == 250 and big.head.blend > 0


def test_the_norm_penalty_keeps_a_head_near_zero_shot_on_few_pairs():
    train = unrelated_pairs(60, seed=3)
    config = replace(QUICK, epochs=30, patience=0, cv_below=0)
    free, _ = fit_head(train, None, replace(config, norm_penalty=0.0))
    held, _ = fit_head(train, None, replace(config, norm_penalty=50.0))
    x = unrelated_pairs(100, seed=4).image

    def drift(head: Head) -> float:
        return float(1 - (head.project(IMAGE, x) * x).sum(1).mean())

    assert drift(held) < 0.75 * drift(free)


def test_replayed_old_style_items_stay_where_zero_shot_put_them():
    train = shifted_pairs(400, seed=1)
    old = unrelated_pairs(300, seed=8)  # another style's items, in the archive
    config = replace(QUICK, epochs=10, patience=0)
    plain, _ = fit_head(train, None, config)
    kept, _ = fit_head(train, None, config, replay={IMAGE: old.image, TEXT: old.text})

    def kept_cosine(head: Head) -> float:
        return float((head.project(TEXT, old.text) * old.text).sum(1).mean())

    assert kept_cosine(kept) > kept_cosine(plain) + 0.02
    val = shifted_pairs(200, seed=2)
    assert validation_recall(kept, val) > validation_recall(Head("identity", DIM), val) + 0.03  # still adapts


def test_the_paper_head_is_its_code_s_projector_and_needs_labels():
    train = shifted_pairs(300, seed=1, n_labels=4)
    head, report = fit_head(train, None, FitConfig(kind="paper", epochs=30, seed=0))
    assert head.dim_out == 128 and not head.blendable and report.epochs == 30
    first = head.projections[IMAGE]
    assert (first.fc1.in_features, first.fc1.out_features, first.fc2.out_features) == (DIM, 16, 128)
    same = train.labels[:, None] == train.labels[None, :]
    x = head.project(IMAGE, train.image)
    sims = x @ x.T
    assert sims[same].mean() > sims[~same].mean() + 0.1  # it learns the labels, not the pairs
    with pytest.raises(InvalidArgument, match="labels"):
        fit_head(shifted_pairs(300, seed=1), None, FitConfig(kind="paper", epochs=1))
