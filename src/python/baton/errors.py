"""baton's exception classes and the one mapping from C's -errno returns to them.

Each class also inherits the builtin a Python caller would naturally catch (``RingFull`` is a
``BlockingIOError``, ``FrameTooLarge`` a ``ValueError``), so generic handlers keep working.  The pure-Python
twins (wire.py, the Python router) raise the same classes as the native layer: a caller never needs to know
which one served it.
"""

from __future__ import annotations

import errno as _errno
import os


class BatonError(Exception):
    """Base of every baton error.  ``errno`` is the C error number (0 when there is none), ``code`` a stable
    short name clients can match on."""

    code = "BATON_ERROR"
    errno: int | None  # as OSError declares it, so the classes that also inherit OSError agree

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


# --- frames ------------------------------------------------------------------------------------------------


class FrameError(BatonError, ValueError):
    """A frame failed validation; on a stream the connection cannot be resynchronised."""

    code = "BAD_FRAME"


class BadMagic(FrameError):
    code = "BAD_MAGIC"


class UnsupportedVersion(FrameError):
    code = "UNSUPPORTED_VERSION"


class FrameTooLarge(FrameError):
    code = "FRAME_TOO_LARGE"


class Truncated(FrameError):
    code = "TRUNCATED"


class CrcMismatch(FrameError):
    code = "CRC_MISMATCH"


class FieldOutOfRange(FrameError):
    code = "FIELD_OUT_OF_RANGE"


# --- rings and transports ----------------------------------------------------------------------------------


class RingFull(BatonError, BlockingIOError):
    """The ring has no room now; the producer never blocks, so retry later or take another path."""

    code = "RING_FULL"


class WouldBlock(BatonError, BlockingIOError):
    """Nothing to read (ring empty, socket drained)."""

    code = "WOULD_BLOCK"


class CorruptSegment(BatonError, ValueError):
    """A shared-memory segment's header, an index or a record length is impossible."""

    code = "CORRUPT_SEGMENT"


class SegmentNotSealed(BatonError, PermissionError):
    code = "SEGMENT_NOT_SEALED"


class PeerClosed(BatonError, BrokenPipeError):
    code = "PEER_CLOSED"


class BatonTimeout(BatonError, TimeoutError):
    code = "TIMEOUT"


class BufferTooSmall(BatonError, ValueError):
    code = "BUFFER_TOO_SMALL"


class Unsupported(BatonError, NotImplementedError):
    code = "UNSUPPORTED"


class InvalidArgument(BatonError, ValueError):
    code = "INVALID_ARGUMENT"


class NativeOSError(BatonError, OSError):
    """A system call inside libbaton failed; ``errno`` says which error."""

    code = "OS_ERROR"


# --- daemon configuration ----------------------------------------------------------------------------------


class ConfigError(BatonError, ValueError):
    """The daemon's configuration (file, BATON_* environment variables or flags) is invalid.  The message names
    the source and the setting of every problem and what is expected, so a person can fix it from the message
    alone; the daemon refuses to start rather than guess."""

    code = "CONFIG_ERROR"


# errno -> (class, message).  The frame codes are documented in include/baton.h; the ring codes too.
_BY_ERRNO: dict[int, tuple[type[BatonError], str]] = {
    _errno.EBADMSG: (BadMagic, "bad magic: the peer does not speak baton's frame protocol"),
    _errno.EPROTONOSUPPORT: (UnsupportedVersion, "unsupported version: upgrade the older side"),
    _errno.EMSGSIZE: (FrameTooLarge, "payload larger than the configured maximum: split it or pass it by reference"),
    _errno.ENODATA: (Truncated, "truncated frame: fewer bytes than the header announces"),
    _errno.EILSEQ: (CrcMismatch, "CRC32C mismatch: the frame was corrupted in transit"),
    _errno.ERANGE: (FieldOutOfRange,
                    "a header field is out of range (priority, reserved flag bits, or a CRC without the CRC flag)"),
    _errno.ENOSPC: (RingFull, "ring full: the consumer is behind; retry or fall back to the socket"),
    _errno.EAGAIN: (WouldBlock, "nothing to read yet"),
    _errno.EPROTO: (CorruptSegment, "corrupt shared-memory segment: detach and renegotiate the ring"),
    _errno.EPERM: (SegmentNotSealed, "segment is not sealed against shrinking: refusing to map it"),
    _errno.EPIPE: (PeerClosed, "the peer closed or died"),
    _errno.ETIMEDOUT: (BatonTimeout, "timed out"),
    _errno.ENOBUFS: (BufferTooSmall, "the buffer is too small for the next record: pass a larger one"),
    _errno.EOPNOTSUPP: (Unsupported, "not supported by this build or kernel"),
    _errno.ENOSYS: (Unsupported, "not supported by this kernel"),
    _errno.EINVAL: (InvalidArgument, "invalid argument"),
}


def error_from_errno(err: int, context: str = "") -> BatonError:
    """Build the exception for a positive errno, prefixed with what was being done."""
    cls, text = _BY_ERRNO.get(err, (NativeOSError, os.strerror(err)))
    return cls(f"{context}: {text}" if context else text, err)
