"""wire.py, the pure-Python frame codec, and its conformance with the C codec (through baton.native).

The golden frame below is the same literal as in tests/c/test_frame.c: both twins are pinned to one layout.
"""

from __future__ import annotations

import errno
import mmap
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton import errors, wire
from baton.wire import FrameHeader, FrameStream, Priority

try:
    from baton import native

    NATIVE = native.AVAILABLE
except ImportError:  # pragma: no cover - native.py itself missing
    native = None  # type: ignore[assignment]
    NATIVE = False

needs_native = pytest.mark.skipif(not NATIVE, reason="libbaton not built: pip install -e . --no-build-isolation")

GOLDEN = bytes.fromhex(
    "42544e31" "01070103" "03000000" "f2be1283"
    "0807060504030201" "1817161514131211" "2827262524232221" "3837363534333231"
    "686921"
)  # fmt: skip


def golden_header() -> FrameHeader:
    return FrameHeader(
        type=7,
        priority=Priority.HIGH,
        flags=wire.F_CRC | wire.F_REPLY,
        source=0x0102030405060708,
        destination=0x1112131415161718,
        correlation_id=0x2122232425262728,
        send_ts_ns=0x3132333435363738,
    )


def with_u32(buf: bytes, off: int, value: int) -> bytes:
    return buf[:off] + value.to_bytes(4, "little") + buf[off + 4 :]


def with_byte(buf: bytes, off: int, value: int) -> bytes:
    return buf[:off] + bytes([value]) + buf[off + 1 :]


# --- constants and CRC ------------------------------------------------------------------------------------


def test_constants() -> None:
    assert wire.MAGIC.to_bytes(4, "little") == b"BTN1"
    assert (wire.VERSION, wire.HEADER_SIZE) == (1, 48)
    assert wire.MAX_PAYLOAD_DEFAULT == 16 << 20 and wire.MAX_PAYLOAD_LIMIT == 1 << 30
    assert (wire.F_CRC, wire.F_REPLY, wire.F_ERROR) == (1, 2, 4)
    assert [int(p) for p in Priority] == [0, 1, 2, 3, 4]
    assert [p.name for p in Priority] == ["CRITICAL", "HIGH", "NORMAL", "LOW", "BATCH"]


@needs_native
def test_constants_match_native() -> None:
    lib = native.lib
    assert wire.MAGIC == lib.BT_FRAME_MAGIC
    assert wire.VERSION == lib.BT_FRAME_VERSION
    assert wire.HEADER_SIZE == lib.BT_FRAME_HEADER_SIZE
    assert wire.MAX_PAYLOAD_DEFAULT == lib.BT_FRAME_MAX_PAYLOAD_DEFAULT
    assert wire.MAX_PAYLOAD_LIMIT == lib.BT_FRAME_MAX_PAYLOAD_LIMIT
    assert (wire.F_CRC, wire.F_REPLY, wire.F_ERROR) == (lib.BT_FRAME_F_CRC, lib.BT_FRAME_F_REPLY, lib.BT_FRAME_F_ERROR)


def test_crc32c_vectors() -> None:
    assert wire.crc32c(b"123456789") == 0xE3069283
    assert wire.crc32c(bytes(32)) == 0x8A9136AA
    assert wire.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert wire.crc32c(bytes(range(32))) == 0x46DD794E
    assert wire.crc32c(b"") == 0
    assert wire.crc32c(b"56789", wire.crc32c(b"1234")) == 0xE3069283
    assert wire.crc32c(memoryview(b"123456789")) == 0xE3069283
    assert wire.crc32c(bytearray(b"123456789")) == 0xE3069283


# --- encode / decode --------------------------------------------------------------------------------------


def test_golden_frame() -> None:
    assert wire.encode(golden_header(), b"hi!") == GOLDEN
    header, payload, size = wire.decode(GOLDEN)
    assert size == len(GOLDEN) and bytes(payload) == b"hi!"
    expected = golden_header()
    expected.payload_len, expected.crc32c = 3, 0x8312BEF2
    assert header == expected
    assert header.priority is Priority.HIGH


def test_encode_ignores_len_and_crc_fields() -> None:
    h = golden_header()
    h.payload_len, h.crc32c = 999, 0xDEADBEEF
    assert wire.encode(h, b"hi!") == GOLDEN


