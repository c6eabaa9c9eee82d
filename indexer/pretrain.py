"""Pretrain the shipped ``xmodal-demo`` open_clip model from scratch on the CPU.

The model is trained contrastively (open_clip's ``ClipLoss``: symmetric InfoNCE with a
learnable logit scale) on image/caption pairs of the *source* style of the generated
world (:mod:`xmodal.indexer.world`). Pairs are generated on the fly from fresh scene
seeds at every step, so the model sees many distinct scenes and does not memorise a
fixed corpus. The result is written next to the model's ``open_clip_config.json`` as
``open_clip_model.safetensors`` (fp16), the folder layout that
``open_clip.create_model_and_transforms("local-dir:<folder>")`` loads.

Run::

    python -m xmodal.indexer.pretrain --out indexer/models/xmodal-demo \
        --steps 330 --batch-size 256 --lr 2e-3 --threads 1 --minutes 12.5

(the run that made the shipped weights: 11 min on one core, source-style text->image
recall@10 0.993 and target-style 0.005 on 1,000 held-out scenes).

The final report includes a quick retrieval check (text -> image recall@1/@10) on held-out
scenes in the source style and in the target style; the target style is expected to be
much worse, which is the gap the domain-adaptation feature exists to close.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file

from . import world
from .errors import InvalidArgument, XmodalError

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

# Training scene seeds are (seed << 32) | step, so they stay below 2**52 for any allowed
# seed; held-out scenes use a seed far above that range, so the two never coincide.
MAX_SEED = 2**20
EVAL_SEED = 2**60 + 7
EVAL_SCENES = 1000
# Render seeds only drive the target style's noise; an offset keeps them apart from the
# scene seeds for readability in logs, nothing more.
EVAL_RENDER_SEED = 12_345


def load_config(out_dir: str | os.PathLike) -> dict:
    """Read and check the open_clip config of a local-dir model folder.

    Args:
        out_dir: folder that holds ``open_clip_config.json``.

    Returns:
        The parsed config (``model_cfg`` and ``preprocess_cfg``).

    Raises:
        FileNotFoundError: the folder has no config.
        InvalidArgument: the config lacks the fields pretraining needs.
    """
    path = Path(out_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pretraining writes weights next to an existing config")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): fix or restore it") from None
    model_cfg = config.get("model_cfg")
    if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise InvalidArgument(
            f"{path} has no model_cfg with vision_cfg and text_cfg: add both (open_clip's model config layout)"
        )
    pre = config.get("preprocess_cfg", {})
    for key in ("mean", "std"):
        if len(pre.get(key, ())) != 3:
            raise InvalidArgument(f"{path}: preprocess_cfg.{key} must hold 3 numbers")
    return config


def build_model(config: dict, seed: int) -> open_clip.model.CLIP:
    """Create the randomly initialised model, deterministically in ``seed``.

    Args:
        config: a config from :func:`load_config`.
        seed: torch seed for the initialisation.

    Returns:
        A float32 ``open_clip.model.CLIP`` whose state_dict keys are those
        ``local-dir:`` loading expects.
    """
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**config["model_cfg"])


def image_size_of(config: dict) -> int:
    """The square input size of the vision tower, from the config."""
    size = config["model_cfg"]["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size)


class Normaliser:
    """Turn PIL images that are already at the model's input size into a model batch.

    This is what open_clip's preprocess does for such an image (its resize and centre crop
    leave a size x size image unchanged): convert to RGB, scale to [0, 1], subtract the
    config's mean and divide by its std. Doing it in numpy on a whole batch is far cheaper
    than the per-image torchvision pipeline, and ``tests/test_pretrain.py`` checks that
    both give the same tensors.
    """

    def __init__(self, config: dict):
        pre = config.get("preprocess_cfg", {})
        self.size = image_size_of(config)
        self.mean = np.asarray(pre["mean"], np.float32).reshape(1, 1, 1, 3)
        self.std = np.asarray(pre["std"], np.float32).reshape(1, 1, 1, 3)

    def __call__(self, images: Sequence) -> torch.Tensor:
        """Normalise images into a float32 tensor (N, 3, size, size).

        Raises:
            InvalidArgument: an image is not size x size (it would need open_clip's resize).
        """
        arrays = []
        for image in images:
            if image.size != (self.size, self.size):
                raise InvalidArgument(
                    f"expected {self.size}x{self.size} images, got {image.size[0]}x{image.size[1]}: "
                    "render or resize them to the model's input size"
                )
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        batch = np.stack(arrays).astype(np.float32) / 255.0
        batch = (batch - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def make_batch(scene_list, style: str, normaliser: Normaliser, tokenizer, render_seed: int):
    """Render and caption scenes into (images, tokens) tensors."""
    images = [world.render(s, style, normaliser.size, seed=render_seed + i) for i, s in enumerate(scene_list)]
    captions = [world.caption(s, style) for s in scene_list]
    return normaliser(images), tokenizer(captions)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: torch.nn.Module, weight_decay: float):
    # As in open_clip's training code: no decay on gains, biases, norms and the logit
    # scale (decaying them only pulls them off their useful values).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


@torch.no_grad()
def retrieval(
    model, normaliser: Normaliser, tokenizer, *, n: int = EVAL_SCENES, style: str = "source", batch_size: int = 250
) -> dict:
    """Text -> image recall on ``n`` held-out scenes (seed disjoint from training).

    Args:
        model: an open_clip CLIP model.
        normaliser: the image normaliser for the model's config.
        tokenizer: the open_clip tokenizer for the model.
        n: number of held-out scenes; the same scenes are used for every style.
        style: ``source`` or ``target``.
        batch_size: encoding batch size.

    Returns:
        ``{"r1", "r10", "r1_ceiling"}``: the fraction of captions whose own image ranks
        first / in the top 10, and the best R@1 reachable when several scenes share one
        caption (a caption cannot tell those images apart).
    """
    was_training = model.training
    model.eval()
    held_out = world.scenes(n, EVAL_SEED)
    image_features, text_features = [], []
    for start in range(0, n, batch_size):
        chunk = held_out[start : start + batch_size]
        images, tokens = make_batch(chunk, style, normaliser, tokenizer, EVAL_RENDER_SEED + start)
        image_features.append(torch.nn.functional.normalize(model.encode_image(images), dim=-1))
        text_features.append(torch.nn.functional.normalize(model.encode_text(tokens), dim=-1))
    model.train(was_training)
    similarity = torch.cat(text_features) @ torch.cat(image_features).T
    own = similarity.diagonal().unsqueeze(1)
    # Rank of each caption's own image: how many images score strictly higher.
    rank = (similarity > own).sum(dim=1)
    captions = [world.caption(s, style) for s in held_out]
    counts: dict[str, int] = {}
    for text in captions:
        counts[text] = counts.get(text, 0) + 1
    return {
        "r1": float((rank < 1).float().mean()),
        "r10": float((rank < 10).float().mean()),
        "r1_ceiling": float(np.mean([1.0 / counts[t] for t in captions])),
    }


def save_weights(model: torch.nn.Module, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the model's state_dict as fp16 safetensors, atomically.

    Args:
        model: the trained model.
        out_dir: destination folder.
        metadata: string metadata stored in the safetensors header.

    Returns:
        The path of the weights file.
    """
    out = Path(out_dir)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    # A temporary file in the same folder, then os.replace: readers never see a partial file.
    fd, tmp = tempfile.mkstemp(prefix=".open_clip_model.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; the shipped weights must be readable by all
        os.replace(tmp, out / WEIGHTS_NAME)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out / WEIGHTS_NAME


def pretrain(
    out_dir: str | os.PathLike,
    *,
    steps: int,
    batch_size: int = 256,
    seed: int = 0,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup: int | None = None,
    threads: int | None = None,
    minutes: float | None = None,
    eval_scenes: int = EVAL_SCENES,
    progress: bool = True,
) -> dict:
    """Train the model described by ``out_dir/open_clip_config.json`` from scratch.

    Args:
        out_dir: a local-dir model folder; its config is read and left unchanged, and
            ``open_clip_model.safetensors`` is (re)written there in fp16.
        steps: optimiser steps; also the length of the cosine schedule.
        batch_size: image/caption pairs per step (each from a fresh scene seed).
        seed: seeds torch, numpy, random and the training scenes.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay on matrices and embeddings.
        warmup: linear warmup steps (default: 5% of ``steps``, at least 1).
        threads: torch intra-op threads (default: leave torch's setting).
        minutes: wall-clock cap on the training loop; training stops early (before the
            schedule ends) when it is reached. Evaluation and saving come on top.
        eval_scenes: held-out scenes for the retrieval check (0 skips it).
        progress: show a tqdm bar.

    Returns:
        A report: ``steps`` (done), ``planned_steps``, ``stopped_early``, ``seconds``,
        ``final_loss`` (mean of the last 20 steps), ``last_loss``, ``logit_scale``,
        ``source``/``target`` retrieval dicts (see :func:`retrieval`), ``weights`` path and
        ``weights_bytes``.

    Raises:
        InvalidArgument: a bad argument, or the loss became non-finite.
        FileNotFoundError: ``out_dir`` has no config.
    """
    warmup = _check_arguments(
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        threads=threads,
        minutes=minutes,
        eval_scenes=eval_scenes,
    )
    config = load_config(out_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    model = build_model(config, seed)
    model.train()
    # The tokenizer open_clip itself returns for this folder, so training and serving
    # tokenise identically (context length from the config's text_cfg).
    tokenizer = open_clip.get_tokenizer(f"local-dir:{Path(out_dir).resolve()}")
    normaliser = Normaliser(config)
    optimiser = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    started = time.monotonic()
    losses = _run_steps(
        model,
        optimiser,
        tokenizer,
        normaliser,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        lr=lr,
        warmup=warmup,
        deadline=started + minutes * 60 if minutes is not None else None,
        progress=progress,
    )
    if not losses:
        raise InvalidArgument(f"the {minutes}-minute cap left no time for a single step: raise --minutes")
    report: dict[str, Any] = {
        "steps": len(losses),
        "planned_steps": steps,
        "stopped_early": len(losses) < steps,
        "batch_size": batch_size,
        "seed": seed,
        "seconds": round(time.monotonic() - started, 1),
        "final_loss": float(np.mean(losses[-20:])),
        "last_loss": losses[-1],
        "logit_scale": float(model.logit_scale.exp().item()),
    }
    if eval_scenes:
        report.update(_evaluate_shipped(model, normaliser, tokenizer, eval_scenes))
    path = save_weights(model, out_dir, {"steps": len(losses), "batch_size": batch_size, "seed": seed, "lr": lr})
    return {**report, "weights": str(path), "weights_bytes": path.stat().st_size}


def _evaluate_shipped(model, normaliser: Normaliser, tokenizer, eval_scenes: int) -> dict[str, Any]:
    """Retrieval on held-out source and target scenes with the fp16-rounded weights, i.e.
    what is shipped."""
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return {
        "source": retrieval(model, normaliser, tokenizer, n=eval_scenes, style="source"),
        "target": retrieval(model, normaliser, tokenizer, n=eval_scenes, style="target"),
    }


def _check_arguments(
    *,
    steps: int,
    batch_size: int,
    seed: int,
    lr: float,
    weight_decay: float,
    warmup: int | None,
    threads: int | None,
    minutes: float | None,
    eval_scenes: int,
) -> int:
    """Validate :func:`pretrain`'s arguments; returns the warmup (default 5% of steps)."""
    if not isinstance(steps, int) or steps < 1:
        raise InvalidArgument(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise InvalidArgument(
            f"batch_size must be an integer >= 2 (contrastive loss needs negatives), got {batch_size!r}"
        )
    if not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise InvalidArgument(f"seed must be an integer in [0, {MAX_SEED}), got {seed!r}")
    if not lr > 0:
        raise InvalidArgument(f"lr must be positive, got {lr!r}")
    if weight_decay < 0:
        raise InvalidArgument(f"weight_decay must be >= 0, got {weight_decay!r}")
    if threads is not None and threads < 1:
        raise InvalidArgument(f"threads must be >= 1, got {threads!r}")
    if minutes is not None and not minutes > 0:
        raise InvalidArgument(f"minutes must be positive, got {minutes!r}")
    if eval_scenes < 0:
        raise InvalidArgument(f"eval_scenes must be >= 0, got {eval_scenes!r}")
    if warmup is None:
        warmup = max(1, steps // 20)
    if warmup < 1:
        raise InvalidArgument(f"warmup must be >= 1, got {warmup!r}")
    return warmup


def _run_steps(
    model,
    optimiser,
    tokenizer,
    normaliser: Normaliser,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    lr: float,
    warmup: int,
    deadline: float | None,
    progress: bool,
) -> list[float]:
    """The training loop (cosine schedule, clipped gradients, clamped logit scale); returns
    the loss of each step done (fewer than ``steps`` when ``deadline`` passes)."""
    from tqdm import tqdm

    loss_fn = open_clip.ClipLoss()
    max_scale = math.log(100.0)
    losses: list[float] = []
    bar = tqdm(total=steps, disable=not progress, desc="pretrain", unit="step", file=sys.stderr)
    for step in range(steps):
        if deadline is not None and time.monotonic() >= deadline:
            break
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        # A fresh scene seed per step: every batch is new scenes (the caption space is
        # finite, but positions jitter and combinations vary), so nothing is memorised.
        images, tokens = make_batch(world.scenes(batch_size, (seed << 32) | step), "source", normaliser, tokenizer, 0)
        image_features, text_features, logit_scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale)
        if not torch.isfinite(loss):
            raise InvalidArgument(f"loss became non-finite ({loss.item()}) at step {step}; lower lr")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        # open_clip clamps the scale at 100 too: beyond it the loss gets unstable.
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_scale)
        losses.append(float(loss.item()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    bar.close()
    return losses


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m xmodal.indexer.pretrain --out DIR --steps N [--minutes M]``.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status (0 on success).
    """
    parser = argparse.ArgumentParser(prog="python -m xmodal.indexer.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="local-dir model folder holding open_clip_config.json")
    parser.add_argument("--steps", type=int, required=True, help="optimiser steps (cosine schedule length)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of --steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock cap on training")
    parser.add_argument("--eval-scenes", type=int, default=EVAL_SCENES)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        report = pretrain(
            args.out,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup=args.warmup,
            threads=args.threads,
            minutes=args.minutes,
            eval_scenes=args.eval_scenes,
            progress=not args.no_progress,
        )
    except (XmodalError, FileNotFoundError) as exc:
        print(f"pretrain: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
