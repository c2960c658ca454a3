"""Unix sockets, the frame reader and the I/O engine through the Python binding."""

from __future__ import annotations

import os
import socket

import pytest

from baton import errors, native, wire
from conftest import wait_for

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.LOAD_ERROR)


def frame(n: int, payload: bytes = b"") -> bytes:
    return wire.encode(wire.FrameHeader(1, wire.Priority.NORMAL, 0, n, 2, n, 0), payload)


def test_listen_connect_accept_and_in_use(sock_path: str) -> None:
    lfd = native.listen(sock_path)
    try:
        assert native.accept(lfd) is None  # nothing pending: None, not an exception
        cfd = native.connect(sock_path)
        sfd = wait_for(lambda: native.accept(lfd), what="the connection to be accepted")
        native.send_all(cfd, b"hello")
        assert wait_for(lambda: _recv(sfd), what="bytes") == b"hello"
        assert native.peercred(sfd)[0] == os.getpid()
        with pytest.raises(errors.NativeOSError) as info:
            native.listen(sock_path)
        assert info.value.errno == 98  # EADDRINUSE: the daemon decides whether the path is stale
        os.close(cfd)
        os.close(sfd)
    finally:
        os.close(lfd)


def _recv(fd: int) -> bytes | None:
    try:
        return os.read(fd, 100)
    except BlockingIOError:
        return None


def test_frame_reader_reassembles_frames_split_anywhere() -> None:
    frames = [frame(i, bytes([i]) * (i * 37)) for i in range(50)]
    stream = b"".join(frames)
    with native.FrameReader() as rd:
        got: list[bytes] = []
        for i in range(0, len(stream), 7):
            rd.feed(stream[i : i + 7])
            got.extend(rd.drain())
        assert got == frames


def test_frame_reader_grows_for_a_large_frame_over_a_socket() -> None:
    big = frame(1, os.urandom(3 << 20))  # larger than the reader's first buffer
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    with native.FrameReader(max_payload=4 << 20) as rd:
        got: list[bytes] = []
        sent = 0
        while not got:
            if sent < len(big):
                try:
                    sent += a.send(big[sent : sent + (1 << 16)])
                except BlockingIOError:
                    pass
            rd.fill(b.fileno())
            got = rd.drain()
        assert got == [big]
    a.close()
    b.close()


def test_frame_reader_stream_errors_are_sticky() -> None:
    with native.FrameReader(max_payload=1024) as rd:
        rd.feed(frame(1, b"ok"))
        assert len(rd.drain()) == 1
        rd.feed(frame(2, b"x" * 2000)[:100])  # its header announces more than max_payload: give up at once
        for _ in range(2):
            with pytest.raises(errors.FrameTooLarge):
                rd.drain()


def test_frame_reader_reports_end_of_stream() -> None:
    a, b = socket.socketpair()
    a.close()
    with native.FrameReader() as rd, pytest.raises(errors.PeerClosed):
        rd.fill(b.fileno())
    b.close()


def _engines() -> list[int]:
    return [native.IO_EPOLL, native.IO_URING]


@pytest.mark.parametrize("backend", _engines(), ids=["epoll", "io_uring"])
def test_io_engine_batched_sends_and_readable_events(backend: int) -> None:
    try:
        io = native.IoEngine(backend)
    except errors.Unsupported:
        pytest.skip("io_uring is not built into this libbaton")
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    with io:
        assert io.backend == backend
        io.watch(b.fileno(), 1000)
        frames = [frame(i, b"p" * i) for i in range(32)]
        for i, f in enumerate(frames):
            io.send(a.fileno(), f, i)
        sent: dict[int, int] = {}
        readable = 0
        received = b""
        while len(sent) < 32 or len(received) < sum(map(len, frames)):
            for tag, kind, result in io.wait(1000):
                if kind == native.EV_SENT:
                    sent[tag] = result
                elif kind == native.EV_READABLE:
                    assert tag == 1000
                    readable += 1
                    while True:  # arrival-style events: read until it would block
                        try:
                            received += b.recv(1 << 16)
                        except BlockingIOError:
                            break
        assert sent == {i: len(f) for i, f in enumerate(frames)}
        assert readable >= 1
        assert received == b"".join(frames)
        io.unwatch(b.fileno(), 1000)
        a.send(b"after")
        assert io.wait(50) == []  # unwatched: no event
    a.close()
    b.close()


@pytest.mark.parametrize("backend", _engines(), ids=["epoll", "io_uring"])
def test_io_engine_reports_send_to_closed_peer(backend: int) -> None:
    try:
        io = native.IoEngine(backend)
    except errors.Unsupported:
        pytest.skip("io_uring is not built into this libbaton")
    a, b = socket.socketpair()
    b.close()
    with io:
        io.send(a.fileno(), b"x", 7)
        events = wait_for(lambda: io.wait(100), what="the send completion")
        assert events == [(7, native.EV_SENT, -32)]  # -EPIPE, and no SIGPIPE killed us
    a.close()
