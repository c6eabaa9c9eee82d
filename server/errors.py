"""The one place where xmodal errors become gRPC status codes."""

from __future__ import annotations

import functools
import logging
import time

import grpc

from xmodal.indexer.errors import XmodalError

from . import metrics

log = logging.getLogger(__name__)


def status_code(error: XmodalError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def rpc(method):
    """Decorate a servicer method: xmodal errors abort with their status and message;
    anything else is logged with its traceback and answered INTERNAL. Every outcome is
    counted and timed in the metrics."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        started = time.perf_counter()
        code = "OK"
        try:
            return method(self, request, context)
        except XmodalError as exc:
            code = status_code(exc).name
            context.abort(status_code(exc), str(exc))
        except Exception:  # noqa: BLE001 - the server must answer, and the log keeps the cause
            code = "INTERNAL"
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see the server log")
        finally:
            metrics.observe(method.__name__, code, time.perf_counter() - started)

    return wrapper
