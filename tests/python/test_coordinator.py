"""The coordinator with a real router (python, and native when built) in-process, real sockets and SQLite,
driven by raw-socket clients speaking baton.wire (docs/protocol.md)."""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from baton import wire
from baton.protocol import MsgType
from daemon_harness import CallFailed, InProcess, RawClient, in_process, wait_until

ROUTERS = ["python"]
if importlib.util.find_spec("baton.router.native") is not None and os.environ.get("BATON_TEST_NATIVE", "1") != "0":
    ROUTERS.append("native")


@pytest.fixture(params=ROUTERS)
def router(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def h(short_tmp: Path, router: str) -> Iterator[InProcess]:
    with in_process(short_tmp, router=router, lease_s=30.0) as h:
        yield h


def _status(c: RawClient, tid: str) -> str:
    return str(c.call("get", id=tid)["status"])


# --- connections -------------------------------------------------------------------------------------------


def test_hello_welcome(h: InProcess) -> None:
    c = h.client()
    w = c.hello("me")
    assert w["server"].startswith("baton ")
    assert w["endpoint"] > 1
    assert w["lease_s"] == 30.0 and w["heartbeat_s"] == pytest.approx(10.0)
    assert w["max_payload"] == h.config.max_frame_bytes


def test_hello_invalid_names_fields(h: InProcess) -> None:
    c = h.client()
    corr = c.send(MsgType.HELLO, {"v": 9, "agent_type": "bad type!", "wip": 0}, corr=5)
    f = c.reply_to(MsgType.HELLO, corr)
    assert f.is_error
    body = f.body()
    assert body["code"] == "invalid_request"
    assert "v:" in body["message"] and "agent_type" in body["message"] and "wip" in body["message"]


def test_result_before_hello_is_forbidden(h: InProcess) -> None:
    c = h.client()
    c.send(MsgType.RESULT, {"id": "x", "token": 1, "ok": True}, corr=7)
    f = c.reply_to(MsgType.RESULT, 7)
    assert f.is_error and f.body()["code"] == "forbidden"


# --- CALL operations ---------------------------------------------------------------------------------------


def test_enqueue_get_list_status(h: InProcess) -> None:
    c = h.client()
    c.hello()
    res = c.call("enqueue", tasks=[{"id": "a", "summary": "first", "agent_type": "w", "input": {"x": [1, 2]}},
                                   {"id": "b", "summary": "second", "agent_type": "w", "prerequisites": ["a"],
                                    "input": b"\x00raw"}])
    assert [(r["id"], r["status"], r["created"]) for r in res] == [("a", "ready", True), ("b", "pending", True)]
    t = c.call("get", id="a")
    assert t["id"] == "a" and t["input"] == {"x": [1, 2]} and t["status"] == "ready"
    assert c.call("get", id="b")["input"] == b"\x00raw"
    assert [t["id"] for t in c.call("list")] == ["a", "b"]
    assert [t["id"] for t in c.call("list", status="pending")] == ["b"]
    assert c.call("list", agent_type="nope") == []
    assert len(c.call("list", limit=1)) == 1
    qs = c.call("queue_status")
    assert qs["total"] == 2 and qs["by_status"]["ready"] == 1
    p = c.call("pulse")
    assert "counts" in p and "progress_pct" in p
    plan = c.call("plan")
    assert [sorted(b) for b in plan["batches"]] == [["a"], ["b"]]
    plan_w = c.call("plan", agent_type="w", wip=1)
    assert plan_w["batches"]


def test_call_errors(h: InProcess) -> None:
    c = h.client()
    c.hello()
    with pytest.raises(CallFailed) as e:
        c.call("nope")
    assert e.value.code == "unknown_op" and "enqueue" in e.value.message
    with pytest.raises(CallFailed) as e:
        c.call("get", id="missing")
    assert e.value.code == "not_found"
    with pytest.raises(CallFailed) as e:
        c.call("get", id=5)
    assert e.value.code == "invalid_request" and "args.id" in e.value.message
    with pytest.raises(CallFailed) as e:
        c.call("get", id="a", bogus=1)
    assert e.value.code == "invalid_request" and "bogus" in e.value.message
    with pytest.raises(CallFailed) as e:
        c.call("list", status="weird")
    assert e.value.code == "invalid_request"
    # malformed CALL payloads
    for raw in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"args": {}}), msgpack.packb({"op": "get", "args": 3})):
        corr = c.send(MsgType.CALL, raw=raw, corr=c.next_corr())
        f = c.reply_to(MsgType.CALL, corr)
        assert f.is_error and f.body()["code"] == "invalid_request", raw
    # the connection and the daemon carry on
    assert c.call("queue_status")["total"] == 0


