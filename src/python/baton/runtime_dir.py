"""The daemon's runtime directory: a private directory for the socket, and one daemon per socket.

Order at start-up: ``prepare_socket_dir`` -> ``acquire_instance_lock`` -> ``remove_stale_socket`` -> bind.
The lock, not the socket file, decides whether a daemon is running: a socket file can outlive a crashed
daemon, while a ``flock`` is released by the kernel when its holder dies, however it dies.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from baton.errors import BatonError

__all__ = [
    "AlreadyRunning",
    "UnsafeSocketDir",
    "InstanceLock",
    "prepare_socket_dir",
    "acquire_instance_lock",
    "remove_stale_socket",
]

_CHANGE_SOCKET = "choose another socket with --socket/BATON_SOCKET"


class AlreadyRunning(BatonError, BlockingIOError):
    """Another live process holds the instance lock of this socket."""

    code = "ALREADY_RUNNING"

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class UnsafeSocketDir(BatonError, PermissionError):
    """The socket's directory (or the file at the socket's path) is not safe or not ours to use."""

    code = "UNSAFE_SOCKET_DIR"


def prepare_socket_dir(socket_path: Path) -> Path:
    """Create the directory that will hold ``socket_path`` (mode 0700) and return it.

    An existing directory is accepted only if it is a real directory (not a symlink), owned by us and not
    accessible to group or others: the socket's own mode is not enough on its own, and under /tmp another
    user could have created the directory first to watch or replace our socket.  It is refused, not repaired:
    a directory someone else prepared is not ours to chmod.
    """
    directory = Path(socket_path).parent
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(directory, 0o700)
        # mkdir's mode is filtered by the umask; set it exactly (the check below still guards the race where
        # another process replaced the directory in between).
        os.chmod(directory, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocketDir(
            f"socket directory {directory} is not a directory (a symlink or a file): remove it or {_CHANGE_SOCKET}"
        )
    if st.st_uid != os.getuid():
        raise UnsafeSocketDir(
            f"socket directory {directory} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()}): "
            f"someone else created it; {_CHANGE_SOCKET}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise UnsafeSocketDir(
            f"socket directory {directory} has mode {mode:04o}, which lets group or others in; it must be 0700: "
            f"run `chmod 700 {directory}` or {_CHANGE_SOCKET}"
        )
    return directory


class InstanceLock:
    """An exclusive ``flock`` on ``<socket>.lock``, held while the daemon serves the socket.

    Release with ``close()`` or a ``with`` block; the kernel also releases it when the process dies.  The lock
    file is never unlinked: a process that opened it just before the unlink would lock the orphaned inode
    while a third locked a new file, and two daemons would both believe they own the socket.
    """

    __slots__ = ("socket_path", "path", "_fd")

    def __init__(self, socket_path: Path, path: Path, fd: int) -> None:
        self.socket_path = socket_path
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor of the open file releases the flock

    def __enter__(self) -> InstanceLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:  # leak guard only; owners call close()
        self.close()


def _lock_path(socket_path: Path) -> Path:
    return socket_path.with_name(socket_path.name + ".lock")


def acquire_instance_lock(socket_path: Path) -> InstanceLock:
    """Take the instance lock of ``socket_path`` without waiting and write our pid into it.

    Raises ``AlreadyRunning`` (naming the holder's pid when it has written it) if another open file holds it.
    Call ``prepare_socket_dir`` first: the lock file lives next to the socket, in the private directory.
    """
    socket_path = Path(socket_path)
    path = _lock_path(socket_path)
    # O_CLOEXEC: a child the daemon spawns (the router) must not inherit the lock and keep it after the daemon
    # dies.  O_NOFOLLOW: never follow a symlink planted in place of the lock file.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        # The holder writes its pid just after locking; a reader in between sees an empty file.
        who = f"pid {pid}" if pid is not None else "pid not yet written"
        stop = f"stop it with `kill {pid}`" if pid is not None else f"stop it (see {path})"
        raise AlreadyRunning(
            f"another baton daemon is already serving {socket_path} ({who}); {stop} or {_CHANGE_SOCKET}", pid
        ) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return InstanceLock(socket_path, path, fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii").strip())
    except (OSError, ValueError):
        return None


def remove_stale_socket(socket_path: Path, lock: InstanceLock) -> bool:
    """Remove a socket file a dead daemon left at ``socket_path``; True if one was removed.

    Takes the lock as proof: only the lock's holder may decide the file is stale (without it, a second daemon
    would delete the socket of a live one).  A path that exists but is not a socket is refused, never deleted.
    """
    socket_path = Path(socket_path)
    if not lock.held or lock.socket_path != socket_path:
        raise ValueError(f"remove_stale_socket({socket_path}) needs the held instance lock of that socket")
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafeSocketDir(
            f"{socket_path} exists and is not a socket: refusing to delete it; move it away or {_CHANGE_SOCKET}"
        )
    socket_path.unlink(missing_ok=True)
    return True
