"""Manifests: parsing, validation codes, atomic import, hash/change detection, ordering, conflict-free batches."""

from __future__ import annotations

import json

import pytest

from baton.manifest import import_manifest, manifest_plan, next_eligible, stored_hash, validate_manifest
from baton.models import Status
from baton.planner import scopes_overlap
from baton.scheduler_errors import ManifestError
from scheduler_fixtures import make


def mtask(tid, deps=(), **kw):
    d = {
        "task_id": tid, "title": f"title {tid}", "description": "d", "phase": 1, "slice": "s1",
        "capability_id": "cap", "acceptance_criteria": [{"id": "AC1", "text": "it works"}],
        "depends_on_tasks": list(deps), "risk": "Medium", "est": {"size": "S"}, "related_specs": [],
        "related_adrs": [], "related_guides": [], "test_verification": "pytest", "gap_codes": [],
        "provisional": False, "parallel": True, "conflicts_with": [], "file_scope": [],
    }
    d.update(kw)
    return d


def doc(*tasks, mid="m1"):
    return {"manifest_id": mid, "tasks": list(tasks)}


@pytest.fixture
def s(tmp_path):
    sch = make(tmp_path, wip_per_agent_type=None)
    yield sch
    sch.close()


def test_valid_manifest_has_no_issues(tmp_path):
    (tmp_path / "spec.md").write_text("x")
    r = validate_manifest(doc(mtask("A", related_specs=["spec.md"]), mtask("B", ["A"])), base_dir=tmp_path)
    assert r.ok and r.issues == [] and r.task_count == 2 and len(r.hash) == 64


@pytest.mark.parametrize(
    "tasks, code",
    [
        ([mtask("A", ["B"]), mtask("B", ["A"]), mtask("C")], "BLOCKED::DEPENDENCY-CYCLE::A"),
        ([mtask("A", ["A"])], "BLOCKED::DEPENDENCY-CYCLE::A"),
        ([mtask("A", ["ghost"])], "BLOCKED::MISSING-DEPENDENCY::A"),
        ([mtask("A"), mtask("A")], "BLOCKED::DUPLICATE-ID::A"),
        ([mtask("A", acceptance_criteria=[])], "BLOCKED::EMPTY-AC::A"),
        ([mtask("A", related_adrs=["adr/0001.md"])], "BLOCKED::MISSING-CONTEXT::A"),
        ([mtask("A", related_guides=["nope/guide.md"])], "BLOCKED::MISSING-CONTEXT::A"),
    ],
)
def test_blocking_codes(tmp_path, tasks, code):
    r = validate_manifest(doc(*tasks), base_dir=tmp_path)
    assert code in r.codes and not r.ok


def test_cycle_reports_every_member_only(tmp_path):
    r = validate_manifest(doc(mtask("A", ["C"]), mtask("B", ["A"]), mtask("C", ["B"]), mtask("D", ["A"])),
                          base_dir=tmp_path)
    assert sorted(c for c in r.codes if "CYCLE" in c) == [
        "BLOCKED::DEPENDENCY-CYCLE::A", "BLOCKED::DEPENDENCY-CYCLE::B", "BLOCKED::DEPENDENCY-CYCLE::C"]


def test_context_resolved_relative_to_base_dir(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "g.md").write_text("g")
    assert validate_manifest(doc(mtask("A", related_guides=["docs/g.md"])), base_dir=tmp_path).ok
    assert not validate_manifest(doc(mtask("A", related_guides=["docs/g.md"])), base_dir=tmp_path / "docs").ok


def test_manifest_file_resolves_against_its_directory(tmp_path):
    (tmp_path / "spec.md").write_text("x")
    p = tmp_path / "plan.json"
    p.write_text(json.dumps([mtask("A", related_specs=["spec.md"])]))
    r = validate_manifest(p)
    assert r.ok and r.manifest_id == "plan"


