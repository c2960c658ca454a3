"""One conformance suite for every router (docs/protocol.md), run through RouterLink.

Each test runs against the pure-Python router and the native (C) router: the test plays the coordinator
through the link and the clients over real unix sockets (tests/python/router_harness.py).  Ordering
assertions use barriers the protocol guarantees (frames from one sender to one receiver keep their order
within a priority), never sleeps.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from baton import native, protocol, wire
from baton.protocol import MsgType
from baton.router import RouterLink, RouterOptions
from router_harness import (
    CRITICAL,
    F_ERROR,
    F_REPLY,
    HIGH,
    NORMAL,
    Client,
    as_nobody,
    collect_as_nobody,
    Frame,
    Harness,
    LinkDriver,
    coord_frame,
    frame,
    dispatched_pairs,
    pack,
    parse,
    read_as_nobody,
    task_frame,
    too_large_header,
)

GEN = 7
MAX_PAYLOAD = 64 * 1024
COORD = protocol.EP_COORDINATOR


def _python_link(options: RouterOptions) -> RouterLink:
    from baton.router.python import PythonRouterLink

    return PythonRouterLink(options)


def _native_link(options: RouterOptions) -> RouterLink:
    from baton.router.native import NativeRouterLink  # type: ignore[import-not-found,unused-ignore]

    link: RouterLink = NativeRouterLink(options)
    return link


LINKS: dict[str, Callable[[RouterOptions], RouterLink]] = {"python": _python_link, "native": _native_link}


@pytest.fixture(params=sorted(LINKS))
def make_link(request: pytest.FixtureRequest) -> Callable[[RouterOptions], RouterLink]:
    return LINKS[request.param]


@pytest.fixture
def h(short_tmp: Path, make_link: Callable[[RouterOptions], RouterLink]) -> Iterator[Harness]:
    harness = Harness(str(short_tmp), make_link, generation=GEN, max_payload=MAX_PAYLOAD).start()
    try:
        yield harness
    finally:
        harness.close()


def is_reply(f: Frame, type: int, corr: int) -> bool:
    return f.type == type and f.corr == corr and bool(f.flags & F_REPLY)


def reply_to(type: int, corr: int) -> Callable[[Frame], bool]:
    return lambda f: is_reply(f, type, corr)


def expect_error(c: Client, type: int, corr: int, code: str) -> Frame:
    f = c.recv_until(lambda f: is_reply(f, type, corr), what=f"{code} reply to type {type}")
    assert f.flags & F_ERROR, f
    body = f.obj()
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    return f


# --- endpoints --------------------------------------------------------------------------------------------


def test_endpoint_ids_count_from_2_under_the_generation(h: Harness) -> None:
    a, b, c = h.connect(), h.connect(), h.connect()
    assert [x.ep for x in (a, b, c)] == [(GEN << 32) | n for n in (2, 3, 4)]


def test_ep_open_carries_peer_credentials(h: Harness) -> None:
    a = h.connect()
    opened: Frame = a.ep_open  # type: ignore[attr-defined]
    assert opened.destination == COORD
    assert opened.obj() == [os.getpid(), os.getuid(), os.getgid()]


def test_source_is_overwritten_on_frames_to_the_coordinator_and_to_endpoints(h: Harness) -> None:
    a, b = h.connect(), h.connect()
    a.send(MsgType.HELLO, source=b.ep, destination=COORD, corr=1,
           obj={"v": 1, "name": "a", "pid": os.getpid(), "agent_type": None, "capabilities": [], "wip": 0})
    hello = h.coord.recv_until(lambda f: f.type == MsgType.HELLO, what="HELLO")
    assert hello.source == a.ep and hello.corr == 1
    a.send(MsgType.DIRECT, source=COORD, destination=b.ep, payload=b"forged")
    got = b.recv_until(lambda f: f.type == MsgType.DIRECT, what="DIRECT")
    assert got.source == a.ep and got.payload == b"forged"


def test_source_is_overwritten_on_a_crc_frame(h: Harness) -> None:
    a, b = h.connect(), h.connect()
    a.send(MsgType.DIRECT, source=12345, destination=b.ep, flags=wire.F_CRC, payload=b"checked")
    got = b.recv_until(lambda f: f.type == MsgType.DIRECT, what="DIRECT")  # FrameStream verified the CRC
    assert got.source == a.ep and got.payload == b"checked" and got.flags & wire.F_CRC


# --- DIRECT -----------------------------------------------------------------------------------------------


def test_direct_request_and_response_keep_the_correlation_id(h: Harness) -> None:
    a, b = h.connect(), h.connect()
    a.send(MsgType.DIRECT, destination=b.ep, corr=77, payload=b"question")
    req = b.recv_until(lambda f: f.type == MsgType.DIRECT, what="request")
    assert (req.source, req.destination, req.corr, req.flags, req.payload) == (a.ep, b.ep, 77, 0, b"question")
    b.send(MsgType.DIRECT, destination=req.source, corr=req.corr, flags=F_REPLY, payload=b"answer")
    resp = a.recv_until(lambda f: is_reply(f, MsgType.DIRECT, 77), what="response")
    assert resp.source == b.ep and resp.payload == b"answer" and not resp.flags & F_ERROR


def test_direct_to_and_from_the_coordinator(h: Harness) -> None:
    a = h.connect()
    a.send(MsgType.DIRECT, destination=COORD, corr=5, payload=b"up")
    up = h.coord.recv_until(lambda f: f.type == MsgType.DIRECT, what="DIRECT to the coordinator")
    assert (up.source, up.corr, up.payload) == (a.ep, 5, b"up")
    h.coord.send([coord_frame(MsgType.DIRECT, destination=a.ep, corr=5, flags=F_REPLY, payload=b"down")])
    down = a.recv_until(lambda f: is_reply(f, MsgType.DIRECT, 5), what="DIRECT from the coordinator")
    assert down.source == COORD and down.payload == b"down"


def test_direct_to_an_unknown_endpoint_is_no_such_endpoint(h: Harness) -> None:
    a = h.connect()
    ghost = (GEN << 32) | 999
    a.send(MsgType.DIRECT, destination=ghost, corr=9, payload=b"?")
    expect_error(a, MsgType.DIRECT, 9, "no_such_endpoint")
    a.send(MsgType.DIRECT, destination=ghost, corr=0, payload=b"one way")  # corr 0: still told, with corr 0
    expect_error(a, MsgType.DIRECT, 0, "no_such_endpoint")


def test_direct_from_the_coordinator_to_an_unknown_endpoint(h: Harness) -> None:
    ghost = (GEN << 32) | 998
    h.coord.send([coord_frame(MsgType.DIRECT, destination=ghost, corr=4, payload=b"?")])
    f = h.coord.recv_until(lambda f: is_reply(f, MsgType.DIRECT, 4), what="no_such_endpoint")
    assert f.flags & F_ERROR and f.obj()["code"] == "no_such_endpoint"


# --- pub/sub, groups, broadcast ---------------------------------------------------------------------------


def test_publish_reaches_subscribers_and_unsubscribe_stops_it(h: Harness) -> None:
    a, b, c = h.connect(), h.connect(), h.connect()
    topic = protocol.topic_id("news")
    for i, x in enumerate((a, b)):
        x.send(MsgType.SUBSCRIBE, destination=topic, corr=10 + i)
        ack = x.recv_until(reply_to(MsgType.SUBSCRIBE, 10 + i), what="SUBSCRIBE ack")
        assert not ack.flags & F_ERROR and ack.payload == b""
    c.send(MsgType.PUBLISH, destination=topic, payload=b"one")
    for x in (a, b):
        got = x.recv_until(lambda f: f.type == MsgType.PUBLISH, what="publication")
        assert (got.source, got.destination, got.payload) == (c.ep, topic, b"one")
    # The publisher is not subscribed: its round trip completes with no publication ahead of it.
    c.ping(1)
    assert not [f for f in c.pending if f.type == MsgType.PUBLISH]

    b.send(MsgType.UNSUBSCRIBE, destination=topic, corr=20)
    b.recv_until(lambda f: is_reply(f, MsgType.UNSUBSCRIBE, 20), what="UNSUBSCRIBE ack")
    a.send(MsgType.PUBLISH, destination=topic, payload=b"two")  # a is subscribed: it gets its own
    assert a.recv_until(lambda f: f.type == MsgType.PUBLISH, what="own publication").payload == b"two"
    a.send(MsgType.DIRECT, destination=b.ep, corr=3, payload=b"after")  # same sender, same priority: after
    seen = b.drain_until(lambda f: f.type == MsgType.DIRECT, what="barrier")
    assert [f.type for f in seen] == [MsgType.DIRECT], seen


def test_subscribe_without_corr_is_not_acknowledged(h: Harness) -> None:
    a = h.connect()
    topic = protocol.topic_id("quiet")
    a.send(MsgType.SUBSCRIBE, destination=topic)
    a.send(MsgType.PUBLISH, destination=topic, payload=b"x")
    got = a.drain_until(lambda f: f.type == MsgType.PUBLISH, what="publication")
    assert [f.type for f in got] == [MsgType.PUBLISH]


def test_multicast_reaches_members_but_not_the_sender_and_leave_stops_it(h: Harness) -> None:
    a, b, c = h.connect(), h.connect(), h.connect()
    group = protocol.group_id("crew")
    for i, x in enumerate((a, b, c)):
        x.send(MsgType.JOIN, destination=group, corr=30 + i)
        x.recv_until(reply_to(MsgType.JOIN, 30 + i), what="JOIN ack")
    a.send(MsgType.MULTICAST, destination=group, payload=b"hi")
    for x in (b, c):
        got = x.recv_until(lambda f: f.type == MsgType.MULTICAST, what="multicast")
        assert (got.source, got.destination, got.payload) == (a.ep, group, b"hi")
    a.ping(2)
    assert not [f for f in a.pending if f.type == MsgType.MULTICAST], "the sender got its own multicast"

    c.send(MsgType.LEAVE, destination=group, corr=40)
    c.recv_until(lambda f: is_reply(f, MsgType.LEAVE, 40), what="LEAVE ack")
    a.send(MsgType.MULTICAST, destination=group, payload=b"again")
    assert b.recv_until(lambda f: f.type == MsgType.MULTICAST, what="multicast").payload == b"again"
    a.send(MsgType.DIRECT, destination=c.ep, corr=4, payload=b"after")
    seen = c.drain_until(lambda f: f.type == MsgType.DIRECT, what="barrier")
    assert [f.type for f in seen] == [MsgType.DIRECT], seen


def test_broadcast_skips_the_sender_and_the_coordinator(h: Harness) -> None:
    a, b, c = h.connect(), h.connect(), h.connect()
    a.send(MsgType.BROADCAST, payload=b"all")
    for x in (b, c):
        got = x.recv_until(lambda f: f.type == MsgType.BROADCAST, what="broadcast")
        assert got.source == a.ep and got.payload == b"all"
    a.ping(3)
    assert not [f for f in a.pending if f.type == MsgType.BROADCAST]
    a.send(MsgType.CALL, destination=COORD, corr=8, obj={"op": "pulse", "args": {}})
    seen = h.coord.drain_until(lambda f: f.type == MsgType.CALL, what="CALL barrier")
    assert not [f for f in seen if f.type == MsgType.BROADCAST], seen


# --- work queues ------------------------------------------------------------------------------------------


def test_an_agent_never_holds_more_than_its_credit_and_result_brings_the_next(h: Harness) -> None:
    agent = h.agent("build", 2)
    for did in range(1, 6):
        h.push("build", did)
    first = h.tasks_before_marker(agent, 100)
    assert [t.corr for t in first] == [1, 2]
    for t in first:
        assert t.destination == agent.ep and t.source == COORD
        assert t.obj()["id"] == f"t{t.corr}"
    dispatched = h.coord.recv_until(lambda f: f.type == MsgType.DISPATCHED, what="DISPATCHED")
    assert dispatched.source == 0 and dispatched.destination == COORD
    pairs = dispatched_pairs([dispatched])
    while len(pairs) < 2:
        pairs += dispatched_pairs([h.coord.recv_until(lambda f: f.type == MsgType.DISPATCHED)])
    assert pairs == [(agent.ep, 1), (agent.ep, 2)]

    # RESULT: forwarded to the coordinator, and the next task arrives with no coordinator action.
    h.result(agent, 1)
    res = h.coord.recv_until(lambda f: f.type == MsgType.RESULT, what="RESULT")
    assert (res.source, res.corr, res.obj()["ok"]) == (agent.ep, 1, True)
    nxt = agent.recv_until(lambda f: f.type == MsgType.TASK, what="the next task")
    assert nxt.corr == 3
    assert h.tasks_before_marker(agent, 101) == []  # still exactly its credit
    more = h.coord.recv_until(lambda f: f.type == MsgType.DISPATCHED, what="DISPATCHED for 3")
    assert dispatched_pairs([more]) == [(agent.ep, 3)]


def test_result_for_a_dispatch_the_agent_does_not_hold_returns_no_credit(h: Harness) -> None:
    agent = h.agent("lint", 1)
    h.push("lint", 1)
    h.push("lint", 2)
    assert [t.corr for t in h.tasks_before_marker(agent, 100)] == [1]
    h.result(agent, 999)  # unknown dispatch: still forwarded (the coordinator judges it), no credit back
    assert h.coord.recv_until(lambda f: f.type == MsgType.RESULT).corr == 999
    assert h.tasks_before_marker(agent, 101) == []


def test_dispatch_prefers_the_agent_holding_fewest_then_round_robin(h: Harness) -> None:
    x = h.agent("test", 5)
    h.push("test", 1)
    h.push("test", 2)
    assert [t.corr for t in h.tasks_before_marker(x, 100)] == [1, 2]
    y = h.agent("test", 5)
    for did in (3, 4, 5, 6):
        h.push("test", did)
    got_x = [t.corr for t in h.tasks_before_marker(x, 101)]
    got_y = [t.corr for t in h.tasks_before_marker(y, 102)]
    # y held none: it takes 3 and 4 (fewest held); then both hold 2, so 5 and 6 go one to each.
    assert got_y[:2] == [3, 4]
    assert sorted(got_x + got_y) == [3, 4, 5, 6]
    assert (len(got_x), len(got_y)) == (1, 3)


def _result_of(did: int) -> Callable[[Frame], bool]:
    return lambda f: f.type == MsgType.RESULT and f.corr == did


def test_ties_on_held_tasks_rotate_round_robin(h: Harness) -> None:
    a, b = h.agent("rr", 10), h.agent("rr", 10)
    winners = []
    for did in range(1, 5):
        h.push("rr", did)
        got_a = h.tasks_before_marker(a, 100 + did)
        got_b = h.tasks_before_marker(b, 200 + did)
        assert len(got_a) + len(got_b) == 1
        winner = a if got_a else b
        winners.append(winner.ep)
        h.result(winner, did)
        h.coord.recv_until(_result_of(did), what="RESULT")
    assert winners[0] != winners[1] and winners[0::2] == [winners[0]] * 2 and winners[1::2] == [winners[1]] * 2


def test_critical_tasks_are_dispatched_before_normal_ones(h: Harness) -> None:
    agent = h.agent("deploy", 1)
    h.push("deploy", 1)
    assert [t.corr for t in h.tasks_before_marker(agent, 100)] == [1]
    h.push("deploy", 2, priority=NORMAL)
    h.push("deploy", 3, priority=NORMAL)
    h.push("deploy", 4, priority=CRITICAL)
    order = []
    for done in (1, 4, 2):
        h.result(agent, done)
        order.append(agent.recv_until(lambda f: f.type == MsgType.TASK, what="next task").corr)
    assert order == [4, 2, 3]


def test_revoke_drops_a_queued_task_and_says_whether_it_was_found(h: Harness) -> None:
    for did in (1, 2, 3):
        h.push("docs", did)
    h.coord.ctl(MsgType.CTL_REVOKE, protocol.CTL_REVOKE.pack(protocol.queue_id("docs"), 2), corr=50)
    r = h.coord.recv_until(lambda f: is_reply(f, MsgType.CTL_REVOKE, 50), what="revoke reply")
    assert not r.flags & F_ERROR and r.obj() == [2, 1]
    h.coord.ctl(MsgType.CTL_REVOKE, protocol.CTL_REVOKE.pack(protocol.queue_id("docs"), 2), corr=51)
    assert h.coord.recv_until(lambda f: is_reply(f, MsgType.CTL_REVOKE, 51)).obj() == [2, 0]
    h.coord.ctl(MsgType.CTL_REVOKE, protocol.CTL_REVOKE.pack(protocol.queue_id("nowhere"), 1), corr=52)
    assert h.coord.recv_until(lambda f: is_reply(f, MsgType.CTL_REVOKE, 52)).obj() == [1, 0]
    agent = h.agent("docs", 10)
    assert [t.corr for t in h.tasks_before_marker(agent, 100)] == [1, 3]
    # A dispatched task can no longer be revoked.
    h.coord.ctl(MsgType.CTL_REVOKE, protocol.CTL_REVOKE.pack(protocol.queue_id("docs"), 1), corr=53)
    assert h.coord.recv_until(lambda f: is_reply(f, MsgType.CTL_REVOKE, 53)).obj() == [1, 0]


def test_pause_stops_dispatch_but_not_other_traffic_and_resume_restarts_it(h: Harness) -> None:
    h.coord.ctl(MsgType.CTL_PAUSE, protocol.CTL_PAUSE.pack(1))
    agent = h.agent("ops", 2)
    h.push("ops", 1)
    h.push("ops", 2)
    assert h.tasks_before_marker(agent, 100) == []  # the marker (a DIRECT) still flows while paused
    h.coord.ctl(MsgType.CTL_PAUSE, protocol.CTL_PAUSE.pack(0))
    got = [agent.recv_until(lambda f: f.type == MsgType.TASK, what="task after resume").corr for _ in range(2)]
    assert got == [1, 2]


def test_pause_holds_the_next_task_after_a_result(h: Harness) -> None:
    agent = h.agent("ops2", 1)
    h.push("ops2", 1)
    h.push("ops2", 2)
    assert [t.corr for t in h.tasks_before_marker(agent, 100)] == [1]
    h.coord.ctl(MsgType.CTL_PAUSE, protocol.CTL_PAUSE.pack(1))
    h.result(agent, 1)
    h.coord.recv_until(lambda f: f.type == MsgType.RESULT, what="RESULT")
    assert h.tasks_before_marker(agent, 101) == []
    h.coord.ctl(MsgType.CTL_PAUSE, protocol.CTL_PAUSE.pack(0))
    assert agent.recv_until(lambda f: f.type == MsgType.TASK).corr == 2


def test_ctl_agent_queue_zero_stops_serving(h: Harness) -> None:
    agent = h.agent("q0", 3)
    h.set_agent(agent, None, 0)
    h.push("q0", 1)
    assert h.tasks_before_marker(agent, 100) == []
    h.set_agent(agent, "q0", 3)
    assert agent.recv_until(lambda f: f.type == MsgType.TASK).corr == 1


def test_ep_closed_lists_the_dispatches_without_a_result(h: Harness) -> None:
    agent = h.agent("crash", 2)
    for did in (1, 2, 3):
        h.push("crash", did)
    assert [t.corr for t in h.tasks_before_marker(agent, 100)] == [1, 2]
    h.result(agent, 1)
    assert agent.recv_until(lambda f: f.type == MsgType.TASK).corr == 3
    ep = agent.ep
    agent.sock.close()
    closed = h.coord.recv_until(lambda f: f.type == MsgType.EP_CLOSED and f.source == ep, what="EP_CLOSED")
    assert closed.destination == COORD
    assert sorted(closed.obj()) == [2, 3]
    # The closed agent is out of the queue: a new task waits for a new agent.
    h.push("crash", 4)
    other = h.agent("crash", 1)
    assert other.recv_until(lambda f: f.type == MsgType.TASK).corr == 4


def test_ep_closed_for_a_plain_client_is_empty(h: Harness) -> None:
    a = h.connect()
    a.sock.close()
    closed = h.coord.recv_until(lambda f: f.type == MsgType.EP_CLOSED and f.source == a.ep, what="EP_CLOSED")
    assert closed.obj() == []


def test_ctl_close_flushes_then_closes(h: Harness) -> None:
    a, b = h.connect(), h.connect()
    h.coord.send([coord_frame(MsgType.DIRECT, destination=a.ep, payload=b"last words")])
    h.coord.ctl(MsgType.CTL_CLOSE, protocol.CTL_CLOSE.pack(a.ep))
    before = a.wait_eof()
    assert [f.payload for f in before if f.type == MsgType.DIRECT] == [b"last words"]
    h.coord.recv_until(lambda f: f.type == MsgType.EP_CLOSED and f.source == a.ep, what="EP_CLOSED")
    b.ping(7)  # others are unaffected
    b.send(MsgType.DIRECT, destination=a.ep, corr=8, payload=b"?")
    expect_error(b, MsgType.DIRECT, 8, "no_such_endpoint")


# --- permissions and errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type", "payload"),
    [
        (MsgType.TASK, b""),
        (MsgType.CTL_AGENT, protocol.CTL_AGENT.pack(0, 1, 1)),
        (MsgType.CTL_CLOSE, protocol.CTL_CLOSE.pack(0)),
        (MsgType.CTL_REVOKE, protocol.CTL_REVOKE.pack(1, 1)),
        (MsgType.CTL_PAUSE, protocol.CTL_PAUSE.pack(1)),
        (MsgType.CTL_STATS, b""),
        (MsgType.CTL_SHUTDOWN, b""),
        # Router -> coordinator notifications and coordinator-only frames: a client cannot forge them
        # (docs/router_python.md, ambiguity 3).
        (MsgType.WELCOME, b"\x80"),
        (MsgType.EP_CLOSED, b"\x90"),
        (MsgType.DISPATCHED, b"\x90"),
        (MsgType.CONTINUED, b"\x90"),
        (MsgType.CTL_CONTINUE, protocol.ctl_continue_payload(1, task_frame("x", 2))),
    ],
)
def test_tasks_and_controls_from_a_client_are_forbidden(h: Harness, type: int, payload: bytes) -> None:
    a = h.connect()
    b = h.connect()
    a.send(type, corr=60, destination=b.ep, payload=payload)
    expect_error(a, type, 60, "forbidden")
    a.ping(61)  # the stream goes on, the router too
    assert h.coord.alive()
    b.ping(62)
    assert not [f for f in b.pending if f.type == type]


def test_unknown_type_is_answered_and_the_stream_continues(h: Harness) -> None:
    a = h.connect()
    a.send(99, corr=70, payload=b"??")
    expect_error(a, 99, 70, "unknown_type")
    a.send(99, corr=0, payload=b"??")
    expect_error(a, 99, 0, "unknown_type")
    assert a.ping(71).payload == b"barrier"


def test_an_error_frame_is_never_answered_with_an_error(h: Harness) -> None:
    a = h.connect()
    a.send(99, corr=72, flags=F_REPLY | F_ERROR, obj={"code": "internal", "message": "x"})
    a.send(MsgType.DIRECT, destination=(GEN << 32) | 997, corr=73, flags=F_REPLY | F_ERROR,
           obj={"code": "internal", "message": "x"})
    a.ping(74)
    assert not a.pending, a.pending


def test_bad_magic_gets_bad_frame_and_a_close_while_others_carry_on(h: Harness) -> None:
    bad, good = h.connect(), h.connect()
    bad.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
    frames = bad.wait_eof()
    errs = [f for f in frames if f.flags & F_ERROR]
    assert len(errs) == 1 and errs[0].obj()["code"] == "bad_frame", frames
    h.coord.recv_until(lambda f: f.type == MsgType.EP_CLOSED and f.source == bad.ep, what="EP_CLOSED")
    assert good.ping(80).payload == b"barrier"


def test_oversize_frame_gets_too_large_and_a_close(h: Harness) -> None:
    big, good = h.connect(), h.connect()
    big.send_raw(too_large_header(MsgType.DIRECT, 90, MAX_PAYLOAD + 1))
    frames = big.wait_eof()
    assert len(frames) == 1, frames
    err = frames[0]
    assert err.type == MsgType.DIRECT and err.corr == 90 and err.flags == F_REPLY | F_ERROR
    assert err.obj()["code"] == "too_large"
    h.coord.recv_until(lambda f: f.type == MsgType.EP_CLOSED and f.source == big.ep, what="EP_CLOSED")
    assert good.ping(91).payload == b"barrier"


def test_a_frame_of_exactly_max_payload_is_fine(h: Harness) -> None:
    a, b = h.connect(), h.connect()
    body = os.urandom(MAX_PAYLOAD)
    a.send(MsgType.DIRECT, destination=b.ep, payload=body)
    assert b.recv_until(lambda f: f.type == MsgType.DIRECT).payload == body


def test_frames_split_across_writes_are_reassembled(h: Harness) -> None:
    a, b = h.connect(), h.connect()
    data = b"".join(frame(MsgType.DIRECT, destination=b.ep, corr=i, payload=bytes([i]) * (i * 300)) for i in range(20))
    for i in range(0, len(data), 1000):
        a.send_raw(data[i : i + 1000])
    got = [b.recv_until(lambda f: f.type == MsgType.DIRECT).corr for _ in range(20)]
    assert got == list(range(20))


def test_ping_echoes_the_payload(h: Harness) -> None:
    a = h.connect()
    a.send(MsgType.PING, corr=33, priority=wire.Priority.HIGH, payload=b"\x01\x02echo")
    f = a.recv_until(lambda f: is_reply(f, MsgType.PING, 33), what="PING reply")
    assert f.payload == b"\x01\x02echo" and not f.flags & F_ERROR and f.destination == a.ep


def router_stats(h: Harness, corr: int) -> dict[str, Any]:
    """ROUTER_STATS for a CTL_STATS sent now (after every coordinator frame sent before it)."""
    h.coord.ctl(MsgType.CTL_STATS, corr=corr)
    f = h.coord.recv_until(reply_to(MsgType.ROUTER_STATS, corr), what="ROUTER_STATS")
    assert not f.flags & F_ERROR and f.source == 0 and f.destination == COORD
    stats = f.obj()
    assert isinstance(stats, dict)
    return stats


# What an exporter reads from either router (docs/protocol.md, ROUTER_STATS).
SHARED_STATS_KEYS = ("by_pattern", "connections", "bad_frames", "ring_backlog_events", "coord_ring_full")
LOW, BATCH = wire.Priority.LOW, wire.Priority.BATCH
PRIO_NAMES = ("critical", "high", "normal", "low", "batch")


def test_ctl_stats_replies_router_stats(h: Harness) -> None:
    a = h.connect()
    a.ping(1)
    stats = router_stats(h, 44)
    assert set(SHARED_STATS_KEYS) <= set(stats), sorted(stats)
    counters = {k: v for k, v in stats.items() if k != "by_pattern"}
    assert counters and all(isinstance(k, str) and isinstance(v, int) for k, v in counters.items()), stats
    assert stats["connections"] == 1 and stats["bad_frames"] == 0
    assert stats["ring_backlog_events"] == 0 and stats["coord_ring_full"] == 0
    # The PING, and the CTL_STATS that asked (counted before the reply is built).
    assert stats["by_pattern"] == {"control": {"normal": [2, 2 * wire.HEADER_SIZE + len(b"barrier")]}}


def test_stats_count_every_frame_taken_in_by_pattern_and_priority(h: Harness) -> None:
    """A known mix from clients and from the coordinator; by_pattern must hold exactly these cells."""
    want: dict[str, dict[str, list[int]]] = {}

    def counted(pattern: str, raw: bytes) -> bytes:
        cell = want.setdefault(pattern, {}).setdefault(PRIO_NAMES[raw[6]], [0, 0])  # header byte 6: priority
        cell[0] += 1
        cell[1] += len(raw)  # header and payload
        return raw

    def coord(pattern: str, type: int, **kw: Any) -> None:
        h.coord.send([counted(pattern, coord_frame(type, **kw))])

    def send(c: Client, pattern: str, type: int, **kw: Any) -> None:
        c.send_raw(counted(pattern, frame(type, **kw)))

    def got(c: Client | LinkDriver, type: int, corr: int = 0) -> Frame:
        return c.recv_until(lambda f: f.type == type and f.corr == corr, what=f"type {type} corr {corr}")

    a, b, agent = h.connect(), h.connect(), h.connect()
    qid = protocol.queue_id("metrics")
    coord("control", MsgType.CTL_AGENT, payload=protocol.CTL_AGENT.pack(agent.ep, qid, 1))
    # DIRECT: one-way, a request and its reply.
    send(a, "direct", MsgType.DIRECT, destination=b.ep, payload=b"one way")
    got(b, MsgType.DIRECT)
    send(a, "request", MsgType.DIRECT, priority=HIGH, destination=b.ep, corr=5, payload=b"question")
    got(b, MsgType.DIRECT, 5)
    send(b, "reply", MsgType.DIRECT, flags=F_REPLY, destination=a.ep, corr=5, payload=b"answer")
    got(a, MsgType.DIRECT, 5)
    # Membership is control; PUBLISH, MULTICAST, BROADCAST (at two priorities) are their own patterns.
    topic, group = protocol.topic_id("metrics"), protocol.group_id("metrics")
    send(b, "control", MsgType.SUBSCRIBE, destination=topic, corr=10)
    got(b, MsgType.SUBSCRIBE, 10)
    send(b, "control", MsgType.JOIN, destination=group, corr=11)
    got(b, MsgType.JOIN, 11)
    send(a, "publish", MsgType.PUBLISH, priority=LOW, destination=topic, payload=b"news")
    got(b, MsgType.PUBLISH)
    send(a, "multicast", MsgType.MULTICAST, destination=group, payload=b"crew")
    got(b, MsgType.MULTICAST)
    send(a, "broadcast", MsgType.BROADCAST, payload=b"all")
    send(a, "broadcast", MsgType.BROADCAST, priority=BATCH, payload=b"all, later")
    for c in (b, agent, b, agent):
        got(c, MsgType.BROADCAST)
    # A TASK pushed by the coordinator, the agent's RESULT and the coordinator's acknowledgement (a RESULT too).
    task = {"id": "t1", "token": 1, "agent_type": "metrics", "attempt": 1, "input": None, "metadata": {},
            "lease_s": 30.0, "timeout_s": None}
    coord("task", MsgType.TASK, priority=HIGH, destination=qid, corr=1, payload=pack(task))
    got(agent, MsgType.TASK, 1)
    send(agent, "result", MsgType.RESULT, destination=COORD, corr=1,
         payload=pack({"id": "t1", "token": 1, "ok": True, "result": None}))
    got(h.coord, MsgType.RESULT, 1)
    coord("result", MsgType.RESULT, flags=F_REPLY, destination=agent.ep, corr=1,
          payload=pack({"accepted": True, "reason": None}))
    got(agent, MsgType.RESULT, 1)
    # HELLO and CALL to the coordinator, its WELCOME and CALL replies: control.
    send(a, "control", MsgType.HELLO, priority=HIGH, destination=COORD, corr=20,
         payload=pack({"v": 1, "name": "a", "pid": os.getpid(), "agent_type": None, "capabilities": [], "wip": 0}))
    got(h.coord, MsgType.HELLO, 20)
    coord("control", MsgType.WELCOME, priority=HIGH, flags=F_REPLY, destination=a.ep, corr=20, payload=pack({}))
    got(a, MsgType.WELCOME, 20)
    send(a, "control", MsgType.CALL, destination=COORD, corr=21, payload=pack({"op": "pulse", "args": {}}))
    got(h.coord, MsgType.CALL, 21)
    coord("control", MsgType.CALL, flags=F_REPLY, destination=a.ep, corr=21, payload=pack({"ok": 1}))
    got(a, MsgType.CALL, 21)
    counted("control", coord_frame(MsgType.CTL_STATS, corr=45))  # the request that asks is counted too
    stats = router_stats(h, 45)
    assert stats["by_pattern"] == want
    assert stats["bad_frames"] == 0 and stats["connections"] == 3
    assert set(want) == {"direct", "request", "reply", "publish", "multicast", "broadcast", "task", "result",
                         "control"}
    assert want["broadcast"].keys() == {"normal", "batch"}


def test_malformed_frames_stay_out_of_by_pattern(h: Harness) -> None:
    before = router_stats(h, 46)["by_pattern"]
    bad, big = h.connect(), h.connect()
    bad.send_raw(b"\0" * 64)
    bad.wait_eof()
    big.send_raw(too_large_header(MsgType.DIRECT, 90, MAX_PAYLOAD + 1))
    big.wait_eof()
    for c in (bad, big):
        h.coord.recv_until(lambda f, c=c: f.type == MsgType.EP_CLOSED and f.source == c.ep, what="EP_CLOSED")
    stats = router_stats(h, 47)
    assert stats["bad_frames"] == 2
    # Only the CTL_STATS requests were taken in: the two rejected frames count nowhere but in bad_frames.
    assert before == {"control": {"normal": [1, wire.HEADER_SIZE]}}
    assert stats["by_pattern"] == {"control": {"normal": [2, 2 * wire.HEADER_SIZE]}}


@pytest.mark.skipif(not native.AVAILABLE, reason="rings need libbaton")
def test_ring_backlog_events_count_a_full_ring(h: Harness) -> None:
    """A ring client that never reads its r2c ring: CRITICAL frames for it fill the ring, then wait."""
    a, b = h.connect(), h.connect()
    a.send(MsgType.RING_SETUP, corr=12, destination=4096)
    ready = a.recv_until(lambda f: f.corr == 12 and bool(f.flags & F_REPLY), what="RING_READY")
    assert ready.type == MsgType.RING_READY, ready
    assert router_stats(h, 48)["ring_backlog_events"] == 0
    for i in range(16):  # 16 KiB for a 4 KiB ring (records up to 1 KiB)
        b.send(MsgType.DIRECT, priority=CRITICAL, destination=a.ep, corr=100 + i, payload=b"x" * 900)
    b.ping(13)  # the router has routed them, and flushed (the ring, then the backlog) in that turn
    stats = router_stats(h, 49)
    assert stats["ring_backlog_events"] >= 1, stats
    assert stats["by_pattern"]["request"] == {"critical": [16, 16 * (wire.HEADER_SIZE + 900)]}


def test_ctl_shutdown_closes_everyone_and_stops(h: Harness) -> None:
    a, b = h.connect(), h.connect()
    h.coord.ctl(MsgType.CTL_SHUTDOWN)
    a.wait_eof()
    b.wait_eof()
    h.coord.wait_gone(10.0)
    assert not h.coord.alive(), "router still alive after CTL_SHUTDOWN"
    # The listening socket is the daemon's: still open after the router stopped.
    assert h.listener.fileno() >= 0 and os.fstat(h.listener.fileno())


def test_slow_consumer_is_closed_and_reported(h: Harness) -> None:
    slow, other = h.connect(), h.connect()
    chunk = [coord_frame(MsgType.DIRECT, destination=slow.ep, payload=b"x" * 60_000)] * 16
    sent = 0
    closed = None
    while closed is None:
        assert sent < 512 << 20, "a client that never reads was never closed"
        h.coord.send(chunk)
        sent += 16 * 60_000
        closed = h.coord.poll(lambda f: f.type == MsgType.EP_CLOSED and f.source == slow.ep, 0.01)
    assert other.ping(5).payload == b"barrier"
    log = [f.obj() for f in h.coord.pending if f.type == MsgType.ROUTER_LOG]
    assert all(isinstance(level, str) and isinstance(msg, str) for level, msg in log)


# --- peer credentials -------------------------------------------------------------------------------------

def _open_socket_to_everyone(h: Harness) -> None:
    os.chmod(os.path.dirname(h.path), 0o755)
    os.chmod(h.path, 0o666)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
def test_a_peer_with_another_uid_is_refused(h: Harness) -> None:
    _open_socket_to_everyone(h)
    data = read_as_nobody(h.path)
    frames = [Frame(hd, p) for hd, p in wire.FrameStream(0).feed(data)]
    assert len(frames) == 1, frames
    f = frames[0]
    assert f.type == MsgType.HELLO and f.corr == 0 and f.flags == F_REPLY | F_ERROR
    assert f.obj()["code"] == "refused"
    # No EP_OPEN for it: the next endpoint the coordinator hears of is the next client, and it gets n = 2.
    a = h.connect()
    assert a.ep == (GEN << 32) | 2


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
def test_a_peer_in_the_allowed_group_is_accepted(short_tmp: Path,
                                                 make_link: Callable[[RouterOptions], RouterLink]) -> None:
    hh = Harness(str(short_tmp), make_link, generation=GEN, max_payload=MAX_PAYLOAD, allowed_gid=65534).start()
    try:
        _open_socket_to_everyone(hh)
        pid, rfd = as_nobody(hh.path)
        opened = hh.coord.recv_until(lambda f: f.type == MsgType.EP_OPEN, what="EP_OPEN of the group member")
        assert opened.obj() == [pid, 65534, 65534]
        hh.coord.ctl(MsgType.CTL_CLOSE, protocol.CTL_CLOSE.pack(opened.source))
        assert collect_as_nobody(pid, rfd) == b""
    finally:
        hh.close()


# --- rings ------------------------------------------------------------------------------------------------


def test_ring_setup_passes_four_descriptors_or_says_unavailable(h: Harness) -> None:
    a = h.connect()
    a.send(MsgType.RING_SETUP, corr=12, destination=1 << 16)
    f = a.recv_until(lambda f: f.corr == 12 and bool(f.flags & F_REPLY), what="RING_SETUP answer")
    if not native.AVAILABLE:
        assert f.type == MsgType.RING_SETUP and f.flags & F_ERROR and f.obj()["code"] == "ring_unavailable"
        return
    assert f.type == MsgType.RING_READY and not f.flags & F_ERROR and f.payload == b""
    assert len(a.fds) == 4, a.fds
    c2r_fd, r2c_fd, c2r_bell, r2c_bell = a.fds
    assert stat.S_ISREG(os.fstat(c2r_fd).st_mode) and stat.S_ISREG(os.fstat(r2c_fd).st_mode)  # memfds
    assert os.readlink(f"/proc/self/fd/{c2r_bell}") == "anon_inode:[eventfd]"
    assert os.readlink(f"/proc/self/fd/{r2c_bell}") == "anon_inode:[eventfd]"
    # The rings carry frames: a CRITICAL PING in through c2r, its CRITICAL reply out through r2c.
    with native.Ring.attach(c2r_fd, native.PRODUCER) as c2r, native.Ring.attach(r2c_fd, native.CONSUMER) as r2c:
        c2r.write(frame(MsgType.PING, priority=CRITICAL, corr=13, payload=b"via ring"))
        os.eventfd_write(c2r_bell, 1)
        recs = r2c.read_batch(timeout=5.0)
        assert recs, "no reply through the r2c ring"
        reply = parse(bytes(recs[0]))
        assert is_reply(reply, MsgType.PING, 13) and reply.payload == b"via ring"
        # NORMAL frames keep using the socket.
        assert a.ping(14).payload == b"barrier"


def test_ring_setup_rejects_a_bad_capacity(h: Harness) -> None:
    a = h.connect()
    a.send(MsgType.RING_SETUP, corr=15, destination=12345)
    expect_error(a, MsgType.RING_SETUP, 15, "ring_unavailable")
    assert a.fds == []


# --- continuations (CTL_CONTINUE / CONTINUED: docs/protocol.md "Continuations") -------------------------------


def _continued(f: Frame) -> bool:
    return f.type == MsgType.CONTINUED


def continued_pairs(frames: list[Frame]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for f in frames:
        if _continued(f):
            assert f.source == 0 and f.destination == COORD, f
            flat = f.obj()
            out += list(zip(flat[0::2], flat[1::2]))
    return out


def wait_continued(h: Harness, parent: int) -> list[Frame]:
    """Every coordinator frame up to the CONTINUED naming parent, in arrival order."""
    return h.coord.drain_until(lambda f: _continued(f) and parent in f.obj()[0::2], what=f"CONTINUED for {parent}")


def hold(h: Harness, agent: Client, queue_name: str, parent: int) -> None:
    """Push parent into queue_name and wait until agent holds it (and the coordinator heard DISPATCHED)."""
    h.push(queue_name, parent)
    assert agent.recv_until(lambda f: f.type == MsgType.TASK, what=f"task {parent}").corr == parent
    h.coord.recv_until(lambda f: f.type == MsgType.DISPATCHED and (agent.ep, parent) in dispatched_pairs([f]),
                       what=f"DISPATCHED {parent}")


def cont_counts(h: Harness, corr: int) -> tuple[int, int, int]:
    """The router's continuation counters: (stored, parents released, parents discarded)."""
    stats = router_stats(h, corr)
    return stats["continuations"], stats["continued"], stats["continuations_discarded"]


