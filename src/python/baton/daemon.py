"""``baton serve``: the daemon process (docs/daemon.md).

Start-up, in order: the native router's child process (spawned before anything heavy is imported, so its
start-up overlaps ours; it gets its descriptors later) -> configuration -> JSON logs -> state directory and the
task store -> the socket's private directory -> the instance lock -> remove a stale socket -> bind and listen
(0600) -> the router (the native child takes the listening socket and its rings, or the Python router runs in
this loop) -> the coordinator -> READY=1 to ``$NOTIFY_SOCKET`` -> one GC collection, gc.freeze, malloc_trim.

Signals: SIGTERM/SIGINT drain (STOPPING=1; no new work; running tasks get up to drain_timeout_s; the rest go
back to ready without an attempt counted; the router shuts down; exit 0).  SIGHUP reloads the configuration
(log_level, wip_per_agent_type, lease_s and drain_timeout_s change live; other changes are logged as needing
a restart).  Execution modes, degradation to the Python router and recovery: baton/modes.py (docs/modes.md).

Exit statuses: 0 clean stop, 1 could not run (already running, unsafe socket directory, bind failure) or
stopped abnormally (the coordinator failed, the Python router died), 2 bad configuration or usage.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # imported where used: main() starts the router child before any of these loads
    import asyncio
    import socket

    from baton.daemon_config import DaemonConfig
    from baton.router import RouterLink
    from baton.router.native_child import Spawned
    from baton.scheduler import Scheduler

__all__ = ["serve", "main", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

log = logging.getLogger("baton.daemon")

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1  # could not run, or stopped abnormally (already running, the coordinator failed)
EXIT_USAGE: Final = 2  # bad configuration or command line

# Settings a SIGHUP applies at once; any other change is reported as needing a restart.
LIVE_SETTINGS: Final = ("log_level", "wip_per_agent_type", "lease_s", "drain_timeout_s")
_LISTEN_BACKLOG: Final = 512


class StartupError(Exception):
    """A reason not to start, with the exit status to use; the message is for people."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def serve(config_path: str | None, overrides: Mapping[str, object], *, router_child: Spawned | None = None) -> int:
    """Run the daemon until it is stopped; returns the process exit status.

    ``overrides`` are the ``baton serve`` flags keyed by setting name (daemon_config.FLAG_NAMES; None means
    "not given").  ``router_child`` is a native router child already started (``main`` starts it before its
    imports); without one, serve starts it here, before loading the configuration, unless the flag or
    ``BATON_ROUTER`` asks for the Python router.
    """
    # No cyclic GC while start-up imports and builds what lives as long as the daemon: one collection after
    # READY (then gc.freeze) does the work the import-time collections would have repeated.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    if router_child is None:
        router_child = _spawn_router_child(overrides.get("router"), os.environ)
    try:
        from baton.daemon_config import ConfigError, load_config
        from baton.jsonlog import configure_logging

        env = os.environ
        path = Path(config_path) if config_path else None
        try:
            config = load_config(path, env, dict(overrides))
        except ConfigError as exc:
            print(f"baton serve: {exc}", file=sys.stderr)
            return EXIT_USAGE
        configure_logging(config.log_level)
        import uvloop

        daemon = _Daemon(config, path, dict(overrides), router_child)
        router_child = None  # the daemon owns it now
        try:
            return uvloop.run(daemon.run())
        except StartupError as exc:
            print(f"baton serve: {exc}", file=sys.stderr)
            log.error("%s", exc)
            return exc.status
        except KeyboardInterrupt:  # a second Ctrl-C before the handlers were installed
            return EXIT_FAILURE
        finally:
            daemon.dismiss_router_child()
    finally:
        if router_child is not None:
            router_child.dismiss()
        if gc_was_enabled:
            gc.enable()


