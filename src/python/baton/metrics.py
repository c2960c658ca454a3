"""What baton exports to Prometheus (docs/metrics.md): the metric list, cheap histograms, and the collector.

Nothing is counted at scrape time.  The scheduler and the coordinator keep plain counters as they work (an int
or a dict entry per event); ``BatonCollector`` turns them into metric families when Prometheus asks, on the
daemon's event loop, so a scrape sees one consistent state and costs the same with 100 or 100,000 tasks.
The router's counters come from the router itself (a CTL_STATS round trip, ``Coordinator.router_stats``)
right before the families are built: no multiprocess mode, no shared files.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import Any, Final, NamedTuple

__all__ = ["METRICS", "BUCKETS_S", "PATTERNS", "PRIORITIES", "MODES", "Histogram", "BatonCollector"]


class Metric(NamedTuple):
    name: str  # without the _total / _bucket suffixes a scrape adds
    kind: str  # gauge | counter | histogram
    labels: tuple[str, ...]
    help: str


METRICS: Final[tuple[Metric, ...]] = (
    Metric("baton_tasks", "gauge", ("state",), "Tasks in each state."),
    Metric("baton_task_transitions", "counter", ("from_state", "to_state"), "Task state changes since start."),
    Metric("baton_tasks_submitted", "counter", (), "Tasks accepted (enqueue, manifest import, requeue)."),
    Metric("baton_tasks_completed", "counter", (), "Tasks completed."),
    Metric("baton_tasks_failed", "counter", (), "Attempts that ended in failure (reported, lease expired, agent lost)."),
    Metric("baton_tasks_retried", "counter", (), "Failed attempts that made the task ready for another try."),
    Metric("baton_tasks_dead_lettered", "counter", (), "Tasks moved to dead_lettered."),
    Metric("baton_ready_tasks", "gauge", ("agent_type",), "Ready tasks waiting for an agent of that type."),
    Metric("baton_agents", "gauge", ("agent_type", "state"), "Connected agents: idle (no task held) or busy."),
    Metric("baton_wip_in_use", "gauge", ("agent_type",), "Tasks of that agent type in progress."),
    Metric("baton_wip_limit", "gauge", ("agent_type",), "The WIP limit of that agent type."),
    Metric("baton_handoff_latency_seconds", "histogram", (),
           "A RESULT reaching the coordinator -> a task it released dispatched to an agent."),
    Metric("baton_queue_wait_seconds", "histogram", (), "A task becoming ready -> dispatched to an agent."),
    Metric("baton_task_run_seconds", "histogram", (), "Dispatched to an agent -> its RESULT at the coordinator."),
    Metric("baton_router_up", "gauge", (), "1 when the router answered this scrape's statistics request."),
    Metric("baton_router_frames", "counter", ("pattern", "priority"), "Frames the router took in."),
    Metric("baton_router_bytes", "counter", ("pattern", "priority"), "Bytes of those frames, headers included."),
    Metric("baton_router_ring_full", "counter", ("ring",), "Sends that found a shared-memory ring full."),
    Metric("baton_router_connections", "gauge", (), "Open client connections."),
    Metric("baton_router_bad_frames", "counter", (), "Frames refused as malformed."),
    Metric("baton_mode", "gauge", ("mode",), "1 for the current execution mode, 0 for the others."),
    Metric("baton_mode_switches", "counter", ("reason",), "Execution mode switches since start."),
    Metric("baton_redundant_divergences", "counter", (), "REDUNDANT mode: Python shadow decisions that differed."),
    Metric("baton_build_info", "gauge", ("version", "router", "python"), "Always 1."),
)

# Histogram upper bounds, seconds: 10 us .. 10 s.
BUCKETS_S: Final[tuple[float, ...]] = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
    500e-3, 1.0, 2.5, 5.0, 10.0,
)
# The router's routing patterns and the frame priorities, as label values (docs/metrics.md).
PATTERNS: Final = ("direct", "request", "reply", "publish", "multicast", "broadcast", "task", "result", "control")
PRIORITIES: Final = ("critical", "high", "normal", "low", "batch")
MODES: Final = ("INTELLIGENT", "PYTHON_ONLY", "REDUNDANT", "SPEED_CRITICAL")


class Histogram:
    """A fixed-bucket histogram that costs one bisect and two adds per observation (prometheus_client's
    takes a lock and walks its buckets in Python: too much for a figure recorded per task)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS_S, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (le, count) pairs, +Inf last."""
        out, total = [], 0
        for bound, n in zip((*map(repr, BUCKETS_S), "+Inf"), self.counts):
            total += n
            out.append((bound, total))
        return out
