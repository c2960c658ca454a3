"""Task manifests: parse, validate (BLOCKED::/WARN:: codes), import atomically, detect changes, plan.

A manifest is JSON: ``{"manifest_id": ..., "tasks": [...]}`` (or a bare list of tasks).  Each task has
task_id, title, description, phase, slice, capability_id, acceptance_criteria [{id, text}],
depends_on_tasks, risk, est.size, related_specs, related_adrs, related_guides, test_verification, gap_codes,
provisional, parallel, conflicts_with, file_scope; unknown fields are kept.

Import is all or nothing: a manifest that does not parse, has the wrong shape, or has any BLOCKED issue
changes nothing.  The manifest document is stored (canonical JSON) with its hash; each task keeps the entry's
fields that its TaskSpec does not carry verbatim (phase, slice, risk as written, est, related_*, ..., and any
unknown field) in ``metadata["manifest"]``; task_id, title, description, depends_on_tasks, file_scope and
conflicts_with are the task's own id, summary, description, prerequisites, file_scope and conflicts_with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import msgpack
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from baton.models import (
    RISK_RANK,
    SPEC_DEFAULTS,
    TERMINAL,
    ExecutionPlan,
    Risk,
    Status,
    normalize_risk,
    summarize_details,
    unpack,
)
from baton.planner import build_plan, gc_paused, split_conflicts, topological_batches
from baton.scheduler import Scheduler, dispatch_key
from baton.scheduler_errors import DependencyCycle, ManifestError, TaskValidationError
from baton.taskstate import unpack_spec

__all__ = [
    "ManifestTask",
    "Manifest",
    "ManifestIssue",
    "ValidationReport",
    "ImportResult",
    "parse_manifest",
    "validate_manifest",
    "import_manifest",
    "next_eligible",
    "manifest_plan",
    "SIZE_SECONDS",
]

log = logging.getLogger("baton.manifest")

# est.size -> estimated duration.  T-shirt sizes in working hours; a number is taken as hours.
SIZE_SECONDS: Final[dict[str, float]] = {
    "XS": 0.5 * 3600, "S": 1 * 3600, "M": 4 * 3600, "L": 8 * 3600, "XL": 16 * 3600, "XXL": 32 * 3600,
}


class ManifestCriterion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr | StrictInt
    text: StrictStr


class ManifestEstimate(BaseModel):
    model_config = ConfigDict(extra="allow")

    size: StrictStr | float | None = None


class ManifestTask(BaseModel):
    model_config = ConfigDict(extra="allow")

    task_id: StrictStr = Field(min_length=1)
    title: StrictStr = Field(min_length=1)
    description: StrictStr = ""
    phase: StrictStr | StrictInt | None = None
    slice: StrictStr | StrictInt | None = None
    capability_id: StrictStr | None = None
    acceptance_criteria: list[ManifestCriterion] = Field(default_factory=list)
    depends_on_tasks: list[StrictStr] = Field(default_factory=list)
    risk: Risk = Risk.MEDIUM
    est: ManifestEstimate | None = None
    related_specs: list[StrictStr] = Field(default_factory=list)
    related_adrs: list[StrictStr] = Field(default_factory=list)
    related_guides: list[StrictStr] = Field(default_factory=list)
    test_verification: StrictStr | list[StrictStr] | None = None
    gap_codes: list[StrictStr] = Field(default_factory=list)
    provisional: StrictBool = False
    parallel: StrictBool = True
    conflicts_with: list[StrictStr] = Field(default_factory=list)
    file_scope: list[StrictStr] = Field(default_factory=list)
    # Not in the manifest format, but honoured when present.
    agent_type: StrictStr | None = None
    base_priority: StrictInt | None = None

    @field_validator("risk", mode="before")
    @classmethod
    def _risk_case(cls, v: Any) -> Any:
        return normalize_risk(v)

    def estimate_s(self) -> float | None:
        if self.est is None or self.est.size is None:
            return None
        size = self.est.size
        if isinstance(size, str):
            if size.upper() in SIZE_SECONDS:
                return SIZE_SECONDS[size.upper()]
            raise ValueError(f"est.size {size!r} is not one of {sorted(SIZE_SECONDS)} or a number of hours")
        if size < 0:
            raise ValueError("est.size must be >= 0 hours")
        return float(size) * 3600


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    manifest_id: StrictStr | None = None
    tasks: list[ManifestTask]


class ManifestIssue(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: str  # e.g. BLOCKED::EMPTY-AC::T-7 or WARN::WIP-OVERLOAD
    severity: Literal["BLOCKED", "WARN"]
    kind: str  # DEPENDENCY-CYCLE, MISSING-DEPENDENCY, DUPLICATE-ID, EMPTY-AC, MISSING-CONTEXT, WIP-OVERLOAD
    task_id: str | None
    message: str


class ValidationReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    manifest_id: str
    hash: str
    task_count: int
    issues: list[ManifestIssue]

    @property
    def ok(self) -> bool:
        return not any(i.severity == "BLOCKED" for i in self.issues)

    @property
    def codes(self) -> list[str]:
        return [i.code for i in self.issues]


class ImportResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    manifest_id: str
    hash: str
    previous_hash: str | None
    status: Literal["imported", "unchanged", "changed", "rejected"]
    created: list[str] = Field(default_factory=list)
    changed_task_ids: list[str] = Field(default_factory=list)  # differ from what was imported before
    removed_task_ids: list[str] = Field(default_factory=list)  # no longer in the manifest
    report: ValidationReport


# --- parsing -----------------------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no whitespace, UTF-8): what manifest hashes and entry comparisons use.

    orjson writes it several times faster than the json module (it was a visible share of a 10k-task import);
    it refuses integers beyond 64 bits, which JSON allows and the json module writes exactly."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_manifest(
    source: str | bytes | Path | Mapping[str, Any] | Sequence[Any], *, manifest_id: str | None = None
) -> tuple[Manifest, str, bytes, list[Any]]:
    """Parse and shape-check a manifest.  Returns (manifest, id, canonical bytes, raw task entries).

    The hash is taken over canonical JSON (sorted keys, no whitespace) so reformatting a file is not a change.
    """
    default_id = manifest_id
    if isinstance(source, Path):
        try:
            raw: Any = source.read_bytes()
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {source}: {exc}") from None
        default_id = default_id or source.stem
    else:
        raw = source
    if isinstance(raw, (bytes, str)):
        try:
            doc = json.loads(raw, parse_constant=_reject_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    else:
        doc = raw
    if isinstance(doc, list):
        doc = {"tasks": doc}
    if not isinstance(doc, dict):
        raise ManifestError("manifest must be a JSON object with a 'tasks' list (or a list of tasks)")
    try:
        m = Manifest.model_validate(doc)
    except ValidationError as exc:
        details = [
            {"field": _loc(e["loc"]), "code": e["type"], "message": e["msg"]} for e in exc.errors(include_url=False)
        ]
        raise ManifestError(summarize_details("manifest has the wrong shape at ", details), details=details) from None
    for i, t in enumerate(m.tasks):
        try:
            t.estimate_s()
        except ValueError as exc:
            raise ManifestError(f"manifest has the wrong shape at tasks[{i}].est.size: {exc}") from None
    mid = m.manifest_id or default_id or "default"
    return m, mid, _canonical(doc), list(doc["tasks"])


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON; the json module accepts them, and canonical JSON could not tell NaN from null.
    raise ValueError(f"{name} is not a JSON value")


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<manifest>"


# --- validation --------------------------------------------------------------------------------------------


def _cycles(ids: Sequence[str], deps: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Strongly connected components with a cycle (size > 1 or a self-loop); iterative Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in ids:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on.add(v)
            succ = [w for w in deps.get(v, ()) if w in deps]
            recurse = False
            for j in range(i, len(succ)):
                w = succ[j]
                if w not in index:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    recurse = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in deps.get(v, ()):
                    out.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return out


def validate_manifest(
    source: str | bytes | Path | Mapping[str, Any] | Sequence[Any],
    *,
    base_dir: str | Path | None = None,
    scheduler: Scheduler | None = None,
    manifest_id: str | None = None,
    wip_limit: int | None = 3,
) -> ValidationReport:
    """Check a manifest without importing it.  ``base_dir`` resolves related_* paths (default: the manifest's
    directory, or the current directory); ``scheduler`` lets dependencies and ids refer to stored tasks."""
    m, mid, canon, _ = parse_manifest(source, manifest_id=manifest_id)
    if base_dir is None:
        base_dir = source.parent if isinstance(source, Path) else Path.cwd()
    return _validate(m, mid, hashlib.sha256(canon).hexdigest(), Path(base_dir), scheduler, wip_limit)


def _validate(
    m: Manifest, mid: str, digest: str, base: Path, sch: Scheduler | None, wip_limit: int | None
) -> ValidationReport:
    issues: list[ManifestIssue] = []

    def blocked(kind: str, tid: str, msg: str) -> None:
        issues.append(ManifestIssue(code=f"BLOCKED::{kind}::{tid}", severity="BLOCKED", kind=kind, task_id=tid,
                                    message=msg))

    seen: set[str] = set()
    for t in m.tasks:
        if t.task_id in seen:
            blocked("DUPLICATE-ID", t.task_id, f"task_id {t.task_id} appears more than once")
        seen.add(t.task_id)
    stored_owner: dict[str, str | None] = {}
    stored_status: dict[str, str] = {}
    if sch is not None:
        for tid in seen | {d for t in m.tasks for d in t.depends_on_tasks}:
            rec = sch.record(tid)
            if rec is not None:
                stored_owner[tid] = rec.manifest_id
                stored_status[tid] = rec.status
        for tid in sorted(seen):
            if tid in stored_owner and stored_owner[tid] != mid:
                blocked("DUPLICATE-ID", tid, f"task_id {tid} already exists outside manifest {mid}")
    exists_cache: dict[str, bool] = {}
    for t in m.tasks:
        for d in t.depends_on_tasks:
            if d not in seen and d not in stored_status:
                blocked("MISSING-DEPENDENCY", t.task_id, f"{t.task_id} depends on unknown task {d}")
        if not t.acceptance_criteria:
            blocked("EMPTY-AC", t.task_id, f"{t.task_id} has no acceptance criteria")
        missing = []
        for ref in (*t.related_specs, *t.related_adrs, *t.related_guides):
            ok = exists_cache.get(ref)
            if ok is None:
                p = Path(ref)
                ok = exists_cache[ref] = os.path.exists(p if p.is_absolute() else base / p)
            if not ok:
                missing.append(ref)
        if missing:
            blocked("MISSING-CONTEXT", t.task_id, f"{t.task_id} references missing files: {', '.join(missing)}")
    deps = {t.task_id: t.depends_on_tasks for t in m.tasks}
    # Kahn's levels place every task unless there is a cycle; only then is Tarjan's search worth running.
    try:
        levels, _ = topological_batches(list(deps), deps)
    except DependencyCycle:
        levels = []
        for comp in _cycles(list(deps), deps):
            for tid in sorted(comp):
                blocked("DEPENDENCY-CYCLE", tid, f"{tid} is on a dependency cycle: {' -> '.join(sorted(comp))}")
    if wip_limit is not None and not any(i.kind in ("DEPENDENCY-CYCLE", "DUPLICATE-ID") for i in issues):
        widest, per_type = _widest_wave(m, levels)
        if widest > wip_limit:
            issues.append(ManifestIssue(
                code="WARN::WIP-OVERLOAD", severity="WARN", kind="WIP-OVERLOAD", task_id=None,
                message=f"up to {widest} tasks of one agent type can run in parallel ({per_type}) but the WIP "
                        f"limit is {wip_limit}; the rest will queue",
            ))
    return ValidationReport(manifest_id=mid, hash=digest, task_count=len(m.tasks), issues=issues)


def _widest_wave(m: Manifest, levels: list[list[str]]) -> tuple[int, str]:
    """The most tasks of one agent type that could run side by side: topological levels split so no two
    conflicting tasks share a batch."""
    ids = [t.task_id for t in m.tasks]
    by_id = {t.task_id: t for t in m.tasks}
    split = split_conflicts(
        levels, {t: by_id[t].file_scope for t in ids}, {t: by_id[t].conflicts_with for t in ids},
        solo={t for t in ids if not by_id[t].parallel},
    )
    widest, label = 0, ""
    for batch in split:
        counts: dict[str, int] = {}
        for t in batch:
            a = by_id[t].agent_type or "implementation"
            counts[a] = counts.get(a, 0) + 1
        for a, k in counts.items():
            if k > widest:
                widest, label = k, a
    return widest, label


# --- import ------------------------------------------------------------------------------------------------


def import_manifest(
    scheduler: Scheduler,
    source: str | bytes | Path | Mapping[str, Any] | Sequence[Any],
    *,
    base_dir: str | Path | None = None,
    manifest_id: str | None = None,
    agent_type: str = "implementation",
    wip_limit: int | None = None,
) -> ImportResult:
    """Validate and import a manifest in one transaction.

    Re-importing the same content is a no-op ("unchanged").  A changed manifest ("changed") adds its new tasks
    and reports tasks that differ from, or are missing compared with, the previous import: stored tasks are
    kept exactly as submitted, so changing one means cancelling it and adding a new task.
    """
    with gc_paused():
        return _import(scheduler, source, base_dir, manifest_id, agent_type, wip_limit)


def _import(
    scheduler: Scheduler,
    source: str | bytes | Path | Mapping[str, Any] | Sequence[Any],
    base_dir: str | Path | None,
    manifest_id: str | None,
    agent_type: str,
    wip_limit: int | None,
) -> ImportResult:
    m, mid, canon, raw_tasks = parse_manifest(source, manifest_id=manifest_id)
    if base_dir is None:
        base_dir = source.parent if isinstance(source, Path) else Path.cwd()
    if wip_limit is None:
        wip_limit = scheduler.config.wip_limit_for(agent_type)
    digest = hashlib.sha256(canon).hexdigest()
    with scheduler.transaction() as c:
        report = _validate(m, mid, digest, Path(base_dir), scheduler, wip_limit)
        prev = c.execute("SELECT hash, task_ids, document FROM manifests WHERE manifest_id = ?", (mid,)).fetchone()
        prev_hash = prev[0] if prev else None
        if not report.ok:
            return ImportResult(manifest_id=mid, hash=digest, previous_hash=prev_hash, status="rejected",
                                report=report)
        if prev_hash == digest:
            return ImportResult(manifest_id=mid, hash=digest, previous_hash=prev_hash, status="unchanged",
                                report=report)
        ids = [t.task_id for t in m.tasks]
        # What each task of this manifest was imported from: its entry in the previous document.
        before = {e.get("task_id"): e for e in json.loads(prev[2])["tasks"]} if prev is not None else {}
        new_tasks: list[tuple[ManifestTask, Any]] = []
        changed: list[str] = []
        for t, raw in zip(m.tasks, raw_tasks):
            rec = scheduler.record(t.task_id)
            if rec is not None and rec.manifest_id == mid:
                if _canonical(before.get(t.task_id)) != _canonical(raw):
                    changed.append(t.task_id)
                continue
            new_tasks.append((t, raw))
        specs = [_spec_dict(t, raw, agent_type) for t, raw in new_tasks]
        removed: list[str] = []
        if prev is not None:
            now_ids = set(ids)
            removed = [x for x in unpack(prev[1]) if x not in now_ids]
        try:
            res = scheduler.enqueue_many(specs, manifest_id=mid)  # joins this transaction
        except TaskValidationError as exc:
            # Shape was fine but a field violates a task rule (e.g. an id with spaces): reject the manifest.
            raise ManifestError(f"manifest task rejected: {exc.message}", details=exc.details) from None
        c.execute(
            "INSERT INTO manifests (manifest_id, hash, imported_at, task_ids, document) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (manifest_id) DO UPDATE SET hash = excluded.hash, imported_at = excluded.imported_at,"
            " task_ids = excluded.task_ids, document = excluded.document",
            (mid, digest, scheduler.clock(), msgpack.packb(ids), canon),
        )
    log.info("manifest %s: %d new tasks, %d changed, %d removed", mid, len(res), len(changed), len(removed))
    return ImportResult(
        manifest_id=mid, hash=digest, previous_hash=prev_hash, status="imported" if prev is None else "changed",
        created=[r.task_id for r in res], changed_task_ids=changed, removed_task_ids=removed, report=report,
    )


# Entry fields a TaskSpec carries exactly as written (id, summary, description, prerequisites, file_scope,
# conflicts_with): not repeated in metadata, which halves what a manifest task costs to validate and store.
_CARRIED: Final = frozenset({"task_id", "title", "description", "depends_on_tasks", "file_scope", "conflicts_with"})


def _spec_dict(t: ManifestTask, raw: Any, agent_type: str) -> dict[str, Any]:
    """The TaskSpec a manifest entry stands for, as the dict a direct submission would pass."""
    est = t.estimate_s()
    return {
        "id": t.task_id,
        "summary": t.title,
        "description": t.description,
        "agent_type": t.agent_type or agent_type,
        "source": "manifest",
        "base_priority": SPEC_DEFAULTS["base_priority"] if t.base_priority is None else t.base_priority,
        "prerequisites": t.depends_on_tasks,
        "estimated_duration_s": None if est is None else float(est),  # as TaskSpec's float field would
        "risk": t.risk,
        "acceptance_criteria": [{"id": str(a.id), "text": a.text} for a in t.acceptance_criteria],
        "file_scope": t.file_scope,
        "conflicts_with": t.conflicts_with,
        "metadata": {"manifest": {k: v for k, v in raw.items() if k not in _CARRIED}},
    }


def stored_hash(scheduler: Scheduler, manifest_id: str) -> str | None:
    row = scheduler.store.conn.execute("SELECT hash FROM manifests WHERE manifest_id = ?", (manifest_id,)).fetchone()
    return None if row is None else str(row[0])


# --- ordering and plans ------------------------------------------------------------------------------------

def next_eligible(scheduler: Scheduler, limit: int = 10, *, manifest_id: str | None = None) -> list[str]:
    """Tasks whose dependencies are complete, High risk before Medium before Low, then by priority."""
    now = scheduler.clock()
    scheduler.refresh_priorities()
    ready = [
        r for r in scheduler.records(Status.READY.value)
        if r.not_before <= now and (manifest_id is None or r.manifest_id == manifest_id)
    ]
    ready.sort(key=lambda r: (RISK_RANK[r.risk], *dispatch_key(r)))
    return [r.id for r in ready[:limit]]


def manifest_plan(
    scheduler: Scheduler, manifest_id: str, *, wip_limit: int | None = None, default_estimate_s: float = 3600.0
) -> ExecutionPlan:
    """Plan the manifest's unfinished tasks with conflict-free parallel batches: no two tasks in one batch
    overlap in file_scope or are linked by conflicts_with, and tasks marked ``parallel: false`` run alone."""
    recs = sorted((r for r in scheduler.records() if r.manifest_id == manifest_id), key=lambda r: r.seq)
    if not recs:
        raise ManifestError(f"no tasks imported for manifest {manifest_id!r}")
    live = [r for r in recs if r.status not in TERMINAL]
    skipped = {r.id: Status(r.status) for r in recs if r.status in TERMINAL}
    specs = {r.id: unpack_spec(r.spec) for r in live}
    est = {r.id: (r.estimate if r.estimate > 0 else default_estimate_s) for r in live}
    prereqs = {r.id: r.prereqs for r in live}
    order = {r.id: (RISK_RANK[r.risk], -r.rank, i) for i, r in enumerate(live)}
    levels, _ = topological_batches(list(est), prereqs)
    batches = split_conflicts(
        levels,
        {t: s["file_scope"] for t, s in specs.items()},
        {t: s["conflicts_with"] for t, s in specs.items()},
        solo={t for t, s in specs.items() if s["metadata"].get("manifest", {}).get("parallel") is False},
        order_key=order.__getitem__,
    )
    done = {r.id for r in recs if r.status == Status.COMPLETED.value}
    for p in {p for ps in prereqs.values() for p in ps if p not in est} - done:
        rec = scheduler.record(p)
        if rec is not None and rec.status == Status.COMPLETED.value:
            done.add(p)
    return build_plan(est, prereqs, wip_limit=wip_limit, external_done=done, skipped_terminal=skipped,
                      batches=batches)
