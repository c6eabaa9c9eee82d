"""Contrastive losses for heads on frozen embeddings.

- :class:`InfoNCELoss`: symmetric image<->text InfoNCE (CLIP's loss) with a learnable
  temperature; several positives per row (duplicate captions, several texts of one image)
  are each scored against the row's negatives only, never pushed apart as each other's
  negatives; items a user marked as wrong answers to a query can be added as extra (hard)
  negatives of that query.
- :func:`pairwise_label_loss`: label-aware pairwise loss (as in Margaritis et al. 2025):
  same-label embeddings pulled together, different-label ones pushed below a margin.
- :func:`supcon_loss`: supervised contrastive loss (Khosla et al. 2020) over labels.
- :func:`paper_pairwise_loss`: the paper code's own loss (margaeor/emb-adapt-cl): binary
  cross-entropy on every pair of a batch, logit = similarity / temperature (0.1), target 1
  for the same label; the ``paper`` head's only loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InvalidArgument


class InfoNCELoss(torch.nn.Module):
    """Symmetric InfoNCE with a learnable logit scale (1 / temperature), clamped at 100."""

    def __init__(self, temperature: float = 0.07, learn_temperature: bool = True):
        super().__init__()
        if not 0 < temperature < 10:
            raise InvalidArgument(f"temperature must be in (0, 10), got {temperature}: pass e.g. 0.07")
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / temperature)), requires_grad=learn_temperature)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        positives: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        hard_images: tuple | None = None,
        hard_texts: tuple | None = None,
        hard_weight: float = 1.0,
    ) -> torch.Tensor:
        """
        Args:
            image, text: (B, d) normalised embeddings of B pairs (row i of each is pair i).
            positives: (B, B) bool, positives[i, j] when text j is a right answer for image i
                (the diagonal is always true).
            weights: optional (B,) pair weights.
            hard_images: optional (embeddings (M, d), rows (M,)): images known to be wrong
                answers to the text of pair ``rows[m]``; extra negatives of that text only.
            hard_texts: the same for texts that are wrong answers to a pair's image.
            hard_weight: each hard negative counts as this many ordinary negatives (its
                term in the softmax denominator is multiplied by it).
        """
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        logits = scale * image @ text.T
        image_to_text = _each_positive(logits, positives, _with_hard(logits, image, hard_texts, scale, hard_weight))
        text_to_image = _each_positive(
            logits.T, positives.T, _with_hard(logits.T, text, hard_images, scale, hard_weight)
        )
        per_pair = (image_to_text + text_to_image) / 2
        if weights is None:
            return per_pair.mean()
        return (per_pair * weights).sum() / weights.sum().clamp(min=1e-8)


def _each_positive(logits: torch.Tensor, positives: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """Per query row: the mean over its right answers p of -log(e^l_p / (e^l_p + sum over
    its wrong answers e^l_n)). Right answers never compete with each other, so identical
    captions leave no log(n) floor, and each right answer (the site's caption of an image
    *and* a user's words for it) must beat every wrong one on its own.

    Args:
        logits: (B, B), rows are queries. positives: (B, B) bool.
        extra: optional (B, M) logits of hard negatives, -inf outside their query's row.
    """
    negatives = logits.masked_fill(positives, float("-inf"))
    # a finite floor column keeps a row without any negative finite (and its gradient clean)
    columns = [negatives, logits.new_full((len(logits), 1), -1e4)] + ([extra] if extra is not None else [])
    wrong = torch.logsumexp(torch.cat(columns, 1), 1, keepdim=True)
    per = (torch.logaddexp(logits, wrong) - logits).masked_fill(~positives, 0)
    return per.sum(1) / positives.sum(1).clamp(min=1)


def _with_hard(
    logits: torch.Tensor, queries: torch.Tensor, hard: tuple | None, scale: torch.Tensor, weight: float
) -> torch.Tensor | None:
    """(B, M) logits of the hard negatives, each -inf except in the row of the query it
    belongs to (None without hard negatives)."""
    if hard is None or len(hard[0]) == 0:
        return None
    vectors, rows = hard
    values = scale * (queries[rows] * vectors).sum(-1) + math.log(weight)
    extra = logits.new_full((len(logits), len(vectors)), float("-inf"))
    return extra.index_put((rows, torch.arange(len(vectors), device=rows.device)), values)


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


def paper_pairwise_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """BCE with logits over all distinct pairs (i < j) of labelled embeddings: logit
    ``<e_i, e_j> / temperature``, target ``label_i == label_j`` (as the paper's code)."""
    same, valid = _label_mask(labels)
    upper = torch.triu(valid, diagonal=1)
    if not upper.any():
        return embeddings.sum() * 0
    logits = (embeddings @ embeddings.T / temperature)[upper]
    return F.binary_cross_entropy_with_logits(logits, same[upper].float())