def test_wip_overload_warning(tmp_path):
    r = validate_manifest(doc(*[mtask(f"T{i}") for i in range(5)]), base_dir=tmp_path, wip_limit=3)
    assert "WARN::WIP-OVERLOAD" in r.codes and r.ok
    # Overlapping scopes serialise, so the same five tasks no longer overload.
    r2 = validate_manifest(doc(*[mtask(f"T{i}", file_scope=["src/x.py"]) for i in range(5)]),
                           base_dir=tmp_path, wip_limit=3)
    assert "WARN::WIP-OVERLOAD" not in r2.codes


@pytest.mark.parametrize(
    "bad, where",
    [
        (b"{not json", "not valid JSON"),
        (b'{"tasks": [{"task_id": "A", "title": "t", "weight": NaN}]}', "NaN is not a JSON value"),
        (b'"a string"', "JSON object"),
        (json.dumps({"tasks": [{"task_id": "A"}]}), "tasks[0].title"),
        (json.dumps({"tasks": [mtask("A", depends_on_tasks="B")]}), "tasks[0].depends_on_tasks"),
        (json.dumps({"tasks": [mtask("A", parallel="yes")]}), "tasks[0].parallel"),
        (json.dumps({"tasks": [mtask("A", est={"size": "HUGE"})]}), "est.size"),
        (json.dumps({"tasks": "nope"}), "tasks"),
    ],
)
def test_broken_manifest_clear_error_and_no_change(s, tmp_path, bad, where):
    with pytest.raises(ManifestError) as ei:
        import_manifest(s, bad, base_dir=tmp_path)
    assert where in str(ei.value) and ei.value.code == "INVALID_MANIFEST"
    assert s.tasks() == [] and stored_hash(s, "default") is None


def test_invalid_task_id_rejects_whole_manifest(s, tmp_path):
    with pytest.raises(ManifestError, match="id"):
        import_manifest(s, doc(mtask("ok"), mtask("bad id")), base_dir=tmp_path)
    assert s.tasks() == []


def test_import_creates_tasks_keeping_entries(s, tmp_path):
    res = import_manifest(s, doc(mtask("A", risk="high", extra_field={"k": 1}), mtask("B", ["A"])), base_dir=tmp_path)
    assert res.status == "imported" and res.created == ["A", "B"]
    a = s.get("A")
    assert a.summary == "title A" and a.risk.value == "High" and a.estimated_duration_s == 3600
    assert a.metadata["manifest"]["risk"] == "high"  # kept as given
    assert a.metadata["manifest"]["extra_field"] == {"k": 1}
    assert a.acceptance_criteria[0].id == "AC1" and a.manifest_id == "m1"
    assert s.status_of("B") is Status.PENDING and stored_hash(s, "m1") == res.hash


def test_blocked_manifest_imports_nothing(s, tmp_path):
    res = import_manifest(s, doc(mtask("A"), mtask("B", acceptance_criteria=[])), base_dir=tmp_path)
    assert res.status == "rejected" and "BLOCKED::EMPTY-AC::B" in res.report.codes
    assert s.tasks() == [] and stored_hash(s, "m1") is None


def test_reimport_unchanged_and_changed(s, tmp_path):
    d1 = doc(mtask("A"), mtask("B", ["A"]))
    first = import_manifest(s, json.dumps(d1, indent=2), base_dir=tmp_path)
    again = import_manifest(s, json.dumps(d1), base_dir=tmp_path)  # formatting differs, content equal
    assert again.status == "unchanged" and again.hash == first.hash and again.created == []
    d2 = doc(mtask("A", title="renamed"), mtask("C", ["A"]))
    changed = import_manifest(s, d2, base_dir=tmp_path)
    assert changed.status == "changed" and changed.previous_hash == first.hash != changed.hash
    assert changed.created == ["C"] and changed.changed_task_ids == ["A"] and changed.removed_task_ids == ["B"]
    assert s.get("A").summary == "title A"  # stored tasks are kept exactly as submitted
    assert stored_hash(s, "m1") == changed.hash


