"""Heads and their training: zero-shot at init, learning on a seeded synthetic shift, label
losses, safe save/load."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.errors import InvalidArgument, ModelUnavailable
from xmodal.indexer.heads import HEAD_KINDS, Head, load_head
from xmodal.indexer.train import FitConfig, PairSet, fit_head, validation_recall

DIM = 32


def shifted_pairs(n: int, seed: int, n_labels: int = 0) -> PairSet:
    """Images are random unit vectors; texts are the same points seen through a fixed
    random rotation plus noise: zero-shot matching is near chance, a head can learn it."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(np.random.default_rng(1234).standard_normal((DIM, DIM)))
    if n_labels:
        centres = np.random.default_rng(99).standard_normal((n_labels, DIM)) * 0.5
        labels = rng.integers(0, n_labels, n)
        image = centres[labels] + rng.standard_normal((n, DIM))
    else:
        labels = None
        image = rng.standard_normal((n, DIM))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text = image @ rotation.T + 0.15 * rng.standard_normal((n, DIM))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    keys = np.arange(n)
    return PairSet(image.astype(np.float32), text.astype(np.float32), keys, keys.copy(), labels)


@pytest.mark.parametrize("kind", ["mlp", "linear", "shared"])
def test_untrained_head_ranks_exactly_like_zero_shot(kind):
    pairs = shifted_pairs(300, seed=0)
    head = Head(kind, DIM)
    for modality, x in ((IMAGE, pairs.image), (TEXT, pairs.text)):
        np.testing.assert_allclose(head.project(modality, x), x, atol=1e-6)
    queries, gallery = head.project(TEXT, pairs.text), head.project(IMAGE, pairs.image)
    zero_shot = np.argsort(-(pairs.text @ pairs.image.T), axis=1, kind="stable")
    np.testing.assert_array_equal(np.argsort(-(queries @ gallery.T), axis=1, kind="stable"), zero_shot)


@pytest.mark.parametrize("kind", ["mlp", "linear", "shared"])
def test_training_raises_validation_recall(kind):
    train, val = shifted_pairs(2000, seed=1), shifted_pairs(300, seed=2)
    head, report = fit_head(train, val, FitConfig(kind=kind, epochs=25, hidden=128, seed=0))
    assert report.val_before < 0.15  # near chance (10 / 300 ~ 0.03) before
    assert report.val_best > report.val_before + 0.4, report.curve
    assert validation_recall(head, val) == pytest.approx(report.val_best)
    assert report.curve[0]["epoch"] == 0 and len(report.curve) == report.epochs + 1


def test_fit_is_deterministic_and_warm_start_continues():
    train, val = shifted_pairs(600, seed=3), shifted_pairs(200, seed=4)
    config = FitConfig(kind="mlp", epochs=3, hidden=64, seed=5, patience=0)
    a, _ = fit_head(train, val, config)
    b, _ = fit_head(train, val, config)
    assert a.digest() == b.digest()
    c, report = fit_head(train, val, config, warm_start=a)
    assert report.val_before == pytest.approx(validation_recall(a, val))
    with pytest.raises(InvalidArgument, match="cannot warm-start"):
        fit_head(train, val, FitConfig(kind="linear", epochs=1), warm_start=a)


def mean_cosines(head: Head, pairs: PairSet) -> tuple[float, float]:
    x = head.project(IMAGE, pairs.image)
    sims = x @ x.T
    same = pairs.labels[:, None] == pairs.labels[None, :]
    np.fill_diagonal(same, False)
    different = pairs.labels[:, None] != pairs.labels[None, :]
    return float(sims[same].mean()), float(sims[different].mean())


@pytest.mark.parametrize("loss", ["pairwise_weight", "supcon_weight"])
def test_label_losses_pull_same_label_items_together(loss):
    train, val = shifted_pairs(1500, seed=6, n_labels=5), shifted_pairs(300, seed=7, n_labels=5)
    # No validation set: both train all epochs (early stopping picks by recall, not geometry).
    plain, _ = fit_head(train, None, FitConfig(kind="mlp", epochs=10, hidden=128))
    labelled, _ = fit_head(train, None, FitConfig(kind="mlp", epochs=10, hidden=128, **{loss: 1.0}))
    same_plain, diff_plain = mean_cosines(plain, val)
    same_lab, diff_lab = mean_cosines(labelled, val)
    assert same_lab - diff_lab > (same_plain - diff_plain) + 0.04  # seeded: +0.056 pairwise, +0.083 supcon


def test_duplicate_captions_count_as_positives_not_negatives():
    """Two images with the same caption (so the same text vector): treated as negatives,
    each image's row has its twin caption at the same logit as its own, a floor of log 2
    that no training can remove; as positives that floor goes away."""
    from xmodal.indexer.losses import InfoNCELoss

    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.9, 0.4], [-0.2, 1.0]]), dim=1)
    caption = torch.nn.functional.normalize(torch.tensor([[1.0, 0.25]]), dim=1)
    text = torch.cat([caption, caption, image[2:]])  # rows 0 and 1 share one caption
    loss = InfoNCELoss(0.01, learn_temperature=False)
    as_negatives = loss(image, text, torch.eye(3, dtype=torch.bool))
    keys = torch.tensor([0, 0, 1])
    as_positives = loss(image, text, keys[:, None] == keys[None, :])
    assert as_negatives > 0.4  # rows 0 and 1 pay ~log 2 image->text, plus the text->image side
    assert as_positives < 0.1