def test_invalid_task_names_every_field_and_keeps_earlier(h: InProcess) -> None:
    c = h.client()
    c.hello()
    c.call("enqueue", tasks=[{"id": "keep", "summary": "ok", "agent_type": "w"}])
    with pytest.raises(CallFailed) as e:
        c.call("enqueue", tasks=[{"id": "n1", "summary": "ok", "agent_type": "w"},
                                 {"summary": "", "agent_type": "bad type!", "base_priority": 99}])
    assert e.value.code == "invalid_task"
    msg = e.value.message
    assert "agent_type" in msg and "base_priority" in msg and "summary" in msg, msg
    assert e.value.payload.get("details")
    with pytest.raises(CallFailed) as e:
        c.call("enqueue", tasks=[{"id": "c1", "summary": "x", "agent_type": "w", "prerequisites": ["c2"]},
                                 {"id": "c2", "summary": "y", "agent_type": "w", "prerequisites": ["c1"]}])
    assert e.value.code == "conflict"
    with pytest.raises(CallFailed) as e:
        c.call("enqueue", tasks=[{"summary": "x", "agent_type": "w", "prerequisites": ["ghost"]}])
    assert e.value.code == "invalid_task" and "ghost" in e.value.message
    with pytest.raises(CallFailed) as e:
        c.call("enqueue", tasks=["notamap"])
    assert e.value.code == "invalid_task"
    assert [t["id"] for t in c.call("list")] == ["keep"]


def test_cancel_and_dry_run(h: InProcess) -> None:
    c = h.client()
    c.hello()
    c.call("enqueue", tasks=[{"id": "p", "summary": "p", "agent_type": "w"},
                             {"id": "d", "summary": "d", "agent_type": "w", "prerequisites": ["p"]}])
    dry = c.call("cancel", id="p", dry_run=True)
    assert dry["dry_run"] and dry["total_cancelled"] == 2 and not dry["changed"]
    assert _status(c, "p") == "ready"
    res = c.call("cancel", id="p", reason="no longer needed")
    assert res["changed"] and res["cascaded_task_ids"] == ["d"]
    assert _status(c, "d") == "cancelled"
    with pytest.raises(CallFailed) as e:
        c.call("cancel", id="ghost")
    assert e.value.code == "not_found"


def test_import_manifest_json_and_toml(h: InProcess, short_tmp: Path) -> None:
    c = h.client()
    c.hello()
    doc = '{"manifest_id": "m", "tasks": [{"task_id": "T-1", "title": "one",' \
          ' "acceptance_criteria": [{"id": 1, "text": "x"}]},' \
          ' {"task_id": "T-2", "title": "two", "depends_on_tasks": ["T-1"],' \
          ' "acceptance_criteria": [{"id": 1, "text": "y"}]}]}'
    dry = c.call("import_manifest", text=doc, dry_run=True)
    assert dry["dry_run"] and dry["ok"]
    assert c.call("queue_status")["total"] == 0
    res = c.call("import_manifest", text=doc)
    assert res["status"] == "imported" and sorted(res["created"]) == ["T-1", "T-2"]
    assert c.call("import_manifest", text=doc)["status"] == "unchanged"
    toml = ('manifest_id = "t"\n[[tasks]]\ntask_id = "U-1"\ntitle = "u"\n'
            '[[tasks.acceptance_criteria]]\nid = 1\ntext = "z"\n')
    assert c.call("import_manifest", text=toml)["created"] == ["U-1"]
    with pytest.raises(CallFailed) as e:
        c.call("import_manifest", text="= not toml")
    assert e.value.code == "invalid_task"


