"""Pure-Python frame codec: the byte-for-byte twin of the C codec in src/c/frame.c.

The layout (48-byte little-endian header, then the payload) is documented once, in include/baton.h; this
module follows it exactly and raises the same baton.errors classes as the native binding, in the same check
order, so a caller cannot tell which codec served it.  tests/python/test_wire.py proves the twins agree.

It exists for PYTHON_ONLY mode (no native library) and for tools; where libbaton is loaded, the router uses
the C codec.  ``crc32c`` here is a table-driven byte loop: correct, but roughly a thousand times slower than
the SSE4.2 path in C, so frames with ``F_CRC`` cost noticeably more through this module.
"""

from __future__ import annotations

import errno
import struct
from enum import IntEnum
from typing import Final

from baton.errors import (
    BadMagic,
    CrcMismatch,
    FieldOutOfRange,
    FrameError,
    FrameTooLarge,
    InvalidArgument,
    Truncated,
    UnsupportedVersion,
)

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "MAX_PAYLOAD_DEFAULT",
    "MAX_PAYLOAD_LIMIT",
    "F_CRC",
    "F_REPLY",
    "F_ERROR",
    "F_KNOWN",
    "Priority",
    "FrameHeader",
    "FrameStream",
    "crc32c",
    "encode",
    "decode",
]

MAGIC: Final = 0x314E5442  # b"BTN1" read as a little-endian u32
VERSION: Final = 1
HEADER_SIZE: Final = 48
MAX_PAYLOAD_DEFAULT: Final = 16 * 1024 * 1024
MAX_PAYLOAD_LIMIT: Final = 1 << 30

F_CRC: Final = 0x01  # crc32c field is valid and checked on decode
F_REPLY: Final = 0x02  # this frame answers correlation_id
F_ERROR: Final = 0x04  # the payload is an error {code, message}
F_KNOWN: Final = F_CRC | F_REPLY | F_ERROR


class Priority(IntEnum):
    """Frame priority; it picks the transport (DESIGN.md section 2)."""

    CRITICAL = 0  # shared-memory ring
    HIGH = 1  # socket plane
    NORMAL = 2  # unix socket
    LOW = 3  # durable spool
    BATCH = 4  # large payload by reference


_PRIORITIES: Final = tuple(Priority)
_PRIO_COUNT: Final = len(_PRIORITIES)

# magic, version, type, priority, flags, payload_len, crc32c, source, destination, correlation_id, send_ts_ns
_HDR: Final = struct.Struct("<IBBBBIIQQQQ")
assert _HDR.size == HEADER_SIZE
_CRC_OFF: Final = 12
_U8: Final = 0xFF
_U64: Final = (1 << 64) - 1


def _make_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return tuple(table)