def with_decoys(pairs: PairSet, seed: int) -> np.ndarray:
    """One decoy image per pair: its true image pushed along one fixed direction, so that
    zero-shot it looks almost right to the pair's text."""
    rng = np.random.default_rng(seed)
    away = np.random.default_rng(77).standard_normal(DIM)
    decoy = pairs.image + 0.6 * away / np.linalg.norm(away) + 0.05 * rng.standard_normal(pairs.image.shape)
    return (decoy / np.linalg.norm(decoy, axis=1, keepdims=True)).astype(np.float32)


def test_hard_negatives_push_the_marked_wrong_answers_down():
    """Feedback's irrelevant items as hard negatives: trained with the decoys marked as
    wrong answers, a head ranks held-out texts' true images above their decoys by a wider
    margin than the same fit without them."""
    train, val = shifted_pairs(2000, seed=1), shifted_pairs(300, seed=2)
    marked = PairSet(
        train.image,
        train.text,
        train.image_keys,
        train.text_keys,
        hard=with_decoys(train, 3),
        hard_rows=np.arange(len(train)),
        hard_is_image=np.ones(len(train), bool),
    )
    val_decoys = with_decoys(val, 5)
    margins = {}
    for name, pairs in (("plain", train), ("hard", marked)):
        head, _ = fit_head(pairs, val, FitConfig(kind="mlp", epochs=25, hidden=128, seed=0))
        query = head.project(TEXT, val.text, query=True)
        margins[name] = (query * head.project(IMAGE, val.image)).sum(1) - (query * head.project(IMAGE, val_decoys)).sum(
            1
        )
    assert margins["hard"].mean() > margins["plain"].mean() + 0.08, {k: v.mean() for k, v in margins.items()}
    assert (margins["hard"] > 0).mean() >= 0.98  # seeded: margin 0.11 -> 0.33, 95.7 % -> 100 % above


def test_hard_negatives_follow_their_rows_and_leave_the_plain_loss_alone():
    from xmodal.indexer.losses import InfoNCELoss

    pairs = shifted_pairs(6, seed=0)
    hard = with_decoys(pairs, 0)[[1, 4]]
    marked = PairSet(
        pairs.image,
        pairs.text,
        pairs.image_keys,
        pairs.text_keys,
        hard=hard,
        hard_rows=np.array([1, 4]),
        hard_is_image=np.array([True, False]),
    )
    picked = marked.subset(np.array([4, 0, 2]))
    assert picked.hard_rows.tolist() == [0] and picked.hard_is_image.tolist() == [False]
    np.testing.assert_array_equal(picked.hard[0], hard[1])
    both = PairSet.concat([pairs, marked])
    assert both.hard_rows.tolist() == [7, 10] and len(both) == 12
    with pytest.raises(InvalidArgument, match="does not exist"):
        PairSet(
            pairs.image,
            pairs.text,
            pairs.image_keys,
            pairs.text_keys,
            hard=hard,
            hard_rows=np.array([1, 6]),
            hard_is_image=np.array([True, True]),
        )
    image, text = torch.from_numpy(pairs.image), torch.from_numpy(pairs.text)
    loss, eye = InfoNCELoss(0.07, learn_temperature=False), torch.eye(6, dtype=torch.bool)
    empty = (torch.zeros(0, DIM), torch.zeros(0, dtype=torch.int64))
    assert loss(image, text, eye, hard_images=empty) == loss(image, text, eye)
    hard_images = (torch.from_numpy(hard[:1]), torch.tensor([1]))
    assert loss(image, text, eye, hard_images=hard_images) > loss(image, text, eye)


def test_label_losses_without_labels_are_refused():
    with pytest.raises(InvalidArgument, match="label losses need labels"):
        fit_head(shifted_pairs(100, 0), None, FitConfig(kind="mlp", epochs=1, supcon_weight=1.0))


def test_too_few_pairs_is_a_clear_error():
    with pytest.raises(InvalidArgument, match="needs at least 32 training pairs, got 10"):
        fit_head(shifted_pairs(10, 0), None, FitConfig(kind="mlp"))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_saved_and_loaded_head_gives_identical_outputs(kind, tmp_path):
    train = shifted_pairs(400, seed=8, n_labels=3 if kind == "paper" else 0)  # the paper head learns labels
    head, _ = fit_head(train, None, FitConfig(kind=kind, epochs=2, hidden=64, dim_out=16 if kind == "pca" else None))
    digest = head.save(tmp_path)
    loaded = load_head(tmp_path)
    assert loaded.digest() == digest and loaded.config == head.config
    for modality, x in ((IMAGE, train.image), (TEXT, train.text)):
        np.testing.assert_array_equal(loaded.project(modality, x), head.project(modality, x))


def test_tampered_head_is_refused(tmp_path):
    Head("mlp", DIM, options={"hidden": 8}).save(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "head.safetensors"))
    tensors["projections.text.fc2.weight"] += 1
    save_file(tensors, str(tmp_path / "head.safetensors"))
    with pytest.raises(InvalidArgument, match="does not match its recorded sha256"):
        load_head(tmp_path)


def test_pickle_checkpoints_need_the_explicit_flag(encoder, tmp_path):
    """A .pt checkpoint with a non-tensor object inside is refused by default and loads
    with allow_pickle=True."""
    from xmodal.indexer.encoder import load_encoder

    state = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state, "args": argparse.Namespace(epochs=3)}, path)
    with pytest.raises(ModelUnavailable, match="--allow-pickle"):
        load_encoder("xmodal-demo", str(path))
    loaded = load_encoder("xmodal-demo", str(path), allow_pickle=True)
    np.testing.assert_allclose(loaded.encode_texts(["a red ring"]), encoder.encode_texts(["a red ring"]), atol=1e-6)