def parent_with_child(h: Harness) -> tuple[Client, Client]:
    """An agent holding dispatch 1 with continuation 2 registered for queue "child", and an idle child agent."""
    p = h.agent("parent", 1)
    c = h.agent("child", 5)
    hold(h, p, "parent", 1)
    h.continue_(1, "child", 2)
    return p, c


def send_result(agent: Client, did: int, payload: bytes) -> None:
    agent.send(MsgType.RESULT, corr=did, destination=COORD, payload=payload)


def test_continuations_are_released_on_ok_true_before_the_agent_gets_its_next_task(h: Harness) -> None:
    a = h.agent("build", 1)
    b = h.agent("ship", 1)
    hold(h, a, "build", 1)
    h.continue_(1, "build", 2)
    h.continue_(1, "ship", 3)
    h.result(a, 1, ok=True)
    # The child on a's own queue went to a, with the credit this RESULT returned; the other went to b.
    assert a.recv_until(lambda f: f.type == MsgType.TASK, what="child 2").corr == 2
    task3 = b.recv_until(lambda f: f.type == MsgType.TASK, what="child 3")
    assert (task3.corr, task3.destination, task3.source) == (3, b.ep, COORD)
    assert task3.obj()["id"] == "t3"
    frames = h.coord.drain_until(lambda f: f.type == MsgType.DISPATCHED and (b.ep, 3) in dispatched_pairs([f]),
                                 what="DISPATCHED of child 3")
    # In the coordinator's stream: the RESULT, then CONTINUED, then the DISPATCHED handing out the children.
    i_result = next(i for i, f in enumerate(frames) if f.type == MsgType.RESULT and f.corr == 1)
    i_cont = next(i for i, f in enumerate(frames) if _continued(f))
    i_disp = next(i for i, f in enumerate(frames) if f.type == MsgType.DISPATCHED and
                  (a.ep, 2) in dispatched_pairs([f]))
    assert i_result < i_cont <= i_disp, frames
    assert continued_pairs(frames) == [(1, 1)]
    assert h.tasks_before_marker(a, 100) == []  # a holds exactly its credit (child 2)
    assert cont_counts(h, 40) == (0, 1, 0)


