"""Request limits of one server."""

from __future__ import annotations

from dataclasses import dataclass

from xmodal.indexer.errors import InvalidArgument, ResourceExhausted
from xmodal.indexer.images import DEFAULT_MAX_PIXELS


@dataclass(kw_only=True)
class Limits:
    """Request limits; past them a request gets RESOURCE_EXHAUSTED (k: INVALID_ARGUMENT)."""

    max_k: int = 1000
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_text_chars: int = 10_000
    max_items_per_request: int = 100
    max_feedback_ids: int = 100
    max_upsert_items: int = 256  # items per UpsertItems call, ids per DeleteItems call
    deadline_s: int = 30  # server-side cap on one search or feedback call

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"limit {name} must be a positive integer, got {value!r}")

    def at_most(self, name: str, value: int, what: str, fix: str = "") -> None:
        """Raise ResourceExhausted when ``value`` is over the limit ``name``, saying
        "<value> <what>, over the limit of <limit>[: <fix>]"."""
        limit = getattr(self, name)
        if value > limit:
            raise ResourceExhausted(f"{value:,} {what}, over the limit of {limit:,}" + (f": {fix}" if fix else ""))
