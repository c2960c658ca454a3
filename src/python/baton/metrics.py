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

__all__ = ["METRICS", "BUCKETS_S", "PATTERNS", "PRIORITIES", "Histogram", "BatonCollector"]


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
    Metric("baton_tasks_failed", "counter", (),
           "Attempts that ended in failure (reported, lease expired, agent lost)."),
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


class BatonCollector:
    """Builds every family of ``METRICS`` from the daemon's live state (a prometheus_client collector).

    ``daemon`` is the running daemon (daemon._Daemon): its ``coordinator`` (None until started), its
    ``router_kind`` and ``mode`` (see docs/metrics.md).  ``router_stats`` is the router's answer to the
    statistics request the HTTP handler made right before this scrape (None: no answer, router_up 0)."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.router_stats: Mapping[str, Any] | None = None
        self._types: set[str] = set()  # agent types seen so far

    def describe(self) -> list[Any]:
        return []  # families are built per scrape; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        import platform

        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from baton import __version__

        daemon = self.daemon
        co = daemon.coordinator
        kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "histogram": HistogramMetricFamily}
        fams: dict[str, Any] = {m.name: kinds[m.kind](m.name, m.help, labels=m.labels) for m in METRICS}
        from baton.modes import MODES

        modes = daemon.modes
        for name in MODES:
            fams["baton_mode"].add_metric([name], 1.0 if name == modes.mode else 0.0)
        for reason, n in modes.switches.items():
            fams["baton_mode_switches"].add_metric([reason], n)
        fams["baton_redundant_divergences"].add_metric([], co.counters["redundant_divergences"] if co else 0)
        fams["baton_build_info"].add_metric([__version__, modes.router_kind, platform.python_version()], 1.0)
        if co is not None:
            self._scheduler(fams, co.scheduler, co.agents_by_state())
            for name, h in (("baton_handoff_latency_seconds", co.handoff_latency),
                            ("baton_queue_wait_seconds", co.queue_wait), ("baton_task_run_seconds", co.run_time)):
                fams[name].add_metric([], h.buckets(), h.sum)
        self._router(fams)
        yield from fams.values()

    def _scheduler(self, fams: dict[str, Any], sch: Any, agents: Mapping[tuple[str, str], int]) -> None:
        from baton.models import Status

        for s in Status:
            fams["baton_tasks"].add_metric([s.value], sch.count(s.value))
        act = sch.activity
        transitions = fams["baton_task_transitions"]
        for (old, new), n in sorted(act.transitions.items()):
            transitions.add_metric([old, new], n)
        fams["baton_tasks_submitted"].add_metric([], act.submitted)
        fams["baton_tasks_completed"].add_metric([], act.transitions[("running", "completed")])
        fams["baton_tasks_failed"].add_metric([], act.attempts_failed)
        fams["baton_tasks_retried"].add_metric([], act.retried)
        fams["baton_tasks_dead_lettered"].add_metric(
            [], sum(n for (_, new), n in act.transitions.items() if new == "dead_lettered"))
        ready, running = sch.ready_by_type(), sch.running_by_type()
        # Every agent type seen since start keeps its series, 0 included: a series that vanishes is not a zero
        # to Prometheus (rates and alerts over it would go blank instead of falling).
        types = self._types
        types.update(ready, running, (t for t, _ in agents))
        for t in sorted(types):
            for state in ("idle", "busy"):
                fams["baton_agents"].add_metric([t, state], agents.get((t, state), 0))
            fams["baton_ready_tasks"].add_metric([t], ready.get(t, 0))
            fams["baton_wip_in_use"].add_metric([t], running.get(t, 0))
            limit = sch.config.wip_limit_for(t)
            if limit is not None:
                fams["baton_wip_limit"].add_metric([t], limit)

    def _router(self, fams: dict[str, Any]) -> None:
        st = self.router_stats
        fams["baton_router_up"].add_metric([], 0.0 if st is None else 1.0)
        if st is None:
            return
        by_pattern = st.get("by_pattern") or {}
        for pattern, cells in sorted(by_pattern.items()):
            for prio, (frames, nbytes) in sorted(cells.items()):
                fams["baton_router_frames"].add_metric([pattern, prio], frames)
                fams["baton_router_bytes"].add_metric([pattern, prio], nbytes)
        fams["baton_router_ring_full"].add_metric(["agent"], st.get("ring_backlog_events", 0))
        fams["baton_router_ring_full"].add_metric(["coordinator"], st.get("coord_ring_full", 0))
        fams["baton_router_connections"].add_metric([], st.get("connections", 0))
        fams["baton_router_bad_frames"].add_metric([], st.get("bad_frames", 0))
