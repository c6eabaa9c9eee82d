"""How `xmodal serve` binds and runs, each default declared once, and the package version.

Request limits are engine.Limits and refit settings refit.RefitPolicy; this holds the rest
of the server's settings, so that the CLI reads its defaults from here rather than typing
them again. Imports nothing heavy (the CLI builds its parser from it).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from xmodal.indexer.errors import InvalidArgument

MIB = 1024 * 1024
PORT_RANGE = (0, 65535)


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Where and how the gRPC server listens. Validated on creation (InvalidArgument)."""

    host: str = "127.0.0.1"  # address to bind; a non-loopback one needs API keys
    port: int = 50051  # 0 binds any free port
    rpc_workers: int = 8  # gRPC worker threads
    watch_interval: float = 2.0  # seconds between checks of snapshots/CURRENT
    grace: float = 5.0  # seconds calls in flight get on SIGTERM
    max_concurrent: int | None = 64  # RPCs handled at once, more get RESOURCE_EXHAUSTED (None: no cap)
    max_message_bytes: int = 32 * MIB  # largest gRPC request, larger gets RESOURCE_EXHAUSTED
    metrics_host: str = "127.0.0.1"  # address of the Prometheus endpoint
    metrics_port: int | None = None  # port of the Prometheus endpoint (None: off)
    search_threads: int = 1  # OpenMP threads FAISS may use for one search (0: one per core, FAISS's default)

    def __post_init__(self):
        self._check_hosts()
        self._check_ports()
        self._check_counts()
        self._check_seconds()

    @property
    def address(self) -> str:
        """host:port, as a client dials it."""
        return f"{self.host}:{self.port}"

    def _check_hosts(self) -> None:
        for name in ("host", "metrics_host"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidArgument(f"{name} must be a non-empty address, got {value!r}")

    def _check_ports(self) -> None:
        low, high = PORT_RANGE
        for name, optional in (("port", False), ("metrics_port", True)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not _is_int(value) or not low <= value <= high:
                raise InvalidArgument(f"{name} must be an integer from {low} to {high}, got {value!r}")

    def _check_counts(self) -> None:
        for name, optional in (("rpc_workers", False), ("max_message_bytes", False), ("max_concurrent", True)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not _is_int(value) or value < 1:
                raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.search_threads) or self.search_threads < 0:
            raise InvalidArgument(
                f"search_threads must be 0 (one per core) or a positive integer, got {self.search_threads!r}"
            )

    def _check_seconds(self) -> None:
        if not _is_number(self.watch_interval) or not self.watch_interval > 0:
            raise InvalidArgument(f"watch_interval must be a positive number of seconds, got {self.watch_interval!r}")
        if not _is_number(self.grace) or not 0 <= self.grace < float("inf"):
            raise InvalidArgument(f"grace must be a finite number of seconds, not negative, got {self.grace!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def version() -> str:
    """The installed xmodal's version (pyproject.toml's), or "0+unknown" when it is not installed."""
    try:
        return importlib.metadata.version("xmodal")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