def test_a_released_child_queues_behind_tasks_already_queued(h: Harness) -> None:
    a = h.agent("build", 1)
    hold(h, a, "build", 1)
    h.push("build", 5)  # queued: the child is pushed as if the coordinator pushed it now, so it goes after 5
    h.continue_(1, "build", 2)
    h.result(a, 1)
    assert a.recv_until(lambda f: f.type == MsgType.TASK, what="task 5").corr == 5
    assert continued_pairs(wait_continued(h, 1)) == [(1, 1)]
    h.result(a, 5)
    assert a.recv_until(lambda f: f.type == MsgType.TASK, what="child 2").corr == 2


def test_several_continuations_of_one_parent_are_pushed_in_arrival_order(h: Harness) -> None:
    p = h.agent("parent", 1)
    c = h.agent("child", 2)
    hold(h, p, "parent", 1)
    for did in (11, 12, 13, 14):
        h.continue_(1, "child", did)
    assert router_stats(h, 41)["continuations"] == 4
    h.result(p, 1)
    assert continued_pairs(wait_continued(h, 1)) == [(1, 1)]
    got = [c.recv_until(lambda f: f.type == MsgType.TASK, what="child").corr for _ in range(2)]
    assert got == [11, 12]
    for did in (11, 12):
        h.result(c, did)
    got += [c.recv_until(lambda f: f.type == MsgType.TASK, what="child").corr for _ in range(2)]
    assert got == [11, 12, 13, 14]
    assert router_stats(h, 42)["continuations"] == 0


