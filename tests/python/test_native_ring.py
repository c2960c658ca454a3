"""Shared-memory rings through the Python binding, with real peer processes (tests/python/ring_peer.py)."""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton import errors, native
from conftest import child_env

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason=native.LOAD_ERROR)

PEER = str(Path(__file__).with_name("ring_peer.py"))
sys.path.insert(0, str(Path(__file__).parent))
from ring_peer import check_record, record  # noqa: E402

RING_MAGIC_OFFSET = 0
RING_VERSION_OFFSET = 8
RING_CAPACITY_OFFSET = 16


class Peer:
    """A ring_peer.py process that has connected to our socket and been handed the ring's memfd."""

    def __init__(self, mode: str, path: str, ring: native.Ring, count: int = 0) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        self.proc = subprocess.Popen(
            [sys.executable, PEER, mode, path, str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        listener.settimeout(30)
        self.conn, _ = listener.accept()
        listener.close()
        native.send_fds(self.conn.fileno(), b"ring", [ring.fd])

    def result(self, timeout: float = 60) -> dict[str, int]:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"peer failed ({self.proc.returncode}): {err.decode()}"
        return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for p in started:
        p.close()


def test_two_processes_exchange_every_record_intact(sock_path: str, peers: list[Peer]) -> None:
    count = 50_000
    with native.Ring.create(1 << 16, native.PRODUCER) as ring:  # ~6.6 MB through 64 KiB: ~100 laps, PAD records
        peer = Peer("consume", sock_path, ring, count)
        peers.append(peer)
        seq = 0
        while seq < count:
            try:
                ring.write(record(seq))
                seq += 1
            except errors.RingFull:
                pass
        assert peer.result() == {"consumed": count}


def test_writer_killed_mid_stream_leaves_only_whole_records(sock_path: str, peers: list[Peer]) -> None:
    with native.Ring.create(1 << 20, native.CONSUMER) as ring:
        ring.set_spin(0)
        peer = Peer("produce", sock_path, ring, -1)
        peers.append(peer)
        assert peer.conn.recv(1) == b"R"
        seen = 0
        while seen < 20_000:
            for data in ring.read_batch(timeout=10.0):
                check_record(data, seen)
                seen += 1
        os.kill(peer.proc.pid, signal.SIGKILL)
        peer.proc.wait(timeout=10)
        # Everything the producer committed before it died is whole and in order; then the ring says the
        # producer is gone instead of hanging.
        with pytest.raises(errors.PeerClosed):
            while True:
                batch = ring.read_batch(timeout=10.0)
                assert batch, "read timed out instead of reporting the dead producer"
                for data in batch:
                    check_record(data, seen)
                    seen += 1
        assert seen >= 20_000


def test_clean_close_drains_then_reports_peer_closed(sock_path: str, peers: list[Peer]) -> None:
    with native.Ring.create(1 << 20, native.CONSUMER) as ring:
        peer = Peer("produce", sock_path, ring, 1000)
        peers.append(peer)
        assert peer.result() == {"produced": 1000}
        got = []
        with pytest.raises(errors.PeerClosed):
            while True:
                got.extend(ring.read_batch(timeout=10.0))
        assert len(got) == 1000
        for i, data in enumerate(got):
            check_record(data, i)


def test_full_ring_fails_fast_and_recovers() -> None:
    with native.Ring.create(4096, native.PRODUCER) as prod, native.Ring.attach(prod.fd, native.CONSUMER) as cons:
        written = 0
        with pytest.raises(errors.RingFull) as info:
            while True:
                prod.write(b"x" * 100)
                written += 1
        assert isinstance(info.value, BlockingIOError)
        assert 0 < written < 4096 // 100
        assert prod.stats()["full_events"] == 1
        # Two records, not one: the next record would cross the end, so it also needs room for a PAD record.
        assert len(cons.read_batch(max_n=2)) == 2
        prod.write(b"y" * 100)  # room again once the consumer released space
        rest = cons.read_batch(max_n=1000)
        assert len(rest) == written - 1 and rest[-1] == b"y" * 100


def test_oversized_record_is_rejected_and_ring_stays_usable() -> None:
    with native.Ring.create(4096, native.PRODUCER) as prod, native.Ring.attach(prod.fd, native.CONSUMER) as cons:
        too_big = prod.stats()["max_record"] + 1
        with pytest.raises(errors.FrameTooLarge):
            prod.write(b"z" * too_big)
        prod.write(b"ok")
        assert cons.read_batch() == [b"ok"]


def test_batch_write_and_read_keep_order_and_boundaries() -> None:
    payloads = [bytes([i]) * (i * 7 % 300) for i in range(200)]
    with native.Ring.create(1 << 16, native.PRODUCER) as prod, native.Ring.attach(prod.fd, native.CONSUMER) as cons:
        assert prod.write_batch(payloads) == 200
        got: list[bytes] = []
        while len(got) < 200:
            got.extend(cons.read_batch(max_n=64))
        assert got == payloads


def _patch_segment(fd: int, offset: int, fmt: str, value: int) -> None:
    with mmap.mmap(fd, 4096) as m:
        struct.pack_into(fmt, m, offset, value)


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "error"),
    [
        (RING_MAGIC_OFFSET, "<Q", 0xDEADBEEF, errors.CorruptSegment),
        (RING_VERSION_OFFSET, "<I", 99, errors.UnsupportedVersion),
        (RING_CAPACITY_OFFSET, "<Q", 12345, errors.CorruptSegment),
        (RING_CAPACITY_OFFSET, "<Q", 1 << 40, errors.CorruptSegment),
    ],
)
def test_corrupt_segment_header_is_refused_with_a_clear_error(offset: int, fmt: str, value: int, error: type) -> None:
    with native.Ring.create(4096, native.PRODUCER) as prod:
        _patch_segment(prod.fd, offset, fmt, value)
        with pytest.raises(error) as info:
            native.Ring.attach(prod.fd, native.CONSUMER)
        assert "ring attach" in str(info.value)