def test_round_trip_without_crc_has_zero_crc_field() -> None:
    h = golden_header()
    h.flags = wire.F_REPLY
    data = wire.encode(h, b"hi!")
    assert data[12:16] == bytes(4)
    assert data[:7] + data[8:12] + data[16:] == GOLDEN[:7] + GOLDEN[8:12] + GOLDEN[16:]
    header, payload, size = wire.decode(data)
    assert (header.flags, header.crc32c, bytes(payload), size) == (wire.F_REPLY, 0, b"hi!", 51)


def test_empty_payload_and_trailing_bytes() -> None:
    data = wire.encode(FrameHeader(type=1, flags=wire.F_CRC), b"")
    assert len(data) == 48
    header, payload, size = wire.decode(data + b"next frame")
    assert (size, bytes(payload), header.payload_len) == (48, b"", 0)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    for buf in (bytearray(GOLDEN), memoryview(GOLDEN), memoryview(bytearray(GOLDEN))):
        header, payload, size = wire.decode(buf)
        assert size == 51 and bytes(payload) == b"hi!"
    # A payload view, not a copy: it sees the caller's buffer.
    ba = bytearray(GOLDEN)
    _, payload, _ = wire.decode(ba)
    assert payload.obj is ba


def test_header_eq_and_repr() -> None:
    assert golden_header() == golden_header()
    other = golden_header()
    other.source += 1
    assert golden_header() != other
    assert "HIGH" in repr(golden_header())
    assert not hasattr(golden_header(), "__dict__")


# --- errors -----------------------------------------------------------------------------------------------


def expect(exc_cls: type[errors.FrameError], err: int, buf: bytes, max_payload: int = 0) -> None:
    with pytest.raises(exc_cls) as info:
        wire.decode(buf, max_payload)
    assert type(info.value) is exc_cls
    assert info.value.errno == err
    assert isinstance(info.value, ValueError)
    assert str(info.value)


def test_decode_errors() -> None:
    expect(errors.Truncated, errno.ENODATA, b"")
    expect(errors.Truncated, errno.ENODATA, GOLDEN[:47])
    expect(errors.Truncated, errno.ENODATA, GOLDEN[:48])
    expect(errors.Truncated, errno.ENODATA, GOLDEN[:50])
    expect(errors.BadMagic, errno.EBADMSG, b"X" + GOLDEN[1:])
    expect(errors.UnsupportedVersion, errno.EPROTONOSUPPORT, with_byte(GOLDEN, 4, 2))
    expect(errors.UnsupportedVersion, errno.EPROTONOSUPPORT, with_byte(GOLDEN, 4, 0))
    expect(errors.FieldOutOfRange, errno.ERANGE, with_byte(GOLDEN, 6, 5))
    expect(errors.FieldOutOfRange, errno.ERANGE, with_byte(GOLDEN, 6, 255))
    for bit in range(3, 8):
        expect(errors.FieldOutOfRange, errno.ERANGE, with_byte(GOLDEN, 7, GOLDEN[7] | 1 << bit))
    # A crc32c field without F_CRC is not something encode can produce.
    expect(errors.FieldOutOfRange, errno.ERANGE, with_byte(GOLDEN, 7, wire.F_REPLY))
    expect(errors.FrameTooLarge, errno.EMSGSIZE, GOLDEN, max_payload=2)
    expect(errors.FrameTooLarge, errno.EMSGSIZE, with_u32(GOLDEN, 8, wire.MAX_PAYLOAD_DEFAULT + 1))
    expect(errors.FrameTooLarge, errno.EMSGSIZE, with_u32(GOLDEN, 8, wire.MAX_PAYLOAD_LIMIT + 1), 1 << 32)
    expect(errors.Truncated, errno.ENODATA, with_u32(GOLDEN, 8, wire.MAX_PAYLOAD_LIMIT), 1 << 32)
    expect(errors.CrcMismatch, errno.EILSEQ, with_byte(GOLDEN, 20, GOLDEN[20] ^ 1))  # header byte
    expect(errors.CrcMismatch, errno.EILSEQ, GOLDEN[:-1] + b"?")  # payload byte
    expect(errors.CrcMismatch, errno.EILSEQ, with_byte(GOLDEN, 6, Priority.BATCH))  # in-range priority
    assert wire.decode(GOLDEN, 3)[2] == 51
    with pytest.raises(errors.InvalidArgument):
        wire.decode(GOLDEN, -1)


