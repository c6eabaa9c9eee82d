"""Pretraining the shipped demo model: a few steps on the CPU, then load the result the way xmodal does."""

from __future__ import annotations

import math
import shutil

import open_clip
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from xmodal.indexer import pretrain as pt
from xmodal.indexer import world
from xmodal.indexer.encoder import DEMO_MODEL_DIR


@pytest.fixture()
def model_dir(tmp_path):
    shutil.copy(DEMO_MODEL_DIR / pt.CONFIG_NAME, tmp_path / pt.CONFIG_NAME)
    return tmp_path


def test_normaliser_matches_open_clip_preprocess(model_dir):
    # Training skips open_clip's per-image transform; serving uses it. They must agree.
    shutil.copy(DEMO_MODEL_DIR / pt.WEIGHTS_NAME, model_dir / pt.WEIGHTS_NAME)
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    config = pt.load_config(model_dir)
    normaliser = pt.Normaliser(config)
    scenes = world.scenes(6, seed=3)
    for style in ("source", "target"):
        images = [world.render(s, style, normaliser.size, seed=i) for i, s in enumerate(scenes)]
        ours = normaliser(images)
        theirs = torch.stack([preprocess(im) for im in images])
        assert ours.shape == theirs.shape == (6, 3, 64, 64)
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_normaliser_rejects_wrong_size(model_dir):
    normaliser = pt.Normaliser(pt.load_config(model_dir))
    with pytest.raises(ValueError):
        normaliser([world.render(world.scenes(1)[0], "source", 96)])


def test_pretrain_few_steps_writes_loadable_fp16_weights(model_dir):
    report = pt.pretrain(model_dir, steps=3, batch_size=16, seed=0, threads=1, eval_scenes=50, progress=False)

    assert report["steps"] == 3 and not report["stopped_early"]
    assert math.isfinite(report["final_loss"])
    # At initialisation the loss is near ln(batch); a broken loss would be 0 or huge.
    assert 0.5 * math.log(16) < report["last_loss"] < 3 * math.log(16)
    for style in ("source", "target"):
        assert 0.0 <= report[style]["r1"] <= report[style]["r10"] <= 1.0

    weights = model_dir / pt.WEIGHTS_NAME
    assert weights.is_file() and report["weights_bytes"] == weights.stat().st_size < 10_000_000
    assert not list(model_dir.glob("*.tmp"))
    with safe_open(weights, "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}

    # Strict load through the path xmodal uses (open_clip raises on missing/unexpected keys).
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    state = load_file(weights)
    assert set(state) == set(model.state_dict())
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)

    initial = pt.build_model(pt.load_config(model_dir), seed=0).state_dict()
    changed = [k for k in state if not torch.equal(state[k], initial[k].half())]
    assert "visual.conv1.weight" in changed and "text_projection" in changed

    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    with torch.no_grad():
        assert torch.isfinite(model.encode_text(tokenizer(["a small red circle"]))).all()


def test_pretrain_validates_arguments(model_dir, tmp_path):
    with pytest.raises(ValueError):
        pt.pretrain(model_dir, steps=0)
    with pytest.raises(ValueError):
        pt.pretrain(model_dir, steps=1, batch_size=1)
    with pytest.raises(ValueError):
        pt.pretrain(model_dir, steps=1, seed=-1)
    with pytest.raises(FileNotFoundError):
        pt.pretrain(tmp_path / "missing", steps=1)