def test_corrupt_record_length_is_reported_not_crashing() -> None:
    with native.Ring.create(4096, native.PRODUCER) as prod, native.Ring.attach(prod.fd, native.CONSUMER) as cons:
        prod.write(b"fine")
        assert cons.read_batch() == [b"fine"]
        prod.write(b"evil")
        # A hostile producer rewrites the committed size word of the second record to point far past the end.
        _patch_segment(prod.fd, 512 + 16, "<I", 0x7FFFFFF0)
        with pytest.raises(errors.CorruptSegment):
            cons.read_batch()


def test_unsealed_segment_is_refused() -> None:
    fd = os.memfd_create("bt-unsealed", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 512 + 4096)
        with pytest.raises(errors.SegmentNotSealed):
            native.Ring.attach(fd, native.CONSUMER)
    finally:
        os.close(fd)


def test_fd_passing_and_peer_credentials(sock_path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    proc = subprocess.Popen([sys.executable, PEER, "pass-pipe", sock_path], env=child_env())
    try:
        listener.settimeout(30)
        conn, _ = listener.accept()
        pid, uid, gid = native.peercred(conn.fileno())
        assert (pid, uid, gid) == (proc.pid, os.getuid(), os.getgid())
        r, w = os.pipe()
        native.send_fds(conn.fileno(), b"hello", [w])
        os.close(w)  # the child now holds the only other copy
        chunks = []
        while chunk := os.read(r, 100):  # EOF once the child closed its copy
            chunks.append(chunk)
        os.close(r)
        assert b"".join(chunks) == f"{proc.pid}:hello".encode()
        assert proc.wait(timeout=30) == 0
        conn.close()
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()


def test_exchange_writes_then_reads_in_one_call() -> None:
    with (
        native.Ring.create(4096, native.PRODUCER) as req_p,
        native.Ring.attach(req_p.fd, native.CONSUMER) as req_c,
        native.Ring.create(4096, native.PRODUCER) as rsp_p,
        native.Ring.attach(rsp_p.fd, native.CONSUMER) as rsp_c,
    ):
        assert rsp_c.exchange(req_p, b"ask", timeout=0.001) == 0  # no answer yet: written, then timed out
        assert req_c.read_batch() == [b"ask"]
        rsp_p.write(b"answer")
        assert rsp_c.exchange(req_p, b"ask again") == 1
        assert bytes(rsp_c.buffer[: rsp_c.lengths[0]]) == b"answer"
        assert req_c.read_batch() == [b"ask again"]
        with pytest.raises(errors.FrameTooLarge):
            rsp_c.exchange(req_p, b"x" * 4096)
