"""API keys and roles, checked by one server interceptor.

Keys come from a JSON file (``--api-keys FILE``) holding only their sha256 hashes, and/or
from the environment (``XMODAL_API_KEYS="role:key,role:key"``, hashed on load). Clients
send ``authorization: Bearer <key>`` in the call metadata. Hashes are compared with
hmac.compare_digest; a key itself is never logged or stored.

Roles, each including the ones before it:

- ``search``: Search, GetItems, GetStatus
- ``feedback``: + SubmitFeedback
- ``index``: + IndexService (UpsertItems, DeleteItems: the live corpus)
- ``admin``: + AdminService (Refit, ListSnapshots, Rollback, Compact)

Health checks and server reflection stay open.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from xmodal.indexer.errors import InvalidArgument

from . import metrics

ROLES = ("search", "feedback", "index", "admin")
ENV_KEYS = "XMODAL_API_KEYS"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_SEARCH = {"/xmodal.v1.SearchService/Search", "/xmodal.v1.SearchService/GetItems", "/xmodal.v1.SearchService/GetStatus"}
_FEEDBACK = _SEARCH | {"/xmodal.v1.SearchService/SubmitFeedback"}
_INDEX = _FEEDBACK | {"/xmodal.v1.IndexService/UpsertItems", "/xmodal.v1.IndexService/DeleteItems"}
ALLOWED = {"search": _SEARCH, "feedback": _FEEDBACK, "index": _INDEX, "admin": None}  # None: everything
KEY_FILE_LAYOUT = '{"keys": [{"name": ..., "role": ..., "sha256": ...}]}'


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    name: str
    role: str
    sha256: str


class KeyRing:
    """The configured keys (hashes only)."""

    def __init__(self, entries: list[KeyEntry]):
        for entry in entries:
            if entry.role not in ROLES:
                raise InvalidArgument(f"key {entry.name!r} has unknown role {entry.role!r}; roles: {', '.join(ROLES)}")
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def load(cls, path: str | Path | None = None, environ: dict | None = None) -> KeyRing:
        """Keys from a JSON file ({"keys": [{"name", "role", "sha256"}]}) and the environment."""
        entries: list[KeyEntry] = []
        if path:
            try:
                document = json.loads(Path(path).read_text())
                entries += [KeyEntry(k["name"], k["role"], k["sha256"]) for k in document["keys"]]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InvalidArgument(f"cannot read API keys from {path}: {exc}; expected {KEY_FILE_LAYOUT}") from None
        raw = (environ if environ is not None else os.environ).get(ENV_KEYS, "")
        for n, item in enumerate(filter(None, (part.strip() for part in raw.split(","))), start=1):
            role, sep, key = item.partition(":")
            if not sep or not key:
                raise InvalidArgument(f"{ENV_KEYS} entry {n} is not 'role:key'")
            entries.append(KeyEntry(f"env-{n}", role, hash_key(key)))
        return cls(entries)

    def role_of(self, key: str) -> KeyEntry | None:
        digest = hash_key(key)
        found = None
        for entry in self.entries:  # compare against every entry: timing does not tell which matched
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found


def add_key(path: str | Path, name: str, role: str) -> str:
    """Generate a key, store its hash in ``path`` (created if missing), return the key."""
    if role not in ROLES:
        raise InvalidArgument(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    path = Path(path)
    document = _read_key_file(path)
    if any(k["name"] == name for k in document["keys"]):
        raise InvalidArgument(f"a key named {name!r} already exists in {path}")
    key = "xm_" + secrets.token_urlsafe(32)
    document["keys"].append({"name": name, "role": role, "sha256": hash_key(key), "created_at": time.time()})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return key


def _read_key_file(path: Path) -> dict:
    """The key file's document ({"keys": []} for a new file in an existing folder).

    Raises:
        InvalidArgument: the folder is missing, or the file is not a key file.
    """
    if not path.exists():
        if not path.parent.is_dir():
            raise InvalidArgument(
                f"folder {path.parent} does not exist: create it, or pass a key file in an existing folder"
            )
        return {"keys": []}
    try:
        document = json.loads(path.read_text())
        entries = document["keys"]
        if not isinstance(entries, list) or not all(isinstance(k, dict) and "name" in k for k in entries):
            raise TypeError("'keys' must be a list of objects with a name")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(
            f"cannot read API keys from {path}: {exc}; expected {KEY_FILE_LAYOUT}, or pass a new file"
        ) from None
    return document


def _deny(code: grpc.StatusCode, details: str, method: str):
    def handler(request, context):
        metrics.observe(method, code.name, 0.0)
        context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(handler)


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks the bearer key and the role for every xmodal RPC."""

    def __init__(self, keys: KeyRing):
        self.keys = keys

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return _deny(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send metadata 'authorization: Bearer <api key>'",
                method,
            )
        entry = self.keys.role_of(key.strip())
        if entry is None:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, "API key not recognised", method)
        allowed = ALLOWED[entry.role]
        if allowed is not None and method not in allowed:
            return _deny(
                grpc.StatusCode.PERMISSION_DENIED,
                f"role '{entry.role}' may not call {method.rsplit('/', 1)[-1]}; it needs role "
                f"{'feedback' if method in _FEEDBACK else 'admin'}",
                method,
            )
        return continuation(handler_call_details)