def _spawn_router_child(flag: object, env: Mapping[str, str]) -> Spawned | None:
    """Start the native router's child now, so that its interpreter start-up overlaps ours (docs/daemon.md,
    "Start-up time").  The router setting is not known yet (the TOML file is read later): the flag and
    ``BATON_ROUTER`` are enough to skip it for the Python router; a file that says ``python`` dismisses it."""
    choice = flag if flag is not None else (env.get("BATON_ROUTER") or None)
    if isinstance(choice, str) and choice.strip().lower() == "python":
        return None
    try:
        from baton.router import native_child

        return native_child.spawn()
    except Exception:  # noqa: BLE001 - NativeRouterLink.start tries again and reports why
        return None


def _trim_malloc() -> None:
    """Give the C heap's free pages back to the kernel once start-up is over (glibc malloc_trim).  Without
    bytecode, compiling baton's modules leaves ~2 MB of freed heap behind; with it the call is about neutral
    (bench/RESULTS.md)."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag VALUE`` or ``flag=VALUE`` in argv (the last one wins, like argparse), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


def _bind(path: Path) -> socket.socket:
    """Listen on ``path`` with mode 0600 from the first moment (umask around bind, not chmod after it)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(_LISTEN_BACKLOG)
    return sock


def _open_scheduler(cfg: DaemonConfig) -> Scheduler:
    """The daemon's scheduler over its task store (the state and database directories made 0700 if new)."""
    from baton.scheduler import Scheduler, SchedulerConfig
    from baton.store import TaskStore

    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cfg.db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # NORMAL in WAL mode: a commit is in the WAL before COMMIT returns, so a killed daemon loses nothing it
    # acknowledged; only a power loss can lose the last transactions (docs/scheduler.md).
    # exclusive: the daemon is the store's only user while it runs (clients go through it); a second daemon
    # on the same state directory is refused at once, and every transaction is cheaper (store.py).
    store = TaskStore(cfg.db_path, synchronous="NORMAL", exclusive=True)
    # The coordinator applies wip_per_agent_type (the per-type WIP limit) at start and on SIGHUP.
    return Scheduler(store, config=SchedulerConfig(lease_s=cfg.lease_s))


def _next_generation(state_dir: Path) -> int:
    """A per-start counter (high 32 bits of endpoint ids): ids are never reused across restarts."""
    p = state_dir / "router.generation"
    try:
        n = int(p.read_text().strip() or 0)
    except (OSError, ValueError):
        n = 0
    n = (n % 0xFFFF_FFFF) + 1
    tmp = p.with_suffix(".tmp")
    tmp.write_text(f"{n}\n")
    os.replace(tmp, p)
    return n


