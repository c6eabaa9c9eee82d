"""Model selection: shipped demo model, local-dir folders, checkpoints, and clear errors
for what cannot be had offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from xmodal.indexer.encoder import DEMO_MODEL_DIR, load_encoder, resolve_model
from xmodal.indexer.errors import ModelUnavailable

TEXTS = ["a small red circle in the upper left on a gray background", "a large blue square"]


def test_demo_model_is_deterministic_and_normalised(encoder):
    first, second = encoder.encode_texts(TEXTS), encoder.encode_texts(TEXTS)
    assert first.dtype == np.float32 and first.shape == (2, encoder.dim)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)


def test_local_dir_and_checkpoint_path_load_the_same_weights(encoder, tmp_path):
    folder = tmp_path / "my-model"
    shutil.copytree(DEMO_MODEL_DIR, folder)
    local = load_encoder(f"local-dir:{folder}", None)
    assert local.identity.startswith("local-dir@sha256:")
    np.testing.assert_allclose(local.encode_texts(TEXTS), encoder.encode_texts(TEXTS), atol=1e-6)
    checkpoint = load_encoder("xmodal-demo", str(folder / "open_clip_model.safetensors"))
    assert checkpoint.identity == encoder.identity  # same weights, same identity
    np.testing.assert_allclose(checkpoint.encode_texts(TEXTS), encoder.encode_texts(TEXTS), atol=1e-6)


def test_random_weights_are_another_encoder(encoder):
    random_init = load_encoder("xmodal-demo", "none")
    assert random_init.identity == "xmodal-demo@random-seed0" != encoder.identity
    assert not np.allclose(random_init.encode_texts(TEXTS), encoder.encode_texts(TEXTS))


def test_pickle_checkpoint_with_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(ModelUnavailable):
        load_encoder("xmodal-demo", str(path))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "model, pretrained, message",
    [
        ("ViT-Q-99", None, "unknown open_clip model 'ViT-Q-99'"),
        ("ViT-B-32", "not_a_tag", "known tags: .*laion2b_s34b_b79k"),
        ("ViT-B-32", "/no/such/checkpoint.safetensors", "does not exist"),
        ("local-dir:/no/such/folder", None, "not an open_clip local-dir model"),
    ],
)
def test_bad_model_choices_name_the_fix(model, pretrained, message):
    with pytest.raises(ModelUnavailable, match=message) as info:
        resolve_model(model, pretrained)
    if "unknown" in message:
        assert "xmodal-demo" in str(info.value)


def test_default_pretrained_model_fails_offline_with_alternatives():
    """The real default (ViT-B-32 / laion2b_s34b_b79k) goes through open_clip's download
    path; offline that fails, and the error names what works without a download."""
    assert resolve_model().identity == "ViT-B-32@laion2b_s34b_b79k"
    code = (
        "from xmodal.indexer.encoder import load_encoder\n"
        "from xmodal.indexer.errors import ModelUnavailable\n"
        "try:\n    load_encoder()\nexcept ModelUnavailable as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300).stdout
    assert out.startswith("ERR could not download the weights of ViT-B-32 / laion2b_s34b_b79k")
    assert "--model xmodal-demo" in out and "local-dir:" in out
