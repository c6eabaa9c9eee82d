"""--device: the clear error without a GPU, the choice `auto` makes, and (where CUDA exists)
the encoder on the GPU against the CPU one."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from conftest import xmodal_cmd

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none here")


@pytest.mark.parametrize("command", ["index", "serve"])
def test_device_cuda_without_cuda_is_one_clear_line(tmp_path, command):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error is for machines without it")
    data = tmp_path / "data"
    args = ["index", str(tmp_path / "corpus")] if command == "index" else ["serve"]
    result = subprocess.run(
        xmodal_cmd(*args, "--data", str(data), "--model", "xmodal-demo", "--device", "cuda"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"xmodal {command}: error: --device cuda: no CUDA device on this machine")
    assert "--device cpu" in lines[0]
    assert not data.exists()  # refused before any work


def test_resolve_device_names():
    from xmodal.indexer.encoder import resolve_device
    from xmodal.indexer.errors import FailedPrecondition, InvalidArgument

    assert resolve_device("cpu") == resolve_device(None) == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda:0"
    else:
        assert resolve_device("auto") in ("cpu", "mps")
        with pytest.raises(FailedPrecondition, match="no CUDA device"):
            resolve_device("cuda:0")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(InvalidArgument, match="--device"):
            resolve_device(bad)


@NEEDS_CUDA
def test_cuda_encoder_matches_the_cpu_encoder(encoder):
    from PIL import Image

    from xmodal.indexer.encoder import load_encoder

    gpu = load_encoder("xmodal-demo", None, device="cuda")
    assert gpu.device.type == "cuda" and gpu.identity == encoder.identity
    texts = ["a red ring on a blue square", "x", "a large yellow cross in the upper left on a gray background"]
    cosines = np.sum(gpu.encode_texts(texts) * encoder.encode_texts(texts), axis=1)
    assert cosines.min() > 0.995  # fp16 autocast
    images = [Image.new("RGB", (80, 80), (40 * i, 90, 200 - 30 * i)) for i in range(4)]
    cosines = np.sum(gpu.encode_images(images) * encoder.encode_images(images), axis=1)
    assert cosines.min() > 0.995
    with pytest.raises(Exception, match="--device cuda:99"):
        load_encoder("xmodal-demo", None, device="cuda:99")