class _Daemon:
    def __init__(self, config: DaemonConfig, config_path: Path | None, overrides: dict[str, Any],
                 router_child: Spawned | None = None) -> None:
        self.config = config
        self.router_child = router_child
        self.config_path = config_path
        self.overrides = overrides
        self.stop_requested: asyncio.Event | None = None
        self.signals = 0
        self.coordinator: Any = None
        self.options: Any = None  # RouterOptions, once the socket is bound
        self._native_starts = 0  # native routers started with injected faults
        self._routers_started = 0
        from baton.modes import ModeController
        from baton.selftest import quick

        self.modes = ModeController(config, self._open_router, quick_selftest=quick,
                                    prepare_native=self._prepare_native)

    def dismiss_router_child(self) -> None:
        """Let an early router child go if nothing took it (Python router, or start-up stopped before)."""
        child, self.router_child = self.router_child, None
        if child is not None:
            child.dismiss()

    async def run(self) -> int:
        import asyncio

        from baton import runtime_dir
        from baton.coordinator import Coordinator
        from baton.metrics_http import MetricsServer
        from baton.router import RouterGone, RouterOptions
        from baton.sd_notify import notify

        cfg = self.config
        loop = asyncio.get_running_loop()
        self.stop_requested = asyncio.Event()
        # Signals first: a SIGTERM during start-up stops the daemon once it can drain, rather than killing it
        # half-started.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)

        try:
            runtime_dir.prepare_socket_dir(cfg.socket_path)
            lock = runtime_dir.acquire_instance_lock(cfg.socket_path)
        except (runtime_dir.AlreadyRunning, runtime_dir.UnsafeSocketDir) as exc:
            raise StartupError(str(exc), EXIT_FAILURE) from None
        except OSError as exc:
            raise StartupError(f"cannot prepare the socket directory of {cfg.socket_path}: {exc}") from None
        listener: socket.socket | None = None
        scheduler: Scheduler | None = None
        metrics = MetricsServer(self, cfg.metrics_host, cfg.metrics_port)
        try:
            try:
                await metrics.start()  # first: /health/live answers while the rest starts (ready says 503)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {exc.strerror or exc}; "
                    "choose another metrics_port (--metrics-port, BATON_METRICS_PORT) or stop what uses it"
                ) from None
            log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, metrics.port,
                     extra={"metrics_port": metrics.port})
            try:
                scheduler = _open_scheduler(cfg)
            except Exception as exc:
                raise StartupError(f"cannot open the task store {cfg.db_path}: {exc}") from None
            generation = _next_generation(cfg.state_dir)
            runtime_dir.remove_stale_socket(cfg.socket_path, lock)
            listener = _bind(cfg.socket_path)
            self.options = RouterOptions(
                listen_fd=listener.fileno(), allowed_uid=os.getuid(), allowed_gid=cfg.allowed_gid,
                max_payload=cfg.max_frame_bytes, generation=generation,
            )
            modes = self.modes
            link = await modes.start()
            coordinator = Coordinator(scheduler, link, cfg)
            coordinator.mode_report = modes.report
            coordinator.mode_request = modes.request
            self.coordinator = coordinator
            notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {cfg.socket_path}")
            log.info("baton daemon ready on %s (%s, router %s, pid %d)", cfg.socket_path, modes.mode,
                     modes.router_kind, os.getpid(), extra={"socket": str(cfg.socket_path), "db": str(cfg.db_path)})
            # Everything loaded so far (modules, the task records) lives as long as the daemon: one collection
            # (start-up ran without the cyclic GC), then keep the GC from scanning it again in every full one.
            gc.collect()
            gc.freeze()
            gc.enable()
            _trim_malloc()
            if not await modes.serve(coordinator, self.stop_requested):
                return EXIT_FAILURE
            notify("STOPPING=1")
            log.info("draining: no new work, running tasks get up to %.1f s", self.config.drain_timeout_s)
            try:
                given_back = await coordinator.drain(self.config.drain_timeout_s)
            except RouterGone:
                given_back = 0
            log.info("drained; %d task(s) back to ready", given_back)
            await coordinator.link.stop()
            await modes.finish()
            return EXIT_OK
        finally:
            await metrics.close()
            last = self.modes.link
            if last is not None and last.alive:
                with contextlib.suppress(Exception):
                    await last.stop()
            if scheduler is not None:
                scheduler.close()
            if listener is not None:
                listener.close()
                with contextlib.suppress(OSError):
                    os.unlink(cfg.socket_path)
            lock.close()

    async def _open_router(self, kind: str) -> tuple[RouterLink, str | None]:
        """A started router of that kind; for native, the Python router instead when the native one cannot
        start (PYTHON_ONLY, DESIGN.md section 3), with the reason as the second value."""
        import dataclasses

        link: RouterLink
        child, self.router_child = self.router_child, None
        # Every router after the first gets a generation of its own: no endpoint id is handed out twice.
        if self._routers_started:
            self.options = dataclasses.replace(self.options, generation=_next_generation(self.config.state_dir))
        self._routers_started += 1
        fallback = None
        if kind == "native":
            try:
                from baton.router.native import NativeRouterLink  # type: ignore[import-not-found,unused-ignore]

                link = NativeRouterLink(self.options, spin_ns=self.config.router_spin_us * 1000,
                                        recv_spin_ns=self.config.coordinator_spin_us * 1000, child=child,
                                        faults=self._next_faults())
                await link.start()
                return link, None
            except Exception as exc:
                log.warning("the native router is unavailable (%s); serving with the Python router", exc)
                fallback = f"native router unavailable: {exc}"
        elif child is not None:
            child.dismiss()
        from baton.router.python import PythonRouterLink

        link = PythonRouterLink(self.options)
        await link.start()
        return link, fallback

    def _prepare_native(self) -> None:
        if self.router_child is None:
            self.router_child = _spawn_router_child(None, {})

    def _next_faults(self) -> Any:
        """The injected faults for the next native router (the first fault_native_starts ones get them)."""
        from baton.router.faults import Faults

        faults = Faults.from_config(self.config)
        if faults is None or self._native_starts >= self.config.fault_native_starts:
            return None
        self._native_starts += 1
        log.warning("fault injection on: %s", faults, extra={"faults": str(faults)})
        return faults

    def _on_stop_signal(self, sig: int) -> None:
        assert self.stop_requested is not None
        self.signals += 1
        if self.stop_requested.is_set():
            log.info("%s again: already draining", signal.Signals(sig).name)
            return
        log.info("%s: draining", signal.Signals(sig).name)
        self.stop_requested.set()

    def _on_reload(self) -> None:
        from baton.daemon_config import ConfigError, DaemonConfig, load_config
        from baton.jsonlog import configure_logging

        try:
            new = load_config(self.config_path, os.environ, self.overrides)
        except ConfigError as exc:
            log.error("SIGHUP: the configuration is invalid, keeping the running one: %s", exc)
            return
        old = self.config
        changed = [f for f in DaemonConfig.model_fields if getattr(new, f) != getattr(old, f)]
        live = [f for f in changed if f in LIVE_SETTINGS]
        restart = [f for f in changed if f not in LIVE_SETTINGS]
        if restart:
            log.warning("SIGHUP: %s changed but only take effect after a restart", ", ".join(restart),
                        extra={"needs_restart": restart})
        if not live:
            log.info("SIGHUP: configuration reloaded; nothing to change live")
            return
        self.config = old.model_copy(update={f: getattr(new, f) for f in live})
        if "log_level" in live:
            configure_logging(self.config.log_level)
        coordinator = self.coordinator
        if coordinator is not None:
            coordinator.reconfigure(self.config)
        log.info("SIGHUP: applied %s", ", ".join(f"{f}={getattr(self.config, f)!r}" for f in live),
                 extra={"applied": {f: getattr(self.config, f) for f in live}})


