"""Contrastive losses for heads on frozen embeddings.

- :class:`InfoNCELoss`: symmetric image<->text InfoNCE (CLIP's loss) with a learnable
  temperature; several positives per row (duplicate captions, several texts of one image)
  share the target mass instead of being pushed apart as negatives.
- :func:`pairwise_label_loss`: label-aware pairwise loss (as in Margaritis et al. 2025):
  same-label embeddings pulled together, different-label ones pushed below a margin.
- :func:`supcon_loss`: supervised contrastive loss (Khosla et al. 2020) over labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class InfoNCELoss(torch.nn.Module):
    """Symmetric InfoNCE with a learnable logit scale (1 / temperature), clamped at 100."""

    def __init__(self, temperature: float = 0.07, learn_temperature: bool = True):
        super().__init__()
        if not 0 < temperature < 10:
            raise ValueError(f"temperature must be in (0, 10), got {temperature}")
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / temperature)),
                                              requires_grad=learn_temperature)

    def forward(self, image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            image, text: (B, d) normalised embeddings of B pairs (row i of each is pair i).
            positives: (B, B) bool, positives[i, j] when text j is a right answer for image i
                (the diagonal is always true).
            weights: optional (B,) pair weights.
        """
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        logits = scale * image @ text.T
        # -log of the probability mass on *any* right answer: identical captions share it,
        # instead of splitting a one-hot target (which would leave a log(n) floor).
        image_to_text = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positives, float("-inf")), 1)
        text_to_image = torch.logsumexp(logits.T, 1) - torch.logsumexp(logits.T.masked_fill(~positives.T, float("-inf")), 1)
        per_pair = (image_to_text + text_to_image) / 2
        if weights is None:
            return per_pair.mean()
        return (per_pair * weights).sum() / weights.sum().clamp(min=1e-8)


def _label_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(same-label mask without the diagonal, valid-pair mask); label -1 means unlabelled."""
    valid = labels >= 0
    same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    both = valid[:, None] & valid[None, :] & ~eye
    return same & ~eye, both


def pairwise_label_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Mean (1 - cos) over same-label pairs plus mean relu(cos - margin) over others."""
    same, valid = _label_mask(labels)
    if not valid.any():
        return embeddings.sum() * 0
    cos = embeddings @ embeddings.T
    different = valid & ~same
    pull = (1 - cos[same]).mean() if same.any() else cos.sum() * 0
    push = torch.relu(cos[different] - margin).mean() if different.any() else cos.sum() * 0
    return pull + push


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss: each anchor's same-label items are its positives."""
    same, valid = _label_mask(labels)
    anchors = same.any(1)
    if not anchors.any():
        return embeddings.sum() * 0
    logits = embeddings @ embeddings.T / temperature
    logits = logits.masked_fill(~valid, float("-inf"))
    log_prob = F.log_softmax(logits, 1).masked_fill(~valid, 0)
    mean_positive = (log_prob * same).sum(1)[anchors] / same.sum(1)[anchors]
    return -mean_positive.mean()
