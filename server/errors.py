"""The one place where xmodal errors become gRPC status codes."""

from __future__ import annotations

import functools
import logging

import grpc

from xmodal.indexer.errors import XmodalError

log = logging.getLogger("xmodal.server")


def status_code(error: XmodalError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def rpc(method):
    """Decorate a servicer method: xmodal errors abort with their status and message;
    anything else is logged with its traceback and answered INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except XmodalError as exc:
            context.abort(status_code(exc), str(exc))
        except Exception:  # noqa: BLE001 - the server must answer, and the log keeps the cause
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see the server log")

    return wrapper