def test_a_chain_registered_ahead_is_released_link_by_link(h: Harness) -> None:
    """A continuation may name a stored continuation as its parent (the coordinator registers a chain ahead):
    each link is released when the one before it reports success."""
    a = h.agent("build", 1)
    hold(h, a, "build", 1)
    h.continue_(1, "build", 2)
    h.continue_(2, "build", 3)  # 2 is not queued or held yet: a stored continuation, so known
    h.continue_(3, "build", 4)
    assert router_stats(h, 44)["continuations"] == 3
    for parent, child in ((1, 2), (2, 3), (3, 4)):
        h.result(a, parent)
        assert a.recv_until(lambda f: f.type == MsgType.TASK, what=f"child {child}").corr == child
        assert continued_pairs(wait_continued(h, parent)) == [(parent, 1)]
    assert cont_counts(h, 45) == (0, 3, 0)


def test_a_failed_parent_discards_the_whole_chain_registered_ahead(h: Harness) -> None:
    a = h.agent("build", 1)
    hold(h, a, "build", 1)
    h.continue_(1, "build", 2)
    h.continue_(2, "build", 3)
    h.continue_(3, "build", 4)
    h.continue_(2, "build", 5)  # a second child of 2
    send_result(a, 1, pack({"id": "t1", "token": 1, "ok": False, "error": "boom"}))
    frames = h.coord.drain_until(lambda f: _continued(f) and 3 in f.obj()[0::2], what="CONTINUED for 3")
    pairs = continued_pairs(frames)
    assert pairs[0] == (1, 0) and sorted(pairs) == [(1, 0), (2, 0), (3, 0)], pairs  # each parent once
    assert h.tasks_before_marker(a, 100) == []
    assert cont_counts(h, 46) == (0, 0, 3)


