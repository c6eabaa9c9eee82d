"""Is a gain on held-out queries more than noise? A paired test on per-query figures.

Two heads answer the same validation queries; per query we take a figure of each (the gate
uses hits at 10, recall@10's own per-query figure; on 0/1 figures the test below is the
exact McNemar (sign) test of the queries that changed) and test whether the mean per-query
difference is above zero with Fisher's randomization (sign-flip) test (Smucker, Allan and
Carterette, CIKM 2007): under "no difference" each query's difference is as likely to have
had the other sign. Exact (all sign patterns) up to 16 non-zero differences,
10,000 seeded random patterns beyond. With several candidates tried on the same queries
(the blends of one head, or several heads), each must pass at ``(1 - confidence) / m``
(Bonferroni), so that the chance that *any* of them passes by luck stays below
``1 - confidence``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from .errors import InvalidArgument

ROUNDS = 10_000
EXACT_UP_TO = 16


def paired_gain_test(
    candidate: np.ndarray, reference: np.ndarray, *, rounds: int = ROUNDS, seed: int = 0
) -> tuple[float, float]:
    """One-sided paired randomization test of mean(candidate - reference) > 0.

    Args:
        candidate, reference: one figure per query, the same queries in the same order.

    Returns:
        (mean gain, p-value). p is 1 when there is no gain at all.

    Raises:
        InvalidArgument: the arrays are not of one length.
    """
    candidate, reference = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    if candidate.shape != reference.shape or candidate.ndim != 1:
        raise InvalidArgument("a paired test needs one figure per query from each head, for the same queries")
    n = len(candidate)
    if n == 0:
        return 0.0, 1.0
    diffs = candidate - reference
    observed = float(diffs.mean())
    nonzero = diffs[diffs != 0]
    if observed <= 0 or not len(nonzero):
        return observed, 1.0
    tol = 1e-12 * max(1.0, abs(observed))
    if len(nonzero) <= EXACT_UP_TO:
        patterns = ((np.arange(2 ** len(nonzero))[:, None] >> np.arange(len(nonzero))) & 1) * 2 - 1
        means = (patterns * nonzero).sum(1) / n
        return observed, float((means >= observed - tol).mean())
    rng = np.random.default_rng(seed)
    at_least = 0
    for start in range(0, rounds, 1000):
        signs = rng.integers(0, 2, size=(min(1000, rounds - start), len(nonzero)), dtype=np.int8) * 2 - 1
        at_least += int(((signs * nonzero).sum(1) / n >= observed - tol).sum())
    return observed, (at_least + 1) / (rounds + 1)


def detectable_gain(n: int, sd: float, *, confidence: float = 0.95, candidates: int = 1, power: float = 0.8) -> float:
    """The smallest true mean per-query gain that ``n`` paired queries detect with
    probability ``power`` at ``confidence`` over ``candidates`` (normal approximation):
    ``(z(1 - alpha / m) + z(power)) * sd / sqrt(n)``, sd being that of the per-query
    differences."""
    if n <= 0:
        return math.inf
    z = NormalDist().inv_cdf
    return (z(1 - (1 - confidence) / candidates) + z(power)) * sd / math.sqrt(n)


__all__ = ["detectable_gain", "paired_gain_test"]