def test_wait_answers_when_terminal_or_at_timeout(h: InProcess) -> None:
    c = h.client()
    c.hello()
    c.call("enqueue", tasks=[{"id": "w1", "summary": "x", "agent_type": "w"}])
    r = c.call("wait", ids=["w1"], timeout_s=0.2)
    assert r == {"statuses": {"w1": "ready"}, "timed_out": True}
    with pytest.raises(CallFailed) as e:
        c.call("wait", ids=["ghost"])
    assert e.value.code == "not_found"
    corr = c.send(MsgType.CALL, {"op": "wait", "args": {"ids": ["w1"], "timeout_s": 30}}, corr=c.next_corr())
    other = h.client()
    other.hello()
    other.call("cancel", id="w1")
    f = c.reply_to(MsgType.CALL, corr)
    assert f.body() == {"statuses": {"w1": "cancelled"}, "timed_out": False}


def test_wip_limit_per_agent_type_holds_across_agents(h: InProcess) -> None:
    # wip_per_agent_type (3 by default) bounds the tasks of a type in progress over all its agents, whatever
    # credit each agent declares; a result makes room for exactly one more.
    agents = [h.client(), h.client()]
    for i, a in enumerate(agents):
        a.hello(f"a{i}", agent_type="w", wip=10)
    c = h.client()
    c.hello()
    c.call("enqueue", tasks=[{"id": f"t{i}", "summary": "s", "agent_type": "w"} for i in range(8)])
    wait_until(lambda: sum(a["held"] for a in c.call("agents")) == 3, 10, what="three tasks dispatched")
    assert c.call("queue_status")["by_status"]["running"] == 3
    busy = {a["endpoint"] for a in c.call("agents") if a["held"]}
    holder = next(a for a in agents if a.endpoint in busy)
    f, task = holder.next_task()
    holder.result(f, task)
    wait_until(lambda: c.call("queue_status")["by_status"]["completed"] == 1, 10, what="the completion")
    wait_until(lambda: sum(a["held"] for a in c.call("agents")) == 3, 10, what="one more task dispatched")
    assert c.call("queue_status")["by_status"]["running"] == 3


def test_agents_and_stats(h: InProcess) -> None:
    a = h.client()
    a.hello("agent-a", agent_type="w", wip=10, capabilities=["py"])
    c = h.client()
    c.hello()
    agents = c.call("agents")
    assert len(agents) == 1
    ag = agents[0]
    assert ag["name"] == "agent-a" and ag["agent_type"] == "w" and ag["wip"] == 10
    assert ag["pid"] == os.getpid() and ag["uid"] == os.getuid() and ag["held"] == 0
    st = c.call("stats")
    assert st["daemon"]["agents"] == 1
    assert isinstance(st["router"], dict)


# --- task flow ---------------------------------------------------------------------------------------------