# RESULT payloads that do not say {"ok": true}: discarded.  Duplicate "ok" keys: the last one decides.
NOT_OK = {
    "ok false": pack({"id": "t1", "token": 1, "ok": False, "error": "boom"}),
    "ok 1": pack({"id": "t1", "ok": 1}),
    "ok missing": pack({"id": "t1", "result": True}),
    "not a map": pack([True]),
    "truncated": pack({"id": "t1", "ok": True})[:-1],
    "malformed": b"\x81\xa2ok\xc1",
    "trailing bytes": pack({"ok": True}) + b"\xc0",
    "bin key": b"\x81\xc4\x02ok\xc3",
    "last ok false": b"\x82\xa2ok\xc3\xa2ok\xc2",
    "empty": b"",
}


@pytest.mark.parametrize("payload", list(NOT_OK.values()), ids=list(NOT_OK))
def test_continuations_are_discarded_unless_the_result_says_ok_true(h: Harness, payload: bytes) -> None:
    p, c = parent_with_child(h)
    send_result(p, 1, payload)
    frames = wait_continued(h, 1)
    assert continued_pairs(frames) == [(1, 0)]
    assert [f.corr for f in frames if f.type == MsgType.RESULT] == [1]  # forwarded as ever, before CONTINUED
    assert h.tasks_before_marker(c, 100) == []
    assert cont_counts(h, 43) == (0, 0, 1)


