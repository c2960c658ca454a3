"""Models: validation of submissions, the state machine, exact payload round-trips."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from baton.models import (
    TERMINAL,
    TRANSITIONS,
    DependentPolicy,
    Risk,
    Status,
    TaskSpec,
    check_transition,
    decode_payload,
    encode_payload,
    parse_spec,
    parse_specs,
)
from baton.scheduler_errors import InvalidTransition, TaskValidationError


def base(**kw):
    d = {"summary": "s", "agent_type": "impl"}
    d.update(kw)
    return d


def test_minimal_spec_defaults():
    s = parse_spec(base())
    assert s.base_priority == 5 and s.max_attempts == 3 and s.risk is Risk.MEDIUM
    assert s.source == "human" and s.on_prerequisite_failure is None and s.id is None


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"base_priority": 11}, "base_priority"),
        ({"base_priority": -1}, "base_priority"),
        ({"base_priority": True}, "base_priority"),
        ({"base_priority": "5"}, "base_priority"),
        ({"summary": ""}, "summary"),
        ({"agent_type": "has space"}, "agent_type"),
        ({"id": "bad id"}, "id"),
        ({"risk": "Extreme"}, "risk"),
        ({"deadline": "2024-01-01T00:00:00"}, "deadline"),  # naive datetimes are ambiguous
        ({"max_attempts": 0}, "max_attempts"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"estimated_duration_s": float("nan")}, "estimated_duration_s"),
        ({"prerequisites": ["a", "a"]}, "prerequisites"),
        ({"acceptance_criteria": [{"id": "1"}]}, "acceptance_criteria.0.text"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"source": ""}, "source"),
        ({"on_prerequisite_failure": "explode"}, "on_prerequisite_failure"),
        ({"input": (1, 2)}, "input"),  # a tuple would come back as a list: rejected, not converted
        ({"input": {"x": 2**70}}, "input"),
        ({"input": object()}, "input"),
    ],
)
def test_invalid_fields_give_code_and_message(bad, field):
    with pytest.raises(TaskValidationError) as ei:
        parse_spec(base(**bad))
    err = ei.value
    assert err.code == "INVALID_TASK"
    assert any(d["field"] == field for d in err.details), err.details
    assert all(d["message"] and d["code"] for d in err.details)
    assert field.split(".")[0] in str(err)


def test_batch_validation_reports_every_bad_item():
    with pytest.raises(TaskValidationError) as ei:
        parse_specs([base(), base(base_priority=99), base(summary="")])
    idx = sorted({d["index"] for d in ei.value.details})
    assert idx == [1, 2]


def test_custom_source_and_known_sources_accepted():
    assert parse_spec(base(source="ci-bot")).source == "ci-bot"
    assert parse_spec(base(source="agent_planner")).source == "agent_planner"


def test_risk_spelling_normalised():
    assert parse_spec(base(risk="high")).risk is Risk.HIGH
    assert parse_spec(base(risk="LOW")).risk is Risk.LOW


def test_own_prerequisite_and_duplicate_criteria_rejected():
    with pytest.raises(TaskValidationError):
        parse_spec(base(id="a", prerequisites=["a"]))
    with pytest.raises(TaskValidationError):
        parse_spec(base(acceptance_criteria=[{"id": "1", "text": "x"}, {"id": "1", "text": "y"}]))


def test_spec_is_frozen():
    s = parse_spec(base())
    with pytest.raises(ValidationError, match="frozen"):
        s.summary = "changed"  # type: ignore[misc]
    assert s.summary == "s"


@pytest.mark.parametrize(
    "value",
    [
        b"\x00\xff raw bytes",
        b"",
        {"nested": {"list": [1, -2, 3.5, None, True, False, "\u00e9\u4e2d\U0001f600"]}},
        {"z": 1, "a": 2, "m": 3},  # key order kept
        [2**63 - 1, -(2**63), 0.1, 1e308, -0.0, float("inf")],
        "plain string",
        0,
        {1: "int keys"},
    ],
)
def test_payload_round_trip_is_exact(value):
    out = decode_payload(encode_payload(value))
    assert type(out) is type(value)
    assert out == value
    if isinstance(value, dict):
        assert list(out) == list(value)
    if isinstance(value, list):
        assert [math.copysign(1, x) if isinstance(x, float) else x for x in out] == [
            math.copysign(1, x) if isinstance(x, float) else x for x in value
        ]


def test_nan_payload_round_trips():
    out = decode_payload(encode_payload([float("nan")]))
    assert math.isnan(out[0])


def test_none_payload_is_none():
    assert encode_payload(None) is None and decode_payload(None) is None


def test_terminal_states_have_no_transitions():
    assert TERMINAL == {Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.DEAD_LETTERED}
    for st in TERMINAL:
        assert TRANSITIONS[st] == frozenset()
        for target in Status:
            with pytest.raises(InvalidTransition, match="terminal"):
                check_transition("t", st, target)


def test_documented_transitions_allowed_and_others_not():
    check_transition("t", Status.PENDING, Status.READY)
    check_transition("t", Status.READY, Status.RUNNING)
    check_transition("t", Status.RUNNING, Status.COMPLETED)
    check_transition("t", Status.RUNNING, Status.DEAD_LETTERED)
    check_transition("t", Status.BLOCKED, Status.PENDING)
    with pytest.raises(InvalidTransition):
        check_transition("t", Status.PENDING, Status.RUNNING)
    with pytest.raises(InvalidTransition):
        check_transition("t", Status.PENDING, Status.COMPLETED)
    with pytest.raises(InvalidTransition):
        check_transition("t", Status.BLOCKED, Status.RUNNING)


def test_every_status_has_a_transition_entry():
    assert set(TRANSITIONS) == set(Status)
    assert {p.value for p in DependentPolicy} == {"cancel", "block", "proceed"}


def test_deadline_keeps_its_offset():
    dl = datetime(2030, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=5)))
    s = TaskSpec.model_validate(base(deadline=dl.isoformat()))
    assert s.deadline == dl and s.deadline.utcoffset() == timedelta(hours=5)


def test_batch_validation_in_one_call_matches_single_validation():
    """parse_specs validates the list in one pydantic call into Submissions (the fields given); its details
    equal per-item parse_spec's plus the index, and a TaskSpec counts as the fields it was given."""
    ready = parse_spec(base(summary="already a spec", risk="high"))
    items = [base(), ready, base(agent_type="has space", base_priority=99), base(id="a", prerequisites=["a"])]
    with pytest.raises(TaskValidationError) as ei:
        parse_specs(items)
    expected = []
    for i, item in enumerate(items):
        try:
            parse_spec(item)
        except TaskValidationError as exc:
            expected.extend({**d, "index": i} for d in exc.details)
    assert [d["index"] for d in expected] == [2, 2, 3]
    assert ei.value.details == expected
    assert str(ei.value).startswith("invalid task at index 2: ")
    with pytest.raises(TaskValidationError) as ei:
        parse_specs([base(), "not a dict"])
    assert [(d["index"], d["code"]) for d in ei.value.details] == [(1, "dict_type")]
    ok = parse_specs([base(description="d"), ready])
    assert ok == [{**base(), "description": "d"}, {**base(), "summary": "already a spec", "risk": Risk.HIGH}]


def test_refused_payload_does_not_corrupt_the_next_one():
    # encode_payload shares one msgpack Packer: a refused value must leave nothing behind in its buffer.
    for bad in ((1, 2), {"x": 2**70}, [object()]):
        with pytest.raises(ValueError):
            encode_payload(bad)
        assert decode_payload(encode_payload({"after": [1, "two"]})) == {"after": [1, "two"]}