def test_task_flow_result_releases_dependent(h: InProcess) -> None:
    c = h.client()
    c.hello()
    agent = h.client()
    agent.hello("a", agent_type="w", wip=1)
    c.call("enqueue", tasks=[{"id": "t1", "summary": "1", "agent_type": "w", "input": {"n": 1},
                              "metadata": {"k": "v"}},
                             {"id": "t2", "summary": "2", "agent_type": "w", "prerequisites": ["t1"]}])
    f, task = agent.next_task()
    assert task["id"] == "t1" and task["input"] == {"n": 1} and task["metadata"] == {"k": "v"}
    assert task["attempt"] == 1 and task["agent_type"] == "w" and task["lease_s"] == 30.0
    assert task["timeout_s"] is None
    assert f.header.flags == 0
    ack = agent.result(f, task, result={"out": 1})
    assert ack == {"accepted": True, "reason": None}
    f2, task2 = agent.next_task()
    assert task2["id"] == "t2" and task2["metadata"] == {}
    assert c.call("get", id="t1")["result"] == {"out": 1}
    # a duplicate completion under the same token is accepted; a stale token is not
    assert agent.result(f, task, result={"out": 1}) == {"accepted": True, "reason": None}
    stale = agent.result(f2, task2, token=task2["token"] - 1)
    assert stale is not None and stale["accepted"] is False and "stale" in stale["reason"]
    failed = agent.result(f2, task2, ok=False, error="bad")
    assert failed is not None and failed["accepted"] is True
    r = c.call("get", id="t2")
    assert r["status"] == "ready" and r["attempts"] == 1  # retried after a backoff


def test_results_of_two_attempts_in_one_turn_are_judged_each_by_its_token(h: InProcess) -> None:
    # What baton.Agent sends after a reconnect when the first attempt finishes just as the second one does:
    # both RESULTs in one write, so the coordinator sees them in one turn.
    c = h.client()
    c.hello()
    first = h.client()
    first.hello("a1", agent_type="w")
    c.call("enqueue", tasks=[{"id": "held", "summary": "s", "agent_type": "w"}])
    f1, t1 = first.next_task()
    first.close()  # lost: the task goes back to ready and is handed out again under a new token
    second = h.client()
    second.hello("a1", agent_type="w")
    f2, t2 = second.next_task()
    assert t2["id"] == "held" and t2["token"] > t1["token"]
    second.send_raw(b"".join(
        wire.encode(wire.FrameHeader(type=MsgType.RESULT, destination=1, correlation_id=f.corr), msgpack.packb(body))
        for f, body in ((f1, {"id": "held", "token": t1["token"], "ok": True, "result": "late"}),
                        (f2, {"id": "held", "token": t2["token"], "ok": True, "result": "current"}))))
    ack1 = second.reply_to(MsgType.RESULT, f1.corr).body()
    ack2 = second.reply_to(MsgType.RESULT, f2.corr).body()
    assert ack1["accepted"] is False and "stale" in ack1["reason"]
    assert ack2 == {"accepted": True, "reason": None}
    got = c.call("get", id="held")
    assert got["status"] == "completed" and got["result"] == "current"


def test_bad_result_payload(h: InProcess) -> None:
    agent = h.client()
    agent.hello("a", agent_type="w")
    agent.send(MsgType.RESULT, {"id": 5}, corr=9)
    f = agent.reply_to(MsgType.RESULT, 9)
    assert f.is_error and f.body()["code"] == "invalid_request"


def test_credit_never_exceeded(h: InProcess) -> None:
    c = h.client()
    c.hello()
    agent = h.client()
    agent.hello("a", agent_type="w", wip=2)
    c.call("enqueue", tasks=[{"summary": str(i), "agent_type": "w"} for i in range(10)])
    got = [agent.next_task(), agent.next_task()]
    agent.recv_none(lambda f: f.type == MsgType.TASK, 0.3)
    agent.result(*got.pop(0))
    got.append(agent.next_task())
    agent.recv_none(lambda f: f.type == MsgType.TASK, 0.3)
    # what is pushed but not dispatched waits in the router, bounded by credit + prefetch
    st = c.call("stats")
    assert st["daemon"]["dispatches_outstanding"] <= 2 + 2
    done = 1
    while done < 10:
        f, t = got.pop(0)
        agent.result(f, t)
        done += 1
        if done <= 8:
            got.append(agent.next_task())
    assert c.call("queue_status")["by_status"]["completed"] == 10