OK = {
    "ok true": pack({"id": "t1", "token": 1, "ok": True, "result": {"deep": [1, {"x": None}]}}),
    "last ok true": b"\x82\xa2ok\xc2\xa2ok\xc3",
    "str8 key": b"\x81\xd9\x02ok\xc3",
    "odd values skipped": b"\x83\xa1x\xd4\xff\x00\xa1y\xa1\xff\xa2ok\xc3",  # bad timestamp, bad UTF-8
}


@pytest.mark.parametrize("payload", list(OK.values()), ids=list(OK))
def test_result_payloads_that_release(h: Harness, payload: bytes) -> None:
    p, c = parent_with_child(h)
    send_result(p, 1, payload)
    assert continued_pairs(wait_continued(h, 1)) == [(1, 1)]
    assert c.recv_until(lambda f: f.type == MsgType.TASK, what="child").corr == 2


def test_a_result_from_another_endpoint_releases_nothing(h: Harness) -> None:
    p = h.agent("parent", 1)
    other = h.agent("parent", 1)
    c = h.agent("child", 5)
    hold(h, p, "parent", 1)
    h.continue_(1, "child", 2)
    h.result(other, 1)  # other does not hold dispatch 1
    h.coord.recv_until(_result_of(1), what="the forwarded RESULT")
    assert h.tasks_before_marker(c, 100) == []
    assert router_stats(h, 44)["continuations"] == 1
    assert not [f for f in h.coord.pending if _continued(f)]
    h.result(p, 1)  # the holder
    assert continued_pairs(wait_continued(h, 1)) == [(1, 1)]
    assert c.recv_until(lambda f: f.type == MsgType.TASK, what="child").corr == 2


