"""The native router's process, and how the daemon starts it early (docs/router.md, "The child process").

``spawn()`` starts ``python -I -S -c BOOT ...``: an isolated interpreter without ``site`` (no ``.pth`` imports,
no user site), whose ``sys.path`` is exactly the directory holding this ``baton`` package and the one holding
``_cffi_backend``.  The child imports only ``baton.native`` (cffi and libbaton), then blocks on a socketpair
for its orders.  The daemon calls ``spawn()`` first thing, so the child's interpreter start-up runs on the
other core while the daemon imports its own modules, loads its configuration and opens SQLite.

``NativeRouterLink.start`` later sends one message over the socketpair: the router settings as JSON, with the
listening socket, the coordinator's two ring memfds and their two eventfds attached (SCM_RIGHTS).  The child
opens libbaton's router on them and runs its loop (``native.Router.run``), which never enters Python per frame.
End of the socketpair without a message (the daemon chose the Python router, or did not start) exits 0.

Exit statuses: 0 after CTL_SHUTDOWN (or dismissed), 3 when the coordinator went away, 1 on a start-up error.
Only the standard library and ``baton.native`` may be imported here: the module runs without ``site``.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket
    import subprocess

PR_SET_PDEATHSIG = 1
EXIT_COORDINATOR_GONE = 3
# The descriptors of the orders message, in this order.
FD_NAMES = ("listen_fd", "coord_in_ring_fd", "coord_out_ring_fd", "coord_in_bell", "coord_out_bell")
_MAX_ORDERS = 64 * 1024

# argv: -c CTL_FD PARENT_PID PATH... (the paths go first on sys.path).
_BOOT = (
    "import sys; sys.path[:0] = sys.argv[3:]; "
    "from baton.router.native_child import main; sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))"
)


def _search_path() -> list[str]:
    """sys.path for the child: the directory holding this baton package (a source checkout works without
    installing), then the one holding cffi's ``_cffi_backend`` (found without importing it)."""
    import importlib.util

    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [here]
    try:
        spec = importlib.util.find_spec("_cffi_backend")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        d = os.path.dirname(spec.origin)
        if d not in paths:
            paths.append(d)
    return paths


class Spawned:
    """A router child waiting for its orders: ``handoff`` gives it the router's descriptors and settings,
    ``dismiss`` lets it go (it exits 0)."""

    def __init__(self, proc: subprocess.Popen[bytes], ctl: socket.socket) -> None:
        self.proc = proc
        self._ctl: socket.socket | None = ctl

    @property
    def pending(self) -> bool:
        return self._ctl is not None

    def handoff(self, settings: dict[str, Any], fds: dict[str, int]) -> None:
        """Send the orders; raises OSError (BrokenPipeError, ...) when the child is already gone."""
        import json
        import socket

        ctl = self._ctl
        if ctl is None:
            raise RuntimeError("the router child was already handed off or dismissed")
        self._ctl = None
        try:
            socket.send_fds(ctl, [json.dumps(settings).encode()], [fds[name] for name in FD_NAMES])
        finally:
            ctl.close()

    def dismiss(self) -> None:
        """Close the orders channel and reap the child (it exits at once when it sees the end)."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        try:
            self.proc.wait(5.0)
        except Exception:  # noqa: BLE001 - a child that does not exit at once is killed
            self.proc.kill()
            self.proc.wait()


def spawn(python: str | None = None) -> Spawned:
    """Start a router child that waits for its orders (see the module docstring)."""
    import socket
    import subprocess

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        # The daemon's -B carries over (-I ignores PYTHONDONTWRITEBYTECODE).
        flags = ["-I", "-S"] + (["-B"] if sys.flags.dont_write_bytecode else [])
        argv = [python or sys.executable, *flags, "-c", _BOOT, str(child.fileno()), str(os.getpid()), *_search_path()]
        proc = subprocess.Popen(argv, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return Spawned(proc, parent)


# --- the child ---------------------------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> Any:
    """SIGKILL us when the daemon dies.  The check after prctl closes the race where the parent died first
    (we were then re-parented and would never get the signal).  Until the orders come, the end of the
    socketpair also tells; afterwards the coordinator ring's liveness probe in the C loop is the second line
    of defence.  Returns libc (ctypes)."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid and os.getppid() != parent_pid:
        raise SystemExit(EXIT_COORDINATOR_GONE)
    return libc


def main(ctl_fd: int, parent_pid: int) -> int:
    import errno
    import json
    import signal
    import socket

    # Ctrl-C in a terminal reaches the whole process group: the daemon decides when the router stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc = _die_with_parent(parent_pid)
    from baton import native  # the work worth doing before the orders come

    with socket.socket(fileno=ctl_fd) as ctl:
        msg, fds, _flags, _addr = socket.recv_fds(ctl, _MAX_ORDERS, len(FD_NAMES))
    if not msg:
        return 0  # dismissed
    if len(fds) != len(FD_NAMES):
        print(f"baton router: cannot start: got {len(fds)} descriptors, expected {len(FD_NAMES)}", file=sys.stderr)
        return 1
    cfg = json.loads(msg)
    try:
        router = native.Router(
            **dict(zip(FD_NAMES, fds)),
            allowed_uid=cfg["allowed_uid"],
            allowed_gid=cfg["allowed_gid"],
            max_payload=cfg["max_payload"],
            generation=cfg["generation"],
            backend=cfg.get("backend", native.IO_AUTO),
            spin_ns=cfg.get("spin_ns", 50_000),
            out_limit=cfg.get("out_limit", 0),
        )
    except Exception as exc:  # noqa: BLE001 - reported to the daemon through the exit status and stderr
        print(f"baton router: cannot start: {exc}", file=sys.stderr)
        return 1
    # The child's only start-up garbage is what compiling its modules left (no bytecode): return it.
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
    try:
        rc = router.run()
    finally:
        router.close()
    if rc == 0:
        return 0
    if rc == -errno.EPIPE:
        return EXIT_COORDINATOR_GONE
    print(f"baton router: stopped with error {-rc} ({os.strerror(-rc)})", file=sys.stderr)
    return 1