def test_ids_of_other_manifests_are_duplicates(s, tmp_path):
    import_manifest(s, doc(mtask("A")), base_dir=tmp_path)
    res = import_manifest(s, doc(mtask("A"), mid="m2"), base_dir=tmp_path)
    assert res.status == "rejected" and "BLOCKED::DUPLICATE-ID::A" in res.report.codes


def test_dependencies_may_name_stored_tasks(s, tmp_path):
    s.enqueue({"id": "base", "summary": "b", "agent_type": "implementation"})
    res = import_manifest(s, doc(mtask("A", ["base"])), base_dir=tmp_path)
    assert res.status == "imported" and s.status_of("A") is Status.PENDING


def test_next_eligible_orders_risk_then_priority(s, tmp_path):
    import_manifest(s, doc(
        mtask("low", risk="Low", base_priority=10), mtask("med", risk="Medium", base_priority=1),
        mtask("high2", risk="High", base_priority=2), mtask("high9", risk="High", base_priority=9),
        mtask("waits", ["low"], risk="High"),
    ), base_dir=tmp_path)
    assert next_eligible(s, 10) == ["high9", "high2", "med", "low"]
    assert next_eligible(s, 2, manifest_id="m1") == ["high9", "high2"]


def test_manifest_plan_never_pairs_conflicts(s, tmp_path):
    import_manifest(s, doc(
        mtask("A", file_scope=["src/core/"]), mtask("B", file_scope=["src/core/x.py"]),
        mtask("C", file_scope=["docs/"], conflicts_with=["D"]), mtask("D", file_scope=["tests/"]),
        mtask("E", parallel=False), mtask("F", ["A"], file_scope=["src/other.py"]),
    ), base_dir=tmp_path)
    plan = manifest_plan(s, "m1", wip_limit=2)
    specs = {t.id: t for t in s.tasks()}
    pos = {t: k for k, b in enumerate(plan.batches) for t in b}
    assert set(pos) == set("ABCDEF") and all(plan.batches)
    assert pos["A"] < pos["F"]
    for b in plan.batches:
        if "E" in b:
            assert b == ["E"]
        for i, x in enumerate(b):
            for y in b[i + 1:]:
                assert not scopes_overlap(specs[x].file_scope, specs[y].file_scope)
                assert y not in specs[x].conflicts_with and x not in specs[y].conflicts_with
    with pytest.raises(ManifestError):
        manifest_plan(s, "nope")


# --- a manifest entry breaking a task rule gets exactly the error a direct submission gets -----------------


@pytest.mark.parametrize(
    "bad",
    [
        {"task_id": "bad id"},
        {"task_id": "x" * 200},
        {"title": "t" * 1001},
        {"description": "d" * 200_001},
        {"agent_type": "has space"},
        {"base_priority": 11},
        {"base_priority": -1},
        {"est": {"size": float("inf")}},
        {"depends_on_tasks": ["A", "A"]},
        {"acceptance_criteria": [{"id": "1", "text": "a"}, {"id": "1", "text": "b"}]},
        {"acceptance_criteria": [{"id": "", "text": "a"}]},
        {"acceptance_criteria": [{"id": "1", "text": ""}]},
        {"acceptance_criteria": [{"id": "i" * 129, "text": "a"}]},
        {"huge": 2**70},  # kept in metadata: must be encodable exactly
    ],
)
def test_entries_breaking_a_task_rule_get_the_task_validation_error(bad, s, tmp_path):
    from baton.manifest import Manifest, _spec_dict
    from baton.scheduler_errors import TaskValidationError

    entries = [mtask("A"), mtask("Z", **{"depends_on_tasks": ["A"], **bad})]
    m = Manifest.model_validate({"tasks": entries})
    with pytest.raises(TaskValidationError) as direct:  # the same tasks submitted directly (nothing stored)
        s.enqueue_many([_spec_dict(t, raw, "implementation") for t, raw in zip(m.tasks, entries)])
    with pytest.raises(ManifestError) as ei:
        import_manifest(s, doc(*entries), base_dir=tmp_path)
    assert ei.value.details == direct.value.details and ei.value.details[0]["index"] == 1
    assert s.tasks() == []