def test_a_parent_whose_agent_disconnects_is_discarded(h: Harness) -> None:
    p = h.agent("parent", 2)
    hold(h, p, "parent", 1)
    hold(h, p, "parent", 7)  # held too, without continuations: EP_CLOSED names it, CONTINUED does not
    h.continue_(1, "child", 2)
    assert router_stats(h, 45)["continuations"] == 1
    ep = p.ep
    p.sock.close()
    frames = h.coord.drain_until(lambda f: f.type == MsgType.EP_CLOSED and f.source == ep, what="EP_CLOSED")
    assert continued_pairs(frames) == [(1, 0)]  # and before the EP_CLOSED naming the parent
    assert sorted(frames[-1].obj()) == [1, 7]
    c = h.agent("child", 5)
    assert h.tasks_before_marker(c, 100) == []
    assert router_stats(h, 46)["continuations"] == 0


def test_revoking_a_queued_parent_discards_its_continuations(h: Harness) -> None:
    h.push("idle", 1)  # nobody serves "idle": it stays queued
    h.continue_(1, "child", 2)
    h.continue_(1, "child", 3)
    h.coord.ctl(MsgType.CTL_REVOKE, protocol.CTL_REVOKE.pack(protocol.queue_id("idle"), 1), corr=60)
    assert h.coord.recv_until(reply_to(MsgType.CTL_REVOKE, 60), what="revoke reply").obj() == [1, 1]
    assert continued_pairs(wait_continued(h, 1)) == [(1, 0)]
    c = h.agent("child", 5)
    assert h.tasks_before_marker(c, 100) == []
    stats = router_stats(h, 47)
    assert (stats["continuations"], stats["continuations_discarded"]) == (0, 1)


