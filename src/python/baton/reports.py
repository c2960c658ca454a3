"""Read-only reports: queue status, the progress pulse (text and JSON) and anomaly flags.

Everything is read in one snapshot (a read transaction), so the numbers in one report agree with each other.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from baton import priority as prio
from baton.manifest import next_eligible
from baton.models import TERMINAL, Status, unpack
from baton.scheduler import Scheduler

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
    total = 0
    prio_sum = 0.0
    prio_n = 0
    oldest_p: tuple[float, str, bytes] | None = None
    oldest_w: tuple[float, str, bytes] | None = None
    with sch.store.read() as c:
        for st, n in c.execute("SELECT status, count(*) FROM tasks GROUP BY status"):
            by[st] = n
            total += n
        for tid, st, base, source, deadline, est, depth, ready_at, created, spec in c.execute(
            "SELECT id, status, base_priority, source, deadline, estimate, depth, ready_at, created_at, spec"
            " FROM tasks WHERE status IN ('pending', 'ready', 'blocked', 'running')"
        ):
            b = prio.explain(w, base_priority=base, depth=depth, source=source, deadline=deadline, estimate=est,
                             ready_at=ready_at if st == "ready" else None, now=now)
            prio_sum += b.total
            prio_n += 1
            if st != "running" and (oldest_w is None or created < oldest_w[0]):
                oldest_w = (created, tid, spec)
            if st == "pending" and (oldest_p is None or created < oldest_p[0]):
                oldest_p = (created, tid, spec)

    def age(x: tuple[float, str, bytes] | None) -> TaskAge | None:
        if x is None:
            return None
        return TaskAge(task_id=x[1], summary=_summary(x[2]), since=_iso(x[0]), age_s=now - x[0])

    return QueueStatus(total=total, by_status=by, average_priority=prio_sum / prio_n if prio_n else None,
                       oldest_pending=age(oldest_p), oldest_waiting=age(oldest_w))


def _summary(spec: bytes) -> str:
    return str(unpack(spec)["summary"])


def pulse(
    sch: Scheduler, *, stale_after_s: float = 3600.0, next_n: int = 5, manifest_id: str | None = None
) -> Pulse:
    """The progress pulse.  ``manifest_id`` restricts it to one manifest's tasks."""
    now = sch.clock()
    scope = "" if manifest_id is None else " AND manifest_id = :m"
    params: dict[str, Any] = {"m": manifest_id}
    nxt = next_eligible(sch, next_n, manifest_id=manifest_id)
    reasons = sch.waiting_reasons()
    counts = dict.fromkeys((s.value for s in Status), 0)
    with sch.store.read() as c:
        for st, n in c.execute(f"SELECT status, count(*) FROM tasks WHERE 1 {scope} GROUP BY status", params):
            counts[st] = n
        total = sum(counts.values())
        hr = dict(c.execute(
            f"SELECT status IN ('completed'), count(*) FROM tasks WHERE risk = 'High'"
            f" AND status NOT IN ('cancelled', 'failed', 'dead_lettered') {scope} GROUP BY 1", params
        ).fetchall())
        latest = c.execute(
            f"SELECT id, spec, finished_at FROM tasks WHERE status = 'completed' {scope}"
            " ORDER BY finished_at DESC, seq DESC LIMIT 1", params
        ).fetchone()
        running = c.execute(
            f"SELECT id, spec, agent_type, risk, lease_holder, started_at, criteria_done FROM tasks"
            f" WHERE status = 'running' {scope} ORDER BY started_at, seq", params
        ).fetchall()
        blocked_rows = c.execute(
            f"SELECT id, status FROM tasks WHERE status = 'blocked' {scope} ORDER BY seq", params
        ).fetchall()
        dead_blocking = c.execute(
            f"SELECT DISTINCT p.id, p.status, p.error FROM tasks p JOIN deps d ON d.prereq_id = p.id"
            f" JOIN tasks t ON t.id = d.task_id WHERE p.status IN ('dead_lettered', 'failed')"
            f" AND p.requeued_as IS NULL AND t.status NOT IN ('completed', 'cancelled', 'failed', 'dead_lettered')"
            f" {scope.replace('manifest_id', 'p.manifest_id')} ORDER BY p.seq",
            params,
        ).fetchall()
        no_run = c.execute(
            f"SELECT id FROM tasks WHERE status = 'completed' AND (attempts = 0 OR started_at IS NULL) {scope}",
            params,
        ).fetchall()
        running_by_type = dict(c.execute(
            "SELECT agent_type, count(*) FROM tasks WHERE status = 'running' GROUP BY agent_type"
        ).fetchall())

    in_progress: list[InProgress] = []
    for tid, spec, at, risk, holder, started, done_blob in running:
        d = unpack(spec)
        done = list(unpack(done_blob)) if done_blob else []
        all_ac = [a for a, _ in d["acceptance_criteria"]]
        in_progress.append(InProgress(
            task_id=tid, summary=d["summary"], agent_type=at, risk=risk, lease_holder=holder,
            started_at=_iso(started), running_for_s=now - started if started else 0.0,
            criteria_done=[a for a in all_ac if a in done], criteria_remaining=[a for a in all_ac if a not in done],
        ))
    oldest = None
    if in_progress:
        o = max(in_progress, key=lambda x: x.running_for_s)
        oldest = TaskAge(task_id=o.task_id, summary=o.summary, since=o.started_at, age_s=o.running_for_s)

    blockers = [Blocker(task_id=t, status=st, reason=reasons.get(t, st)) for t, st in blocked_rows]
    blockers += [Blocker(task_id=t, status=st, reason=f"{st} with waiting dependents: {err}")
                 for t, st, err in dead_blocking]

    anomalies = [Anomaly(code="COMPLETED_WITHOUT_RUN", task_id=t,
                         message=f"{t} is completed but was never claimed") for (t,) in no_run]
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
        high_risk_done=hr.get(1, 0),
        high_risk_remaining=hr.get(0, 0),
        latest_completed=None if latest is None else TaskAge(
            task_id=latest[0], summary=_summary(latest[1]), since=_iso(latest[2]), age_s=now - latest[2]),
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
