"""Prometheus metrics of the service, in a registry of their own (never the process-global one).

The worker reports what happens (`observe_run`, `observe_build`, `observe_rollout`); what is
true now (queue depth, last successful release per service) is read from the state when
`/metrics` is scraped, so it is right even after a restart.
"""

from __future__ import annotations

import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from pipeline.state.queue import EventQueue
from pipeline.state.store import State
from pipeline.timeutil import epoch

CONTENT_TYPE = CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)

RUNS = Counter(
    "pipeline_runs",
    "Runs finished, by outcome (succeeded, failed, noop, interrupted, ...).",
    ["outcome"],
    registry=REGISTRY,
)
BUILD_SECONDS = Histogram(
    "pipeline_build_duration_seconds",
    "Time to build and push one image.",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600),
    registry=REGISTRY,
)
ROLLOUT_SECONDS = Histogram(
    "pipeline_rollout_duration_seconds",
    "Time to roll one service out to all its hosts, health checks included.",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
POLLS = Counter(
    "pipeline_polls",
    "Poll ticks this instance ran, by repo (each interval's tick runs on one instance).",
    ["repo"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "pipeline_queue_depth",
    "Events queued and not yet claimed by the worker.",
    registry=REGISTRY,
)
LAST_SUCCESS = Gauge(
    "pipeline_last_success_timestamp_seconds",
    "When the last successful release of a service finished (Unix seconds).",
    ["service"],
    registry=REGISTRY,
)

# Two scrapes at once would interleave clear() and set() of the per-service gauge.
_refresh_lock = threading.Lock()


def observe_run(outcome: str) -> None:
    """Count one finished run under its outcome."""
    RUNS.labels(outcome=outcome).inc()


def observe_poll(repo: str) -> None:
    """Count one poll tick of `repo` run by this instance."""
    POLLS.labels(repo=repo).inc()


def observe_build(seconds: float) -> None:
    """Record how long one image build (and push) took."""
    BUILD_SECONDS.observe(seconds)


def observe_rollout(seconds: float) -> None:
    """Record how long one service rollout took."""
    ROLLOUT_SECONDS.observe(seconds)


def refresh(state: State) -> None:
    """Set the state-derived gauges from the database: queue depth, last success per service."""
    depth = EventQueue(state).depth()
    last = state.last_success_by_service().items()
    QUEUE_DEPTH.set(int(depth or 0))
    LAST_SUCCESS.clear()  # a service removed from history must not linger
    for service, finished in last:
        if finished is not None:
            LAST_SUCCESS.labels(service=service).set(epoch(finished))


def render(state: State) -> bytes:
    """The Prometheus text exposition of every metric, the state-derived ones refreshed first."""
    with _refresh_lock:
        refresh(state)
        return generate_latest(REGISTRY)
