"""Prometheus metrics (prometheus-client), served on their own HTTP port."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter("xmodal_requests_total", "RPCs answered, by method and status code", ["method", "code"])
LATENCY = Histogram(
    "xmodal_request_seconds",
    "RPC latency, by method",
    ["method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FEEDBACK = Counter("xmodal_feedback_events_total", "feedback events acknowledged")
REFITS = Counter("xmodal_refit_runs_total", "refit runs finished, by mode and state", ["mode", "state"])
REFIT_SECONDS = Histogram("xmodal_refit_seconds", "refit run durations", buckets=(1, 5, 15, 60, 300, 900, 3600))
QUERY_CACHE = Counter(
    "xmodal_query_cache_lookups_total", "query embedding cache lookups, by modality and result", ["modality", "result"]
)
QUERY_CACHE_HIT_RATE = Gauge("xmodal_query_cache_hit_ratio", "query embedding cache hits over lookups since start")
QUERY_BATCH = Histogram(
    "xmodal_query_encode_batch_size",
    "queries encoded together in one forward pass, by modality",
    ["modality"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
INDEX_SIZE = Gauge("xmodal_index_vectors", "vectors in the live snapshot's index, by modality", ["modality"])


def observe(method: str, code: str, seconds: float) -> None:
    name = method.rsplit("/", 1)[-1]
    REQUESTS.labels(name, code).inc()
    LATENCY.labels(name).observe(seconds)


def cache_lookup(modality: str, hit: bool, hit_rate: float) -> None:
    QUERY_CACHE.labels(modality, "hit" if hit else "miss").inc()
    QUERY_CACHE_HIT_RATE.set(hit_rate)


def serve(port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY):
    """Start the /metrics HTTP endpoint; returns (server, thread)."""
    return start_http_server(port, addr=host, registry=registry)
