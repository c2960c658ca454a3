"""The native router's process: ``python -m baton.router.native_child CONFIG_JSON``.

Started by ``NativeRouterLink`` with the listening socket, the coordinator's two ring segments and two
eventfds inherited (``pass_fds``); the JSON names their numbers and the router settings.  It runs
libbaton's loop (``native.Router.run``), which never enters Python per frame, and exits 0 after
CTL_SHUTDOWN, 3 when the coordinator went away, 1 on a startup error.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import sys

from baton import native

PR_SET_PDEATHSIG = 1
EXIT_COORDINATOR_GONE = 3


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL us when the daemon dies.  The check after prctl closes the race where the parent died first
    (we were then re-parented and would never get the signal).  The coordinator ring's liveness probe in
    the C loop is the second line of defence."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid and os.getppid() != parent_pid:
        raise SystemExit(EXIT_COORDINATOR_GONE)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m baton.router.native_child CONFIG_JSON", file=sys.stderr)
        return 1
    cfg = json.loads(argv[1])
    # Ctrl-C in a terminal reaches the whole process group: the daemon decides when the router stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(int(cfg.get("parent_pid", 0)))
    try:
        router = native.Router(
            listen_fd=cfg["listen_fd"],
            coord_in_ring_fd=cfg["coord_in_ring_fd"],
            coord_out_ring_fd=cfg["coord_out_ring_fd"],
            coord_in_bell=cfg["coord_in_bell"],
            coord_out_bell=cfg["coord_out_bell"],
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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
