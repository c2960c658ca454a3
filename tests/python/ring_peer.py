"""A peer process for the ring tests: connects to a unix socket, receives a ring memfd (SCM_RIGHTS) and plays
one role.  Run as ``python ring_peer.py MODE SOCKET [COUNT]``; prints one JSON line with what it saw.

Records carry an 8-byte little-endian sequence number followed by (seq % 251) bytes of the value seq & 0xff,
so the other side can check every byte and the order.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

from baton import native

SEQ = struct.Struct("<Q")


def record(seq: int) -> bytes:
    return SEQ.pack(seq) + bytes([seq & 0xFF]) * (seq % 251)


def check_record(data: bytes, expect: int) -> None:
    if data != record(expect):
        raise SystemExit(f"record {expect} corrupt or out of order: got {len(data)} bytes {data[:16]!r}")


def receive_ring(path: str, role: int) -> tuple[socket.socket, native.Ring]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    _, fds = native.recv_fds(sock.fileno(), 16, 1)
    ring = native.Ring.attach(fds[0], role)
    os.close(fds[0])
    return sock, ring


def consume(path: str, count: int) -> None:
    sock, ring = receive_ring(path, native.CONSUMER)
    seen = 0
    while seen < count:
        for data in ring.read_batch(timeout=10.0):
            check_record(data, seen)
            seen += 1
    print(json.dumps({"consumed": seen}), flush=True)
    ring.close()
    sock.close()


def produce(path: str, count: int) -> None:
    """Write count records (count < 0: for ever), retrying while the ring is full."""
    sock, ring = receive_ring(path, native.PRODUCER)
    sock.sendall(b"R")  # ready: the test may start reading (or killing us)
    seq = 0
    while count < 0 or seq < count:
        try:
            ring.write(record(seq))
            seq += 1
        except native.BatonError as exc:
            if not isinstance(exc, BlockingIOError):
                raise
    print(json.dumps({"produced": seq}), flush=True)
    ring.close()
    sock.close()


def pass_pipe(path: str) -> None:
    """Receive the write end of a pipe and write our pid through it: proves the descriptor arrived."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    data, fds = native.recv_fds(sock.fileno(), 16, 4)
    os.write(fds[0], f"{os.getpid()}:{data.decode()}".encode())
    for fd in fds:
        os.close(fd)
    sock.close()


if __name__ == "__main__":
    mode, sock_path = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    {"consume": lambda: consume(sock_path, n), "produce": lambda: produce(sock_path, n), "pass-pipe": lambda: pass_pipe(sock_path)}[mode]()