_CRC_TABLE: Final = _make_table()
_ZERO4: Final = b"\x00\x00\x00\x00"


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of data, continuing from crc (start with 0): same convention as bt_crc32c.

    Pure Python, one table lookup per byte: slow (tens of ns per byte).  Prefer ``baton.native.crc32c``
    when the native library is loaded and speed matters.
    """
    table = _CRC_TABLE
    c = ~crc & 0xFFFFFFFF
    for b in memoryview(data).cast("B") if isinstance(data, memoryview) else data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return ~c & 0xFFFFFFFF


class FrameHeader:
    """One decoded frame header (host values, not the wire layout).

    ``payload_len`` and ``crc32c`` are filled by ``decode``; ``encode`` ignores them (it takes the length
    from the payload and computes the CRC itself when ``flags`` has ``F_CRC``).
    """

    __slots__ = (
        "type",
        "priority",
        "flags",
        "source",
        "destination",
        "correlation_id",
        "send_ts_ns",
        "payload_len",
        "crc32c",
    )

    def __init__(
        self,
        type: int = 0,
        priority: int = Priority.NORMAL,
        flags: int = 0,
        source: int = 0,
        destination: int = 0,
        correlation_id: int = 0,
        send_ts_ns: int = 0,
        payload_len: int = 0,
        crc32c: int = 0,
    ) -> None:
        self.type = type
        self.priority = priority
        self.flags = flags
        self.source = source
        self.destination = destination
        self.correlation_id = correlation_id
        self.send_ts_ns = send_ts_ns
        self.payload_len = payload_len
        self.crc32c = crc32c

    def _key(self) -> tuple[int, ...]:
        return (
            self.type,
            self.priority,
            self.flags,
            self.source,
            self.destination,
            self.correlation_id,
            self.send_ts_ns,
            self.payload_len,
            self.crc32c,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FrameHeader):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        try:
            prio = Priority(self.priority).name
        except ValueError:
            prio = str(self.priority)
        return (
            f"FrameHeader(type={self.type}, priority={prio}, flags={self.flags:#x}, source={self.source}, "
            f"destination={self.destination}, correlation_id={self.correlation_id}, "
            f"send_ts_ns={self.send_ts_ns}, payload_len={self.payload_len}, crc32c={self.crc32c:#010x})"
        )


def _field_error(header: FrameHeader) -> FieldOutOfRange:
    """Name the first header field that cannot be encoded (slow path, after struct.pack refused)."""
    for name, hi in (
        ("type", _U8),
        ("source", _U64),
        ("destination", _U64),
        ("correlation_id", _U64),
        ("send_ts_ns", _U64),
    ):
        value = getattr(header, name)
        if not isinstance(value, int) or not 0 <= value <= hi:
            return FieldOutOfRange(
                f"frame encode: header field {name}={value!r} is not an integer in [0, {hi}]; fix the caller",
                errno.ERANGE,
            )
    return FieldOutOfRange("frame encode: a header field is not an integer in range", errno.ERANGE)


def encode(header: FrameHeader, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """Encode one frame: the 48-byte header from ``header`` then ``payload``.

    Raises FrameTooLarge when the payload exceeds MAX_PAYLOAD_LIMIT and FieldOutOfRange for a priority
    outside Priority, unknown flag bits or a field that does not fit its wire width (C: -EMSGSIZE, -ERANGE,
    checked in that order).
    """
    plen = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
    if plen > MAX_PAYLOAD_LIMIT:
        raise FrameTooLarge(
            f"frame encode: payload of {plen} bytes exceeds the hard limit of {MAX_PAYLOAD_LIMIT}: "
            "pass it by reference (BATCH) instead",
            errno.EMSGSIZE,
        )
    prio = header.priority
    flags = header.flags
    if not isinstance(prio, int) or not 0 <= prio < _PRIO_COUNT:
        raise FieldOutOfRange(
            f"frame encode: priority {prio!r} is not one of {[p.name for p in Priority]}", errno.ERANGE
        )
    if not isinstance(flags, int) or not 0 <= flags <= _U8 or flags & ~F_KNOWN:
        raise FieldOutOfRange(
            f"frame encode: flags {flags!r} has bits outside F_CRC|F_REPLY|F_ERROR ({F_KNOWN:#x})", errno.ERANGE
        )
    try:
        head = _HDR.pack(
            MAGIC,
            VERSION,
            header.type,
            prio,
            flags,
            plen,
            0,
            header.source,
            header.destination,
            header.correlation_id,
            header.send_ts_ns,
        )
    except struct.error:
        raise _field_error(header) from None
    if flags & F_CRC:
        # The CRC covers the header with its crc32c field zero (as packed above), then the payload.
        c = crc32c(payload, crc32c(head))
        head = head[:_CRC_OFF] + c.to_bytes(4, "little") + head[_CRC_OFF + 4 :]
    return head + bytes(payload)


def _effective_max(max_payload: int) -> int:
    if max_payload < 0:
        raise InvalidArgument(f"max_payload must be >= 0 (0 means the default), got {max_payload}", errno.EINVAL)
    if max_payload == 0:
        return MAX_PAYLOAD_DEFAULT
    return max_payload if max_payload < MAX_PAYLOAD_LIMIT else MAX_PAYLOAD_LIMIT


def _parse(buf: bytes | bytearray | memoryview, off: int, avail: int, limit: int) -> tuple[FrameHeader, int]:
    """Validate the frame at buf[off:off+avail] in bt_frame_decode's order; return (header, frame size).

    Only Truncated means "more bytes could make this valid"; every other error is final for a stream.
    """
    if avail < HEADER_SIZE:
        raise Truncated(
            f"truncated frame: {avail} bytes, a header needs {HEADER_SIZE}; wait for more bytes", errno.ENODATA
        )
    magic, ver, typ, prio, flags, plen, crc, src, dst, corr, ts = _HDR.unpack_from(buf, off)
    if magic != MAGIC:
        raise BadMagic(
            f"bad magic {magic:#010x} (expected {MAGIC:#010x}, b'BTN1'): the peer does not speak baton's frame "
            "protocol; close the connection",
            errno.EBADMSG,
        )
    if ver != VERSION:
        raise UnsupportedVersion(
            f"frame version {ver} is not supported (this side speaks {VERSION}): upgrade the older side",
            errno.EPROTONOSUPPORT,
        )
    if prio >= _PRIO_COUNT:
        raise FieldOutOfRange(
            f"frame priority {prio} is out of range (0..{_PRIO_COUNT - 1}): the peer is broken or newer",
            errno.ERANGE,
        )
    if flags & ~F_KNOWN:
        raise FieldOutOfRange(
            f"frame flags {flags:#04x} set reserved bits (known: {F_KNOWN:#x}): the peer is broken or newer",
            errno.ERANGE,
        )
    if crc and not flags & F_CRC:
        # Encode never writes a CRC without F_CRC; accepting one would break "decode, re-encode, same bytes".
        raise FieldOutOfRange(
            f"frame crc32c field is {crc:#010x} but F_CRC is not set (it must be zero): the peer is broken",
            errno.ERANGE,
        )
    if plen > limit:
        raise FrameTooLarge(
            f"frame payload_len {plen} exceeds the maximum {limit}: split the payload or pass it by reference",
            errno.EMSGSIZE,
        )
    size = HEADER_SIZE + plen
    if avail < size:
        raise Truncated(
            f"truncated frame: {avail} of {size} bytes; wait for the rest of the payload", errno.ENODATA
        )
    if flags & F_CRC:
        c = crc32c(buf[off : off + _CRC_OFF])
        c = crc32c(_ZERO4, c)
        c = crc32c(buf[off + _CRC_OFF + 4 : off + size], c)
        if c != crc:
            raise CrcMismatch(
                f"frame CRC32C mismatch (header says {crc:#010x}, bytes give {c:#010x}): the frame was "
                "corrupted in transit; drop the connection",
                errno.EILSEQ,
            )
    return FrameHeader(typ, _PRIORITIES[prio], flags, src, dst, corr, ts, plen, crc), size


def decode(
    buf: bytes | bytearray | memoryview, max_payload: int = 0
) -> tuple[FrameHeader, memoryview, int]:
    """Validate and decode the frame at the start of buf.

    max_payload bounds payload_len (0 = MAX_PAYLOAD_DEFAULT, values above MAX_PAYLOAD_LIMIT are clamped).
    Returns (header, payload view into buf, frame size); bytes after the frame are ignored.  Raises, in this
    order of checks: Truncated (short header), BadMagic, UnsupportedVersion, FieldOutOfRange, FrameTooLarge,
    Truncated (short payload), CrcMismatch -- the same classes and order as the C codec.
    """
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    header, size = _parse(mv, 0, mv.nbytes, _effective_max(max_payload))
    return header, mv[HEADER_SIZE:size], size


class FrameStream:
    """Incremental reader: turns a byte stream (arbitrary chunks) into validated frames.

    ``feed`` returns every frame completed so far, in order, as (FrameHeader, payload bytes).  A bad frame
    cannot be skipped (the stream cannot be resynchronised), so the error is sticky: frames before it are
    still returned, ``error`` holds the exception, and every ``feed`` with no good frame left to hand out
    raises it (call ``feed(b"")`` to surface it); then close the connection.  Buffering never exceeds one
    frame (at most HEADER_SIZE + max_payload) plus the last chunk fed.
    """

    __slots__ = ("_buf", "_limit", "_error")

    def __init__(self, max_payload: int = 0) -> None:
        self._buf = bytearray()
        self._limit = _effective_max(max_payload)
        self._error: FrameError | None = None

    @property
    def error(self) -> FrameError | None:
        """The sticky stream error, or None while the stream is good."""
        return self._error

    @property
    def pending(self) -> int:
        """Bytes buffered that do not form a complete frame yet."""
        return len(self._buf)

    def _raise(self, err: FrameError) -> None:
        # A fresh instance per raise: re-raising one object would keep growing its traceback.
        raise type(err)(str(err), err.errno or 0)

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[FrameHeader, bytes]]:
        if self._error is not None:
            self._raise(self._error)
        buf = self._buf
        buf += data
        out: list[tuple[FrameHeader, bytes]] = []
        pos = 0
        end = len(buf)
        limit = self._limit
        while True:
            try:
                header, size = _parse(buf, pos, end - pos, limit)
            except Truncated:
                break
            except FrameError as err:
                self._error = err
                break
            out.append((header, bytes(buf[pos + HEADER_SIZE : pos + size])))
            pos += size
        if self._error is not None:
            buf.clear()  # nothing after a bad frame can be trusted
            if not out:
                self._raise(self._error)
        elif pos:
            del buf[:pos]
        return out