def test_decode_check_order() -> None:
    bad = with_byte(b"\x00" + GOLDEN[1:], 4, 9)
    expect(errors.BadMagic, errno.EBADMSG, bad)
    expect(errors.UnsupportedVersion, errno.EPROTONOSUPPORT, with_byte(with_byte(GOLDEN, 4, 9), 6, 9))
    expect(errors.FieldOutOfRange, errno.ERANGE, with_u32(with_byte(GOLDEN, 6, 9), 8, 0xFFFFFFFF))
    expect(errors.FrameTooLarge, errno.EMSGSIZE, with_u32(GOLDEN, 8, 100), 50)
    expect(errors.Truncated, errno.ENODATA, with_byte(GOLDEN, 20, 0)[:-1])
    expect(errors.Truncated, errno.ENODATA, b"\x00" * 47)


def test_encode_errors() -> None:
    def bad(**kw: int) -> None:
        h = golden_header()
        for k, v in kw.items():
            setattr(h, k, v)
        with pytest.raises(errors.FieldOutOfRange) as info:
            wire.encode(h, b"x")
        assert info.value.errno == errno.ERANGE and str(info.value)

    bad(priority=5)
    bad(priority=-1)
    bad(flags=0x08)
    bad(flags=0x100)
    bad(type=256)
    bad(type=-1)
    bad(source=-1)
    bad(destination=1 << 64)
    bad(correlation_id=1 << 64)
    bad(send_ts_ns=-5)
    # Larger than the hard limit: an anonymous mapping is only reserved, never touched, so this costs nothing.
    with mmap.mmap(-1, wire.MAX_PAYLOAD_LIMIT + 1) as huge:
        with pytest.raises(errors.FrameTooLarge) as info:
            wire.encode(golden_header(), huge)  # type: ignore[arg-type]
        assert info.value.errno == errno.EMSGSIZE


# --- FrameStream ------------------------------------------------------------------------------------------


def some_frames(n: int, seed: int = 1) -> list[tuple[FrameHeader, bytes]]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        h = FrameHeader(
            type=rnd.randrange(256),
            priority=Priority(rnd.randrange(5)),
            flags=rnd.choice([0, wire.F_CRC, wire.F_REPLY | wire.F_CRC, wire.F_ERROR]),
            source=rnd.getrandbits(64),
            destination=rnd.getrandbits(64),
            correlation_id=i,
            send_ts_ns=rnd.getrandbits(64),
        )
        out.append((h, rnd.randbytes(rnd.choice([0, 1, 7, 64, 300]))))
    return out


def check_same(got: list[tuple[FrameHeader, bytes]], sent: list[tuple[FrameHeader, bytes]]) -> None:
    assert len(got) == len(sent)
    for (gh, gp), (sh, sp) in zip(got, sent):
        assert gp == sp
        assert (gh.type, gh.priority, gh.flags, gh.source, gh.destination, gh.correlation_id, gh.send_ts_ns) == (
            sh.type,
            sh.priority,
            sh.flags,
            sh.source,
            sh.destination,
            sh.correlation_id,
            sh.send_ts_ns,
        )
        assert gh.payload_len == len(sp)


def test_stream_byte_by_byte() -> None:
    sent = some_frames(12)
    data = b"".join(wire.encode(h, p) for h, p in sent)
    stream = FrameStream()
    got = []
    for i in range(len(data)):
        got += stream.feed(data[i : i + 1])
    check_same(got, sent)
    assert stream.pending == 0 and stream.error is None


def test_stream_random_chunks() -> None:
    sent = some_frames(40, seed=2)
    data = b"".join(wire.encode(h, p) for h, p in sent)
    rnd = random.Random(3)
    stream = FrameStream()
    got = []
    pos = 0
    while pos < len(data):
        n = rnd.randrange(0, 200)
        got += stream.feed(memoryview(data)[pos : pos + n])
        pos += n
    check_same(got, sent)
    assert stream.pending == 0


def test_stream_error_is_sticky_and_keeps_good_frames() -> None:
    sent = some_frames(3, seed=4)
    good = b"".join(wire.encode(h, p) for h, p in sent)
    stream = FrameStream()
    got = stream.feed(good + GOLDEN[:-1] + b"?" + GOLDEN)  # the 4th frame has a bad CRC
    check_same(got, sent)
    assert isinstance(stream.error, errors.CrcMismatch)
    for _ in range(2):
        with pytest.raises(errors.CrcMismatch):
            stream.feed(b"")
    with pytest.raises(errors.CrcMismatch):
        stream.feed(GOLDEN)  # a valid frame after the error is not accepted


def test_stream_rejects_oversize_before_payload_arrives() -> None:
    stream = FrameStream(max_payload=10)
    header = with_u32(GOLDEN, 8, 11)[:48]
    assert stream.feed(header[:47]) == []
    with pytest.raises(errors.FrameTooLarge):
        stream.feed(header[47:])
    assert stream.pending == 0


