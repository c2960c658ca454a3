"""Read-only reports: queue status, the progress pulse (text and JSON) and anomaly flags.

Everything is read from the scheduler's memory in one go (no transaction in between), so the numbers in one
report agree with each other.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from baton import priority as prio
from baton.manifest import next_eligible
from baton.models import TERMINAL, Status
from baton.scheduler import Scheduler
from baton.taskstate import TaskRecord, unpack_spec

__all__ = ["QueueStatus", "Pulse", "Anomaly", "queue_status", "pulse", "render_pulse"]


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


class TaskAge(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: str
    summary: str
    since: str | None
    age_s: float


class QueueStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    total: int
    by_status: dict[str, int]
    average_priority: float | None  # over non-terminal tasks, calculated now
    oldest_pending: TaskAge | None  # status pending (waiting on prerequisites)
    oldest_waiting: TaskAge | None  # not started yet: pending, ready or blocked


class InProgress(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: str
    summary: str
    agent_type: str
    risk: str
    lease_holder: str | None
    started_at: str | None
    running_for_s: float
    criteria_done: list[str]
    criteria_remaining: list[str]


class Blocker(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: str
    status: str
    reason: str


class Anomaly(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: Literal["COMPLETED_WITHOUT_RUN", "WIP_EXCEEDED", "STALE_IN_PROGRESS"]
    task_id: str | None
    message: str


class Pulse(BaseModel):
    model_config = ConfigDict(frozen=True)

    generated_at: str
    counts: dict[str, int]
    total: int
    progress_pct: float  # completed / (total - cancelled)
    high_risk_done: int
    high_risk_remaining: int
    latest_completed: TaskAge | None
    in_progress: list[InProgress]
    next_eligible: list[str]
    blockers: list[Blocker]
    oldest_in_progress: TaskAge | None
    anomalies: list[Anomaly] = Field(default_factory=list)


def queue_status(sch: Scheduler) -> QueueStatus:
    now = sch.clock()
    w = sch.config.weights
    by = dict.fromkeys((s.value for s in Status), 0)
    prio_sum = 0.0
    prio_n = 0
    oldest_p: TaskRecord | None = None
    oldest_w: TaskRecord | None = None
    for r in sch.records():
        st = r.status
        by[st] += 1
        if st in _DONE:
            continue
        b = prio.explain(w, base_priority=r.base_priority, depth=r.depth, source=r.source, deadline=r.deadline,
                         estimate=r.estimate, ready_at=r.ready_at if st == "ready" else None, now=now)
        prio_sum += b.total
        prio_n += 1
        if st != "running" and (oldest_w is None or r.created < oldest_w.created):
            oldest_w = r
        if st == "pending" and (oldest_p is None or r.created < oldest_p.created):
            oldest_p = r

    def age(r: TaskRecord | None) -> TaskAge | None:
        if r is None:
            return None
        return TaskAge(task_id=r.id, summary=_summary(r), since=_iso(r.created), age_s=now - r.created)

    return QueueStatus(total=sum(by.values()), by_status=by, average_priority=prio_sum / prio_n if prio_n else None,
                       oldest_pending=age(oldest_p), oldest_waiting=age(oldest_w))


_DONE: Final = frozenset(s.value for s in TERMINAL)


def _summary(r: TaskRecord) -> str:
    return str(unpack_spec(r.spec)["summary"])


def pulse(
    sch: Scheduler, *, stale_after_s: float = 3600.0, next_n: int = 5, manifest_id: str | None = None
) -> Pulse:
    """The progress pulse.  ``manifest_id`` restricts it to one manifest's tasks."""
    now = sch.clock()
    nxt = next_eligible(sch, next_n, manifest_id=manifest_id)
    reasons = sch.waiting_reasons()
    counts = dict.fromkeys((s.value for s in Status), 0)
    every = list(sch.records())
    recs = [r for r in every if manifest_id is None or r.manifest_id == manifest_id]
    hr_done = hr_left = 0
    latest: TaskRecord | None = None
    running: list[TaskRecord] = []
    blocked: list[TaskRecord] = []
    no_run: list[str] = []
    for r in recs:
        st = r.status
        counts[st] += 1
        if r.risk == "High" and st not in ("cancelled", "failed", "dead_lettered"):
            if st == "completed":
                hr_done += 1
            else:
                hr_left += 1
        if st == "completed":
            if latest is None or (r.finished, r.seq) > (latest.finished, latest.seq):
                latest = r
            if r.attempts == 0 or r.started is None:
                no_run.append(r.id)
        elif st == "running":
            running.append(r)
        elif st == "blocked":
            blocked.append(r)
    # Dead letters and failures that still hold up live dependents (and were not requeued).
    awaited = {p for r in every if r.status not in _DONE for p in r.prereqs}
    dead_blocking = [
        r for r in recs if r.status in ("dead_lettered", "failed") and r.requeued_as is None and r.id in awaited
    ]
    total = len(recs)

    in_progress: list[InProgress] = []
    for r in sorted(running, key=lambda r: (r.started or 0.0, r.seq)):
        d = unpack_spec(r.spec)
        all_ac = [a["id"] for a in d["acceptance_criteria"]]
        in_progress.append(InProgress(
            task_id=r.id, summary=d["summary"], agent_type=r.agent_type, risk=r.risk, lease_holder=r.holder,
            started_at=_iso(r.started), running_for_s=now - r.started if r.started else 0.0,
            criteria_done=[a for a in all_ac if a in r.criteria_done],
            criteria_remaining=[a for a in all_ac if a not in r.criteria_done],
        ))
    oldest = None
    if in_progress:
        o = max(in_progress, key=lambda x: x.running_for_s)
        oldest = TaskAge(task_id=o.task_id, summary=o.summary, since=o.started_at, age_s=o.running_for_s)

    blockers = [Blocker(task_id=r.id, status=r.status, reason=reasons.get(r.id, r.status)) for r in blocked]
    blockers += [Blocker(task_id=r.id, status=r.status, reason=f"{r.status} with waiting dependents: {r.error}")
                 for r in dead_blocking]

    anomalies = [Anomaly(code="COMPLETED_WITHOUT_RUN", task_id=t,
                         message=f"{t} is completed but was never claimed") for t in no_run]
    running_by_type = sch.running_by_type()
    for at, n in sorted(running_by_type.items()):
        lim = sch.config.wip_limit_for(at)
        if lim is not None and n > lim:
            anomalies.append(Anomaly(code="WIP_EXCEEDED", task_id=None,
                                     message=f"{n} {at} tasks in progress, WIP limit {lim}"))
    g = sch.config.wip_global
    if g is not None and sum(running_by_type.values()) > g:
        anomalies.append(Anomaly(code="WIP_EXCEEDED", task_id=None,
                                 message=f"{sum(running_by_type.values())} tasks in progress, global WIP limit {g}"))
    for ip in in_progress:
        if ip.running_for_s > stale_after_s:
            anomalies.append(Anomaly(code="STALE_IN_PROGRESS", task_id=ip.task_id,
                                     message=f"{ip.task_id} in progress for {ip.running_for_s:.0f}s"
                                             f" (> {stale_after_s:.0f}s)"))
    denom = total - counts[Status.CANCELLED.value]
    return Pulse(
        generated_at=_iso(now) or "",
        counts=counts,
        total=total,
        progress_pct=round(100.0 * counts[Status.COMPLETED.value] / denom, 2) if denom else 0.0,
        high_risk_done=hr_done,
        high_risk_remaining=hr_left,
        latest_completed=None if latest is None else TaskAge(
            task_id=latest.id, summary=_summary(latest), since=_iso(latest.finished),
            age_s=now - (latest.finished or now)),
        in_progress=in_progress,
        next_eligible=nxt,
        blockers=blockers,
        oldest_in_progress=oldest,
        anomalies=anomalies,
    )


