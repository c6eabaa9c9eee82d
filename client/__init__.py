"""xmodal Python client. Imports only grpc, protobuf and the generated stubs.

from xmodal.client import SearchClient
"""

from ._client import (
    CompactResult,
    DeleteResult,
    Hit,
    Item,
    NewItem,
    RefitRun,
    SearchClient,
    SearchResult,
    SnapshotInfo,
    Status,
    UpsertResult,
)
from ._errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
    XmodalError,
)

__all__ = [
    "SearchClient",
    "SearchResult",
    "Hit",
    "Item",
    "Status",
    "RefitRun",
    "SnapshotInfo",
    "NewItem",
    "UpsertResult",
    "DeleteResult",
    "CompactResult",
    "XmodalError",
    "InvalidArgument",
    "NotFound",
    "FailedPrecondition",
    "ResourceExhausted",
    "Unauthenticated",
    "PermissionDenied",
    "Unavailable",
    "DeadlineExceeded",
    "ServerError",
]
