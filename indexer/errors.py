"""xmodal's own exceptions, shared by the indexer and the server.

Each class names the gRPC status it maps to (``code``); the server translates them in
one place (xmodal.server.errors). Messages say what to fix.
"""

from __future__ import annotations


class XmodalError(Exception):
    """Base class of every error xmodal raises on purpose."""

    code = "INTERNAL"


class InvalidArgument(XmodalError, ValueError):
    """A malformed request or input (empty text, bad k, unknown modality...).

    Also a ValueError, so callers (and tests) that catch ValueError for a bad argument
    keep working now that xmodal raises its own class (tests/test_pretrain.py does).
    """

    code = "INVALID_ARGUMENT"


class InvalidImage(InvalidArgument):
    """Bytes that do not decode as an image."""


class NotFound(XmodalError):
    """An unknown item id (or snapshot id)."""

    code = "NOT_FOUND"


class FailedPrecondition(XmodalError):
    """The system is not in a state to do this (no snapshot loaded, encoder mismatch)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(XmodalError):
    """Past a configured size limit (bytes, pixels, k, ids per request)."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(XmodalError):
    """The request ran past its deadline (the client's, or the server's own cap)."""

    code = "DEADLINE_EXCEEDED"


class CorpusError(XmodalError):
    """A corpus that cannot be read: missing files, bad JSON, missing fields."""

    code = "INVALID_ARGUMENT"


class ModelUnavailable(XmodalError):
    """An encoder that cannot be loaded here (no weights, no network, bad config)."""

    code = "FAILED_PRECONDITION"