def main(argv: list[str] | None = None) -> int:
    """``python -m baton.daemon [--config PATH] [--<setting> VALUE ...]``."""
    args = sys.argv[1:] if argv is None else argv
    # First thing: the router child starts on the other core while this process imports (docs/daemon.md).
    child = None if "-h" in args or "--help" in args else _spawn_router_child(_flag_value(args, "--router"),
                                                                             os.environ)
    try:
        from baton.daemon_config import FLAG_NAMES

        if not args:  # the usual case (a service unit): what argparse would give, without importing it
            spawned, child = child, None
            return serve(None, dict.fromkeys(FLAG_NAMES), router_child=spawned)
        import argparse

        parser = argparse.ArgumentParser(prog="python -m baton.daemon", description="the baton coordination daemon")
        parser.add_argument("--config", help="TOML configuration file (default: $XDG_CONFIG_HOME/baton/baton.toml)")
        for field, flag in FLAG_NAMES.items():
            parser.add_argument(flag, dest=field, default=None, metavar="VALUE", help=f"setting {field}")
        try:
            ns = parser.parse_args(args)
        except SystemExit as exc:
            return EXIT_USAGE if exc.code else EXIT_OK
        overrides = {f: getattr(ns, f) for f in FLAG_NAMES}
        spawned, child = child, None
        return serve(ns.config, overrides, router_child=spawned)
    finally:
        if child is not None:
            child.dismiss()


if __name__ == "__main__":
    sys.exit(main())