def test_a_queued_parent_keeps_its_continuations_until_its_result(h: Harness) -> None:
    h.push("later", 1)
    h.continue_(1, "child", 2)
    p = h.agent("later", 1)  # the parent is dispatched now; its continuation stays with it
    assert p.recv_until(lambda f: f.type == MsgType.TASK, what="parent").corr == 1
    c = h.agent("child", 1)
    h.result(p, 1)
    assert continued_pairs(wait_continued(h, 1)) == [(1, 1)]
    assert c.recv_until(lambda f: f.type == MsgType.TASK, what="child").corr == 2


def test_an_unknown_parent_is_discarded_at_once(h: Harness) -> None:
    c = h.agent("child", 5)
    h.continue_(999, "child", 2)
    assert continued_pairs(wait_continued(h, 999)) == [(999, 0)]
    assert h.tasks_before_marker(c, 100) == []
    stats = router_stats(h, 48)
    assert (stats["continuations"], stats["continuations_discarded"]) == (0, 1)


def _warning_about(f: Frame, text: str) -> bool:
    return f.type == MsgType.ROUTER_LOG and f.obj()[0] == "warning" and text in f.obj()[1]


def test_malformed_continue_controls_are_refused_and_traffic_flows(h: Harness) -> None:
    p = h.agent("parent", 1)
    c = h.agent("child", 5)
    a = h.connect()
    hold(h, p, "parent", 1)
    h.continue_(1, "child", 2)  # a good one first: a refusal for the same parent discards it too
    good = task_frame("child", 3)
    direct = coord_frame(MsgType.DIRECT, destination=a.ep, corr=4, payload=b"not a task")
    bad = {
        "truncated": good[:-3],
        "trailing bytes": good + b"\0",
        "not a task": direct,
        "bad magic": b"\0" * len(good),
        "too large": too_large_header(MsgType.TASK, 3, MAX_PAYLOAD + 1),
        "crc mismatch": bytearray(frame(MsgType.TASK, flags=wire.F_CRC, corr=3, payload=b"x" * 8)),
    }
    bad["crc mismatch"][-1] ^= 1
    for i, (name, embedded) in enumerate(bad.items()):
        h.coord.ctl(MsgType.CTL_CONTINUE, protocol.CTL_CONTINUE_PARENT.pack(1) + bytes(embedded))
        frames = wait_continued(h, 1)
        assert continued_pairs(frames) == [(1, 0)], name
        assert any(_warning_about(f, "CTL_CONTINUE") for f in frames + h.coord.pending) or h.coord.recv_until(
            lambda f: _warning_about(f, "CTL_CONTINUE"), what=f"warning for {name}")
        assert a.ping(200 + i).payload == b"barrier"
    h.coord.ctl(MsgType.CTL_CONTINUE, b"\1\2\3")  # not even a parent id: a warning, nothing else
    h.coord.recv_until(lambda f: _warning_about(f, "CTL_CONTINUE"), what="warning for a short payload")
    assert h.coord.alive() and a.ping(300).payload == b"barrier"
    h.result(p, 1)
    assert h.tasks_before_marker(c, 100) == []  # the good continuation went with the first refusal
    assert cont_counts(h, 49) == (0, 0, len(bad))
    assert not [f for f in h.coord.pending if _continued(f)]


def test_continue_controls_count_as_control_in_by_pattern(h: Harness) -> None:
    payload = protocol.ctl_continue_payload(5, task_frame("child", 6))
    h.coord.ctl(MsgType.CTL_CONTINUE, payload)  # unknown parent: discarded, but taken in all the same
    wait_continued(h, 5)
    stats = router_stats(h, 50)
    size = wire.HEADER_SIZE + len(payload)
    assert stats["by_pattern"] == {"control": {"normal": [2, size + wire.HEADER_SIZE]}}  # and the CTL_STATS
    assert (stats["continuations"], stats["continued"], stats["continuations_discarded"]) == (0, 0, 1)


def test_shutdown_drops_pending_continuations_without_a_report(h: Harness) -> None:
    p = h.agent("parent", 1)
    hold(h, p, "parent", 1)
    h.continue_(1, "child", 2)
    assert router_stats(h, 51)["continuations"] == 1
    h.coord.ctl(MsgType.CTL_SHUTDOWN)
    p.wait_eof()
    h.coord.wait_gone(10.0)
    assert not [f for f in h.coord.pending if _continued(f)], h.coord.pending