def test_stream_bad_magic_raises_at_once() -> None:
    stream = FrameStream()
    with pytest.raises(errors.BadMagic):
        stream.feed(b"GET / HTTP/1.1\r\n" + b"x" * 40)


# --- properties -------------------------------------------------------------------------------------------

u64 = st.integers(0, (1 << 64) - 1)
headers = st.builds(
    FrameHeader,
    type=st.integers(0, 255),
    priority=st.sampled_from(list(Priority)),
    flags=st.integers(0, 7),
    source=u64,
    destination=u64,
    correlation_id=u64,
    send_ts_ns=u64,
)
payloads = st.binary(max_size=300)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(headers, payloads)
def test_property_round_trip(h: FrameHeader, payload: bytes) -> None:
    data = wire.encode(h, payload)
    assert len(data) == 48 + len(payload)
    got, view, size = wire.decode(data + b"\x00trailing")
    assert size == len(data) and bytes(view) == payload
    h.payload_len = len(payload)
    h.crc32c = int.from_bytes(data[12:16], "little")
    assert got == h
    if not h.flags & wire.F_CRC:
        assert h.crc32c == 0
    assert wire.encode(got, view) == data


# --- conformance with the C codec -------------------------------------------------------------------------


def native_fields(h: FrameHeader) -> tuple[int, ...]:
    return (h.type, h.priority, h.flags, h.source, h.destination, h.correlation_id, h.send_ts_ns)


def outcome_c(buf: bytes, max_payload: int) -> tuple[object, ...]:
    try:
        return ("ok",) + tuple(native.frame_decode(buf, max_payload))
    except errors.BatonError as exc:
        return ("err", type(exc), exc.errno)


def outcome_py(buf: bytes, max_payload: int) -> tuple[object, ...]:
    try:
        h, _, size = wire.decode(buf, max_payload)
    except errors.BatonError as exc:
        return ("err", type(exc), exc.errno)
    return ("ok",) + native_fields(h) + (h.crc32c, h.payload_len, size)


@needs_native
@FAST
@given(headers, payloads)
def test_twins_same_bytes(h: FrameHeader, payload: bytes) -> None:
    py = wire.encode(h, payload)
    c = native.frame_encode(*native_fields(h), payload)
    assert c == py
    # Each accepts the other's bytes with the same result.
    assert outcome_c(py, 0) == outcome_py(c, 0)
    assert outcome_c(py, 0)[0] == "ok"
    assert native.frame_decode(py)[-1] == len(py)


@needs_native
@FAST
@given(headers, payloads, st.data())
def test_twins_same_verdict_on_corruption(h: FrameHeader, payload: bytes, data: st.DataObject) -> None:
    frame = bytearray(wire.encode(h, payload))
    kind = data.draw(st.sampled_from(["flip", "set", "truncate", "u32"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] ^= data.draw(st.integers(1, 255))
    elif kind == "set":
        i = data.draw(st.integers(0, 15))
        frame[i] = data.draw(st.integers(0, 255))
    elif kind == "u32":
        off = data.draw(st.sampled_from([0, 8, 12]))
        frame[off : off + 4] = data.draw(st.integers(0, 0xFFFFFFFF)).to_bytes(4, "little")
    else:
        del frame[data.draw(st.integers(0, len(frame) - 1)) :]
    max_payload = data.draw(st.sampled_from([0, 1, 16, 300, 1 << 31]))
    buf = bytes(frame)
    c, py = outcome_c(buf, max_payload), outcome_py(buf, max_payload)
    assert c == py


@needs_native
def test_twins_reject_the_same_headers_on_encode() -> None:
    for field, bad in (("priority", (5, 6, 255)), ("flags", (0x08, 0x10, 0x80, 0xFF))):
        for value in bad:
            h = golden_header()
            setattr(h, field, value)
            with pytest.raises(errors.FieldOutOfRange):
                wire.encode(h, b"")
            with pytest.raises(errors.FieldOutOfRange):
                native.frame_encode(*native_fields(h), b"")


@needs_native
def test_twins_golden_and_crc() -> None:
    assert native.frame_encode(*native_fields(golden_header()), b"hi!") == GOLDEN
    rnd = random.Random(5)
    for n in list(range(40)) + [255, 256, 1000]:
        blob = rnd.randbytes(n)
        seed = rnd.getrandbits(32)
        assert native.crc32c(blob, seed) == wire.crc32c(blob, seed)
