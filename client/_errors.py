"""xmodal client errors, mapped from gRPC status codes in one place."""

from __future__ import annotations

import contextlib

import grpc


class XmodalError(Exception):
    """Base class of the errors the client raises. ``code`` is the gRPC status name."""

    code = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code


class InvalidArgument(XmodalError):
    code = "INVALID_ARGUMENT"


class NotFound(XmodalError):
    code = "NOT_FOUND"


class FailedPrecondition(XmodalError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(XmodalError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(XmodalError):
    code = "UNAUTHENTICATED"


class PermissionDenied(XmodalError):
    code = "PERMISSION_DENIED"


class Unavailable(XmodalError):
    """The server cannot be reached (not running, wrong address) or is shutting down."""

    code = "UNAVAILABLE"


class DeadlineExceeded(XmodalError):
    code = "DEADLINE_EXCEEDED"


class ServerError(XmodalError):
    """INTERNAL and any other status: a fault on the server's side."""

    code = "INTERNAL"


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
    )
}


@contextlib.contextmanager
def map_errors(target: str):
    """Translate grpc.RpcError into xmodal's own classes (raised from None)."""
    try:
        yield
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = ""
            if any(word in details.lower() for word in ("ssl", "handshake", "certificate", "tls", "socket closed")):
                hint = (
                    "; if the server uses TLS, connect with tls=True and the CA that signed its certificate (ca_cert=)"
                )
            details = f"xmodal server at {target} is unavailable ({details}){hint}"
        cls = _BY_CODE.get(code.name, ServerError)
        raise cls(details, code.name) from None