def test_agent_disconnect_requeues_at_once(h: InProcess) -> None:
    c = h.client()
    c.hello()
    a = h.client()
    a.hello("a", agent_type="w", wip=1)
    c.call("enqueue", tasks=[{"id": "x", "summary": "x", "agent_type": "w"}])
    f, t = a.next_task()
    assert _status(c, "x") == "running"
    a.close()
    b = h.client()
    b.hello("b", agent_type="w", wip=1)
    f2, t2 = b.next_task()
    assert t2["id"] == "x" and t2["attempt"] == 2 and t2["token"] > t["token"]
    hist = c.call("get", id="x")["attempt_history"]
    assert hist[0]["outcome"] == "lease_expired" and "disconnected" in hist[0]["error"]
    b.result(f2, t2)
    assert _status(c, "x") == "completed"


def test_queued_task_returned_without_attempt(h: InProcess) -> None:
    """An agent that disconnects with tasks queued for its type (not dispatched) costs them nothing."""
    c = h.client()
    c.hello()
    a = h.client()
    a.hello("a", agent_type="w", wip=1)
    c.call("enqueue", tasks=[{"id": f"q{i}", "summary": "q", "agent_type": "w"} for i in range(3)])
    f, t = a.next_task()
    a.result(f, t)
    f, t = a.next_task()
    a.close()  # t was dispatched to it (its attempt counts); the third task waits queued in the router
    b = h.client()
    b.hello("b", agent_type="w", wip=1)
    f3, t3 = b.next_task()
    for tt in (t, t3):
        assert tt["attempt"] == 1


def test_heartbeat_extends_and_silent_agent_loses_lease(short_tmp: Path, router: str) -> None:
    with in_process(short_tmp, router=router, lease_s=0.6, coordinator={"tick_s": 0.05}) as h:
        c = h.client()
        c.hello()
        a = h.client()
        a.hello("a", agent_type="w", wip=1)
        c.call("enqueue", tasks=[{"id": "s", "summary": "s", "agent_type": "w", "max_attempts": 5}])
        f, t = a.next_task()
        # heartbeats keep it for longer than one lease
        for _ in range(6):
            corr = a.send(MsgType.HEARTBEAT, {"held": [[t["id"], t["token"]]]}, corr=a.next_corr())
            hb = a.reply_to(MsgType.HEARTBEAT, corr).body()
            assert hb["renewed"] == 1 and hb["stale"] == {}
            time.sleep(0.15)  # heartbeats spread over 0.9 s: longer than the 0.6 s lease
        assert _status(c, "s") == "running"
        # silence: the lease expires, another agent gets the task, the late result is refused
        b = h.client()
        b.hello("b", agent_type="w", wip=1)
        f2, t2 = b.next_task(timeout=10)
        assert t2["id"] == "s" and t2["token"] > t["token"]
        late = a.result(f, t)
        assert late is not None and late["accepted"] is False
        assert b.result(f2, t2)["accepted"] is True  # type: ignore[index]
        assert _status(c, "s") == "completed"


def test_queued_tasks_do_not_expire(short_tmp: Path, router: str) -> None:
    with in_process(short_tmp, router=router, lease_s=0.4, coordinator={"tick_s": 0.05}) as h:
        c = h.client()
        c.hello()
        a = h.client()
        a.hello("a", agent_type="w", wip=1)
        c.call("enqueue", tasks=[{"id": f"k{i}", "summary": "k", "agent_type": "w"} for i in range(3)])
        f, t = a.next_task()
        end = time.monotonic() + 1.5  # several leases: the queued ones must still be fresh claims
        while time.monotonic() < end:
            corr = a.send(MsgType.HEARTBEAT, {"held": [[t["id"], t["token"]]]}, corr=a.next_corr())
            a.reply_to(MsgType.HEARTBEAT, corr)
            time.sleep(0.1)
        a.result(f, t)
        f2, t2 = a.next_task()
        assert t2["attempt"] == 1
        assert a.result(f2, t2)["accepted"] is True  # type: ignore[index]
        f3, t3 = a.next_task()
        assert t3["attempt"] == 1 and a.result(f3, t3)["accepted"] is True  # type: ignore[index]