def render_pulse(p: Pulse) -> str:
    """The pulse as plain text for a terminal or a chat message."""
    live = [s for s in Status if s not in TERMINAL]
    done = [s for s in Status if s in TERMINAL]
    lines = [
        f"Progress pulse {p.generated_at}",
        f"  progress: {p.progress_pct:.1f}% ({p.counts['completed']} of {p.total - p.counts['cancelled']} done)",
        "  states: " + ", ".join(f"{s.value} {p.counts[s.value]}" for s in (*live, *done)),
        f"  High risk: {p.high_risk_done} done, {p.high_risk_remaining} remaining",
    ]
    if p.latest_completed:
        lines.append(f"  latest completed: {p.latest_completed.task_id} {p.latest_completed.summary!r}"
                     f" at {p.latest_completed.since}")
    lines.append(f"  in progress ({len(p.in_progress)}):")
    for ip in p.in_progress:
        n_ac = len(ip.criteria_done) + len(ip.criteria_remaining)
        lines.append(f"    {ip.task_id} [{ip.agent_type}, {ip.risk}] {ip.summary!r} by {ip.lease_holder},"
                     f" {ip.running_for_s:.0f}s, criteria {len(ip.criteria_done)}/{n_ac}"
                     + (f" (remaining: {', '.join(ip.criteria_remaining)})" if ip.criteria_remaining else ""))
    if p.oldest_in_progress:
        lines.append(f"  oldest in progress: {p.oldest_in_progress.task_id} ({p.oldest_in_progress.age_s:.0f}s)")
    lines.append("  next eligible: " + (", ".join(p.next_eligible) or "none"))
    lines.append(f"  blockers ({len(p.blockers)}):")
    lines.extend(f"    {b.task_id}: {b.reason}" for b in p.blockers)
    lines.append(f"  anomalies ({len(p.anomalies)}):")
    lines.extend(f"    {a.code}: {a.message}" for a in p.anomalies)
    return "\n".join(lines)
