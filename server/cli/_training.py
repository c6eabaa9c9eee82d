"""HEAD OPTIONS (index, fit, eval) and REFIT OPTIONS (serve, refit): flags made from
FitConfig's and RefitPolicy's fields, and the configs built back from them."""

from __future__ import annotations

import argparse

from ._common import FieldFlag, add_field_flags, field_default, field_values

HEAD_FLAGS: tuple[FieldFlag, ...] = (
    ("--hidden", "hidden", "hidden width of mlp/shared heads (default %(default)s)"),
    ("--dim-out", "dim_out", "output size (default: the encoder's; pca: min(128, dim/2))"),
    ("--epochs", "epochs", "maximum epochs (default %(default)s; early stopping on val)"),
    ("--patience", "patience", "epochs without a better val recall before stopping (default %(default)s)"),
    ("--max-fit-seconds", "max_seconds", "time cap of one fit (default %(default)s)"),
    ("--lr", "lr", "AdamW learning rate (default %(default)s)"),
    ("--fit-batch-size", "batch_size", "pairs per training batch (default %(default)s)"),
    ("--seed", "seed", "random seed (default %(default)s)"),
    ("--pairwise-weight", "pairwise_weight", "weight of the label-aware pairwise loss (default %(default)s)"),
    ("--supcon-weight", "supcon_weight", "weight of the supervised contrastive loss (default %(default)s)"),
    (
        "--confidence",
        "confidence",
        "a new head goes live only if its validation gain over zero-shot passes a paired test at this "
        "confidence, corrected for the blends tried (default %(default)s)",
    ),
    (
        "--norm-penalty",
        "norm_penalty",
        "penalty on ||g(x)||^2 of a residual head, divided by the train pairs (default %(default)s)",
    ),
    (
        "--cv-below",
        "cv_below",
        "cross-validate a new head when there are fewer validation pairs than this (default %(default)s)",
    ),
    (
        "--replay-weight",
        "replay_weight",
        "weight of keeping replayed items (xmodal fit --replay-where) where the live head puts them "
        "(default %(default)s)",
    ),
)

REFIT_FLAGS: tuple[FieldFlag, ...] = (
    ("--refit-max-seconds", "max_seconds", "training time cap per refit (default %(default)s)"),
    (
        "--refit-tolerance",
        "tolerance",
        "promote only if validation recall@10 drops by at most this (default %(default)s)",
    ),
    ("--refit-epochs", "epochs", "maximum epochs per refit (default %(default)s)"),
    ("--feedback-weight", "feedback_weight", "weight of feedback pairs vs corpus pairs (default %(default)s)"),
    (
        "--hard-negative-weight",
        "hard_negative_weight",
        "an item marked irrelevant to a feedback query counts as this many ordinary negatives of that query "
        "(default %(default)s)",
    ),
    ("--keep-snapshots", "keep_snapshots", "snapshots kept for rollback (default %(default)s)"),
    (
        "--refit-confidence",
        "confidence",
        "also require a refit's validation gain over live to pass a paired test at this confidence, "
        "e.g. 0.95 (default %(default)s: not worse beyond the tolerance is enough)",
    ),
)


def add_head_args(parser: argparse.ArgumentParser) -> None:
    """HEAD OPTIONS, with FitConfig's defaults."""
    from xmodal.indexer.heads import HEAD_KINDS
    from xmodal.indexer.train import FitConfig

    parser.add_argument(
        "--head",
        default=field_default(FitConfig, "kind"),
        choices=HEAD_KINDS,
        help="head kind (default %(default)s); identity = zero-shot",
    )
    add_field_flags(parser, FitConfig, HEAD_FLAGS)
    parser.add_argument("--label-field", default=None, help="metadata field with a class label for label losses")


def fit_config(args: argparse.Namespace):
    from xmodal.indexer.train import FitConfig

    return FitConfig(kind=args.head, **field_values(args, HEAD_FLAGS))


def add_refit_args(parser: argparse.ArgumentParser) -> None:
    """REFIT OPTIONS, with RefitPolicy's defaults."""
    from xmodal.server.refit import MODES, RefitPolicy

    parser.add_argument(
        "--refit-mode",
        default=field_default(RefitPolicy, "mode"),
        choices=MODES,
        help="query: only the query modality's adapter, indexes reused; full: both heads, indexes "
        "rebuilt from the base store; auto: query unless the corpus changed (default %(default)s)",
    )
    add_field_flags(parser, RefitPolicy, REFIT_FLAGS)


def policy(args: argparse.Namespace):
    """The RefitPolicy of the refit flags; --refit-interval/--refit-after where the command has them."""
    from xmodal.server.refit import RefitPolicy

    return RefitPolicy(
        mode=args.refit_mode,
        interval_s=getattr(args, "refit_interval", None),
        after_feedback=getattr(args, "refit_after", None),
        **field_values(args, REFIT_FLAGS),
    )