def test_unknown_type_to_coordinator(h: InProcess) -> None:
    c = h.client()
    c.hello()
    c.send(MsgType.DIRECT, {"x": 1}, corr=3, dst=1)
    f = c.reply_to(MsgType.DIRECT, 3)
    assert f.is_error and f.body()["code"] in ("unknown_type", "no_such_endpoint")


def test_drain_returns_tasks_without_attempts(h: InProcess) -> None:
    c = h.client()
    c.hello()
    a = h.client()
    a.hello("a", agent_type="w", wip=1)
    c.call("enqueue", tasks=[{"id": f"d{i}", "summary": "d", "agent_type": "w"} for i in range(3)])
    f, t = a.next_task()
    n = h.call_soon(h.coordinator.drain(0.2))
    assert n >= 1
    with pytest.raises(CallFailed) as e:
        c.call("enqueue", tasks=[{"summary": "late", "agent_type": "w"}])
    assert e.value.code == "draining"
    for i in range(3):
        r = c.call("get", id=f"d{i}")
        assert r["status"] == "ready" and r["attempts"] == 0, r


def test_wire_priority_header(h: InProcess) -> None:
    c = h.client()
    c.hello()
    corr = c.send(MsgType.CALL, {"op": "queue_status", "args": {}}, corr=42, prio=wire.Priority.HIGH)
    f = c.reply_to(MsgType.CALL, corr)
    assert f.header.priority == wire.Priority.HIGH


# --- the scheduler additions the coordinator relies on ------------------------------------------------------


def test_scheduler_release_counted_and_uncounted(tmp_path: Path) -> None:
    from scheduler_fixtures import ManualClock, make, spec

    clock = ManualClock()
    s = make(tmp_path, clock, wip_per_agent_type=None)
    s.enqueue_many([spec("a", max_attempts=2), spec("b"), spec("c")])
    claims = {c.task_id: c for c in s.claim_many("impl", "router", 3)}
    # never dispatched: the claim is undone
    assert s.release_many([("b", claims["b"].fencing_token)], reason="x", count_attempt=False) == {"b": "ready"}
    b = s.get("b")
    assert b.attempts == 0 and b.attempt_history == [] and b.lease_holder is None
    # agent lost: counts like a lease expiry; the last attempt dead-letters
    assert s.release("a", claims["a"].fencing_token, reason="agent disconnected", count_attempt=True).value == "ready"
    a = s.get("a")
    assert a.attempts == 1 and a.attempt_history[0].outcome == "lease_expired"
    assert a.attempt_history[0].error == "agent disconnected"
    again = s.claim_many("impl", "router", 3)
    tok = next(c.fencing_token for c in again if c.task_id == "a")
    assert s.release_many([("a", tok)], reason="lost", count_attempt=True) == {"a": "dead_lettered"}
    # stale tokens are skipped (batch) or refused (single)
    assert s.release_many([("c", claims["c"].fencing_token + 100)], reason="x", count_attempt=True) == {}
    with pytest.raises(Exception):
        s.release("c", claims["c"].fencing_token + 100, reason="x", count_attempt=True)
    # heartbeat_many renews the good ones and reports the others
    clock.now += 10
    renewed, refused = s.heartbeat_many([("c", claims["c"].fencing_token), ("a", tok), ("zz", 1)], lease_s=5)
    assert renewed == {"c": clock.now + 5} and set(refused) == {"a", "zz"}
    assert not s.has_ready("impl")  # b was claimed again with a
    s.enqueue(spec("d"))
    assert s.has_ready("impl") and not s.has_ready("other")
    assert s.record_map()["c"].status == "running"
    s.close()
