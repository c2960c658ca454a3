"""Daemon configuration (baton.daemon_config), the runtime directory and instance lock (baton.runtime_dir) and
JSON-lines logging (baton.jsonlog).

Environments are plain dicts passed explicitly (os.environ is never touched); files, directories, sockets and
the competing daemon are real, the latter a second Python process.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from baton import errors, wire
from baton.daemon_config import (
    ENV_NAMES,
    SOCKET_PATH_MAX,
    ConfigError,
    DaemonConfig,
    default_config_path,
    default_socket_path,
    default_state_dir,
    load_config,
)
from baton.jsonlog import JsonFormatter, configure_logging
from baton.runtime_dir import (
    AlreadyRunning,
    UnsafeSocketDir,
    acquire_instance_lock,
    prepare_socket_dir,
    remove_stale_socket,
)
from conftest import child_env

UID = os.getuid()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(path: Path | None, env: dict[str, str], overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env, overrides or {})
    return str(info.value)


# --- defaults and default paths ------------------------------------------------------------------------------


def test_defaults_with_nothing_configured(home: Path) -> None:
    cfg = load_config(None, {"HOME": str(home)}, {})
    assert cfg.state_dir == home / ".local/state/baton"
    assert cfg.db_path == home / ".local/state/baton/baton.db"
    assert cfg.socket_path == Path(f"/tmp/baton-{UID}/baton.sock")
    assert (cfg.metrics_host, cfg.metrics_port, cfg.log_level) == ("127.0.0.1", 9002, "info")
    assert (cfg.drain_timeout_s, cfg.lease_s, cfg.wip_per_agent_type) == (30.0, 30.0, 3)
    assert cfg.max_frame_bytes == 16 * 1024 * 1024 == wire.MAX_PAYLOAD_DEFAULT
    assert cfg.allowed_gid is None
    assert cfg.router == "native"


def test_xdg_directories_are_used_when_set_and_absolute(tmp_path: Path, home: Path) -> None:
    env = {
        "HOME": str(home),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_RUNTIME_DIR": "/run/user/4242",
        "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
    }
    assert default_state_dir(env) == tmp_path / "state/baton"
    assert default_socket_path(env) == Path("/run/user/4242/baton/baton.sock")
    assert default_config_path(env) == tmp_path / "cfg/baton/baton.toml"
    cfg = load_config(None, env, {})
    assert cfg.state_dir == tmp_path / "state/baton"
    assert cfg.socket_path == Path("/run/user/4242/baton/baton.sock")


def test_empty_or_relative_xdg_values_are_ignored_as_the_spec_says(home: Path) -> None:
    env = {"HOME": str(home), "XDG_STATE_HOME": "rel/state", "XDG_RUNTIME_DIR": "", "XDG_CONFIG_HOME": "cfg"}
    assert default_state_dir(env) == home / ".local/state/baton"
    assert default_socket_path(env, uid=1234) == Path("/tmp/baton-1234/baton.sock")
    assert default_config_path(env) == home / ".config/baton/baton.toml"
    assert default_socket_path({"XDG_RUNTIME_DIR": "run/user/1"}, uid=7) == Path("/tmp/baton-7/baton.sock")


def test_model_is_frozen_and_rejects_unknown_fields(tmp_path: Path) -> None:
    cfg = DaemonConfig(state_dir=tmp_path, socket_path=tmp_path / "s.sock")
    assert cfg.db_path == tmp_path / "baton.db"
    with pytest.raises(ValidationError):
        setattr(cfg, "metrics_port", 1)
    with pytest.raises(ValidationError, match="extra"):
        DaemonConfig.model_validate({"state_dir": tmp_path, "socket_path": tmp_path / "s.sock", "metric_port": 1})
    with pytest.raises(ValidationError, match="absolute"):
        DaemonConfig(state_dir=Path("relative"), socket_path=tmp_path / "s.sock")


# --- the file and the precedence -----------------------------------------------------------------------------


def test_precedence_file_then_env_then_flags_setting_by_setting(tmp_path: Path, home: Path) -> None:
    path = write(
        tmp_path / "baton.toml",
        'metrics_port = 9001\nlease_s = 10\nlog_level = "warning"\nwip_per_agent_type = 5\nallowed_gid = 100\n',
    )
    env = {"HOME": str(home), "BATON_METRICS_PORT": "9100", "BATON_LEASE_S": "12.5"}
    cfg = load_config(path, env, {"lease_s": 20.0, "log_level": None})
    assert cfg.metrics_port == 9100  # env beats file
    assert cfg.lease_s == 20.0  # flag beats env and file
    assert cfg.log_level == "warning"  # file beats default; a None flag is "not given"
    assert cfg.wip_per_agent_type == 5
    assert cfg.allowed_gid == 100
    assert cfg.drain_timeout_s == 30.0  # nobody set it


def test_default_config_file_is_read_only_when_it_exists(tmp_path: Path, home: Path) -> None:
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    assert load_config(None, env, {}).metrics_port == 9002  # absent: not an error
    write(tmp_path / "cfg/baton/baton.toml", "metrics_port = 9005\n")
    assert load_config(None, env, {}).metrics_port == 9005
    write(home / ".config/baton/baton.toml", "metrics_port = 9006\n")
    assert load_config(None, {"HOME": str(home)}, {}).metrics_port == 9006


def test_explicit_config_path_must_exist(tmp_path: Path, home: Path) -> None:
    missing = tmp_path / "nope.toml"
    msg = config_error(missing, {"HOME": str(home)})
    assert str(missing) in msg and "does not exist" in msg


def test_db_path_follows_state_dir_unless_set(tmp_path: Path, home: Path) -> None:
    path = write(tmp_path / "baton.toml", f'state_dir = "{tmp_path / "st"}"\n')
    assert load_config(path, {"HOME": str(home)}, {}).db_path == tmp_path / "st/baton.db"
    env = {"HOME": str(home), "BATON_STATE_DIR": str(tmp_path / "envst")}
    assert load_config(path, env, {}).db_path == tmp_path / "envst/baton.db"
    env["BATON_DB_PATH"] = str(tmp_path / "elsewhere.db")
    cfg = load_config(path, env, {})
    assert (cfg.state_dir, cfg.db_path) == (tmp_path / "envst", tmp_path / "elsewhere.db")


def test_relative_paths_resolve_against_the_file_or_the_working_directory(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "etc/baton.toml", 'state_dir = "data"\nsocket_path = "~/b.sock"\n')
    cfg = load_config(path, {"HOME": str(home)}, {})
    assert cfg.state_dir == tmp_path / "etc/data"
    assert cfg.socket_path == home / "b.sock"  # ~ is the HOME of the given environment
    monkeypatch.chdir(tmp_path)
    env = {"HOME": str(home), "BATON_STATE_DIR": "fromenv", "BATON_DB_PATH": "~/env.db"}
    cfg = load_config(path, env, {"socket_path": Path("flag.sock")})
    assert (cfg.state_dir, cfg.db_path) == (tmp_path / "fromenv", home / "env.db")
    assert cfg.socket_path == tmp_path / "flag.sock"
    assert load_config(path, env, {"db_path": "flag.db"}).db_path == tmp_path / "flag.db"


def test_baton_socket_and_the_socket_flag_set_socket_path(tmp_path: Path, home: Path) -> None:
    env = {"HOME": str(home), "BATON_SOCKET": str(tmp_path / "env.sock"), "BATON_SOCKET_PATH": "/ignored"}
    assert load_config(None, env, {}).socket_path == tmp_path / "env.sock"
    cfg = load_config(None, env, {"socket_path": tmp_path / "flag.sock"})
    assert cfg.socket_path == tmp_path / "flag.sock"


ENV_SAMPLES: dict[str, tuple[str, Any]] = {
    "state_dir": ("/srv/baton", Path("/srv/baton")),
    "db_path": ("/srv/b.db", Path("/srv/b.db")),
    "socket_path": ("/run/b.sock", Path("/run/b.sock")),
    "metrics_host": ("0.0.0.0", "0.0.0.0"),
    "metrics_port": ("9100", 9100),
    "log_level": ("DEBUG", "debug"),
    "drain_timeout_s": ("2.5", 2.5),
    "lease_s": ("45", 45.0),
    "wip_per_agent_type": (" 7 ", 7),
    "max_frame_bytes": ("1048576", 1 << 20),
    "allowed_gid": ("1000", 1000),
    "router": (" Python", "python"),
    "coordinator_spin_us": ("200", 200),
    "router_spin_us": ("0", 0),
    "mode": ("speed_critical", "SPEED_CRITICAL"),
    "probe_interval_s": ("0.25", 0.25),
    "degrade_probe_ms": ("250", 250.0),
    "degrade_error_rate": ("0.1", 0.1),
    "degrade_agent_failures": ("0", 0),
    "degrade_window_s": ("60", 60.0),
    "degraded_wip_factor": ("1", 1.0),
    "recovery_interval_s": ("0", 0.0),
    "recovery_step_s": ("0.5", 0.5),
    "fault_slow_ms": ("700", 700.0),
    "fault_fail_rate": ("0.05", 0.05),
    "fault_kill_router_s": ("1.5", 1.5),
    "fault_misroute_rate": ("0.5", 0.5),
    "fault_after_s": ("2", 2.0),
    "fault_native_starts": ("100", 100),
    "fault_seed": ("42", 42),
}


@pytest.mark.parametrize("field", list(DaemonConfig.model_fields))
def test_every_setting_has_an_environment_variable(field: str, home: Path) -> None:
    text, expected = ENV_SAMPLES[field]
    name = ENV_NAMES[field]
    assert name == ("BATON_SOCKET" if field == "socket_path" else f"BATON_{field.upper()}")
    assert getattr(load_config(None, {"HOME": str(home), name: text}, {}), field) == expected


def test_router_choice_is_native_or_python(tmp_path: Path, home: Path) -> None:
    env = {"HOME": str(home)}
    assert load_config(None, env, {"router": "python"}).router == "python"
    path = tmp_path / "b.toml"
    path.write_text('router = "NATIVE"\n')
    assert load_config(path, env, {}).router == "native"
    msg = config_error(None, {**env, "BATON_ROUTER": "c"}, {})
    assert "BATON_ROUTER" in msg and "router" in msg and "'native' or 'python'" in msg


def test_mode_is_one_of_four_and_fault_rates_are_fractions(home: Path) -> None:
    env = {"HOME": str(home)}
    assert load_config(None, env, {}).mode == "INTELLIGENT"
    assert load_config(None, env, {"mode": "redundant"}).mode == "REDUNDANT"
    msg = config_error(None, {**env, "BATON_MODE": "FAST"}, {})
    assert "BATON_MODE" in msg and "'INTELLIGENT', 'PYTHON_ONLY', 'REDUNDANT' or 'SPEED_CRITICAL'" in msg, msg
    msg = config_error(None, {**env, "BATON_FAULT_FAIL_RATE": "1.5", "BATON_DEGRADED_WIP_FACTOR": "0"}, {})
    assert "fault_fail_rate" in msg and "less than or equal to 1" in msg, msg
    assert "degraded_wip_factor" in msg and "greater than 0" in msg, msg


def test_an_empty_environment_variable_counts_as_unset(home: Path) -> None:
    assert load_config(None, {"HOME": str(home), "BATON_METRICS_PORT": ""}, {}).metrics_port == 9002
    assert load_config(None, {"HOME": str(home), "BATON_METRICS_PORT": "0"}, {}).metrics_port == 0  # any free one


# --- errors: each names its source and field and says what is expected ----------------------------------------


def test_bad_toml_names_the_file_and_the_line(tmp_path: Path, home: Path) -> None:
    path = write(tmp_path / "baton.toml", "metrics_port = 9001\nlease_s = = 3\n")
    msg = config_error(path, {"HOME": str(home)})
    assert f"config file {path}" in msg and "not valid TOML" in msg and "line 2" in msg


def test_unreadable_config_file_is_reported(tmp_path: Path, home: Path) -> None:
    path = tmp_path / "is-a-dir.toml"
    path.mkdir()
    msg = config_error(path, {"HOME": str(home)})
    assert f"config file {path}" in msg and "cannot be read" in msg


def test_unknown_key_in_file_suggests_the_right_name(tmp_path: Path, home: Path) -> None:
    path = write(tmp_path / "baton.toml", "metric_port = 9001\n[daemon]\nx = 1\n")
    msg = config_error(path, {"HOME": str(home)})
    assert f"config file {path}: unknown setting 'metric_port'; did you mean 'metrics_port'?" in msg
    assert f"config file {path}: unknown setting 'daemon'; known settings: state_dir," in msg


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ('metrics_port = "9100"', "metrics_port", "valid integer"),
        ("metrics_port = true", "metrics_port", "valid integer"),
        ("metrics_port = 70000", "metrics_port", "less than or equal to 65535"),
        ("lease_s = 0", "lease_s", "greater than 0"),
        ("drain_timeout_s = inf", "drain_timeout_s", "finite number"),
        ('log_level = "loud"', "log_level", "'debug', 'info', 'warning', 'error' or 'critical'"),
        ("state_dir = 5", "state_dir", "expected a path"),
        ("max_frame_bytes = 2147483648", "max_frame_bytes", f"less than or equal to {wire.MAX_PAYLOAD_LIMIT}"),
        ("allowed_gid = -1", "allowed_gid", "greater than or equal to 0"),
        ("metrics_host = 127", "metrics_host", "valid string"),
    ],
)
def test_wrong_value_in_file_names_file_field_and_expectation(
    line: str, field: str, expected: str, tmp_path: Path, home: Path
) -> None:
    path = write(tmp_path / "baton.toml", line + "\n")
    msg = config_error(path, {"HOME": str(home)})
    assert f"config file {path}: {field}: " in msg
    assert expected in msg
    assert ENV_NAMES[field] in msg  # and where else it could be set


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("BATON_METRICS_PORT", "abc", "metrics_port", "expected a whole number, got 'abc'"),
        ("BATON_METRICS_PORT", "65536", "metrics_port", "less than or equal to 65535"),
        ("BATON_LEASE_S", "soon", "lease_s", "expected a number (seconds), got 'soon'"),
        ("BATON_DRAIN_TIMEOUT_S", "nan", "drain_timeout_s", "finite number"),
        ("BATON_WIP_PER_AGENT_TYPE", "2.5", "wip_per_agent_type", "expected a whole number"),
        ("BATON_LOG_LEVEL", "verbose", "log_level", "'debug', 'info'"),
        ("BATON_ALLOWED_GID", "staff", "allowed_gid", "expected a whole number"),
        ("BATON_SOCKET", "/" + "s" * 120, "socket_path", f"limited to {SOCKET_PATH_MAX}"),
    ],
)
def test_bad_environment_value_names_variable_field_and_expectation(
    name: str, value: str, field: str, expected: str, home: Path
) -> None:
    msg = config_error(None, {"HOME": str(home), name: value})
    assert f"environment variable {name}: {field}: " in msg
    assert expected in msg


def test_bad_flag_value_names_the_flag(home: Path) -> None:
    msg = config_error(None, {"HOME": str(home)}, {"metrics_port": "ninety"})
    assert "flag --metrics-port: metrics_port: expected a whole number, got 'ninety'" in msg
    msg = config_error(None, {"HOME": str(home)}, {"wip_per_agent_type": 0})
    assert "flag --wip-per-agent-type: wip_per_agent_type: Input should be greater than or equal to 1" in msg
    msg = config_error(None, {"HOME": str(home)}, {"metrics_prot": 1})
    assert "flag override: unknown setting 'metrics_prot'; did you mean 'metrics_port'?" in msg


def test_a_too_long_default_socket_path_says_where_it_came_from(home: Path) -> None:
    msg = config_error(None, {"HOME": str(home), "XDG_RUNTIME_DIR": "/" + "r" * 100})
    assert "default (from XDG_RUNTIME_DIR" in msg and "socket_path" in msg and "BATON_SOCKET or --socket" in msg


def test_every_problem_is_reported_at_once(tmp_path: Path, home: Path) -> None:
    path = write(tmp_path / "baton.toml", "metrics_port = 70000\nbogus = 1\n")
    env = {"HOME": str(home), "BATON_LEASE_S": "x", "BATON_WIP_PER_AGENT_TYPE": "-1"}
    msg = config_error(path, env, {"log_level": "shout"})
    lines = msg.splitlines()
    assert lines[0] == "invalid baton configuration:"
    assert len(lines) == 6, msg
    for fragment in (
        f"config file {path}: metrics_port",
        f"config file {path}: unknown setting 'bogus'",
        "environment variable BATON_LEASE_S: lease_s",
        "environment variable BATON_WIP_PER_AGENT_TYPE: wip_per_agent_type",
        "flag --log-level: log_level",
    ):
        assert fragment in msg


def test_config_error_is_a_baton_error_and_a_value_error() -> None:
    assert issubclass(ConfigError, errors.BatonError) and issubclass(ConfigError, ValueError)
    assert ConfigError.code == "CONFIG_ERROR"


# --- the socket directory -----------------------------------------------------------------------------------


def test_prepare_socket_dir_creates_a_private_directory(short_tmp: Path) -> None:
    sock = short_tmp / "run" / "baton.sock"
    assert prepare_socket_dir(sock) == short_tmp / "run"
    assert stat.S_IMODE(os.lstat(short_tmp / "run").st_mode) == 0o700
    assert prepare_socket_dir(sock) == short_tmp / "run"  # an existing private directory is fine


def test_prepare_socket_dir_refuses_a_group_or_world_accessible_directory(short_tmp: Path) -> None:
    d = short_tmp / "open"
    d.mkdir()
    os.chmod(d, 0o750)
    with pytest.raises(UnsafeSocketDir) as info:
        prepare_socket_dir(d / "baton.sock")
    msg = str(info.value)
    assert str(d) in msg and "0750" in msg and f"chmod 700 {d}" in msg and "BATON_SOCKET" in msg
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o750  # refused, not silently changed


def test_prepare_socket_dir_refuses_a_symlink(short_tmp: Path) -> None:
    target = short_tmp / "target"
    target.mkdir(mode=0o700)
    (short_tmp / "link").symlink_to(target)
    with pytest.raises(UnsafeSocketDir, match="not a directory"):
        prepare_socket_dir(short_tmp / "link" / "baton.sock")


def test_prepare_socket_dir_refuses_a_directory_owned_by_someone_else(short_tmp: Path) -> None:
    if UID == 0:
        d = short_tmp / "theirs"
        d.mkdir(mode=0o700)
        os.chown(d, 65534, 65534)
    else:
        d = Path("/")  # owned by root; the owner is checked before the mode
    with pytest.raises(UnsafeSocketDir) as info:
        prepare_socket_dir(d / "baton.sock")
    assert str(d) in str(info.value) and "owned by uid" in str(info.value)


# --- one daemon per socket ----------------------------------------------------------------------------------

# A competing daemon: tries the lock, reports, and holds it until its stdin says otherwise.
CHILD = """
import sys
from pathlib import Path
from baton.runtime_dir import AlreadyRunning, acquire_instance_lock
try:
    lock = acquire_instance_lock(Path(sys.argv[1]))
except AlreadyRunning as e:
    print("BUSY", e.pid, e, flush=True)
    sys.exit(3)
print("LOCKED", flush=True)
sys.stdin.readline()
lock.close()
"""


def spawn(sock: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(sock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def test_a_second_process_cannot_take_the_lock_until_the_first_releases_it(short_tmp: Path) -> None:
    sock = short_tmp / "run" / "baton.sock"
    prepare_socket_dir(sock)
    lock = acquire_instance_lock(sock)
    assert (short_tmp / "run" / "baton.sock.lock").read_text() == f"{os.getpid()}\n"
    busy = subprocess.run(
        [sys.executable, "-c", CHILD, str(sock)], input="", capture_output=True, text=True, env=child_env(),
        timeout=60,
    )
    assert busy.returncode == 3, busy.stderr
    pid = os.getpid()
    assert busy.stdout.startswith(f"BUSY {pid} another baton daemon is already serving {sock} (pid {pid})")
    assert f"`kill {pid}`" in busy.stdout and "--socket/BATON_SOCKET" in busy.stdout

    lock.close()
    ok = subprocess.run(
        [sys.executable, "-c", CHILD, str(sock)], input="\n", capture_output=True, text=True, env=child_env(),
        timeout=60,
    )
    assert (ok.returncode, ok.stdout) == (0, "LOCKED\n"), ok.stderr


def test_the_lock_names_the_holder_and_dies_with_it(short_tmp: Path) -> None:
    sock = short_tmp / "run" / "baton.sock"
    prepare_socket_dir(sock)
    child = spawn(sock)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "LOCKED\n"
        with pytest.raises(AlreadyRunning) as info:
            acquire_instance_lock(sock)
        assert info.value.pid == child.pid
        assert f"(pid {child.pid}); stop it with `kill {child.pid}`" in str(info.value)
        assert isinstance(info.value, errors.BatonError) and info.value.code == "ALREADY_RUNNING"
    finally:
        child.send_signal(signal.SIGKILL)  # a crash: nothing releases the lock but the kernel
        child.wait(timeout=60)
    with acquire_instance_lock(sock) as lock:
        assert lock.held
        with pytest.raises(AlreadyRunning):  # the same process opening it again is refused too
            acquire_instance_lock(sock)
    assert not lock.held


# --- stale sockets ------------------------------------------------------------------------------------------


def leave_socket(path: Path) -> None:
    """What a killed daemon leaves: a bound socket file nobody listens on."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def test_stale_socket_is_removed_only_by_the_lock_holder(short_tmp: Path) -> None:
    sock = short_tmp / "run" / "baton.sock"
    prepare_socket_dir(sock)
    leave_socket(sock)
    lock = acquire_instance_lock(sock)
    other = acquire_instance_lock(short_tmp / "run" / "other.sock")
    with pytest.raises(ValueError, match="held instance lock"):
        remove_stale_socket(sock, other)  # a lock, but not this socket's
    assert sock.exists()
    assert remove_stale_socket(sock, lock) is True
    assert not sock.exists()
    assert remove_stale_socket(sock, lock) is False  # nothing left to remove
    # The path is free again: a new daemon can bind it.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.close()
    lock.close()
    other.close()
    with pytest.raises(ValueError, match="held instance lock"):
        remove_stale_socket(sock, lock)  # released: no longer proof of anything
    assert sock.exists()


def test_remove_stale_socket_never_deletes_something_that_is_not_a_socket(short_tmp: Path) -> None:
    sock = short_tmp / "run" / "baton.sock"
    prepare_socket_dir(sock)
    sock.write_text("precious")
    with acquire_instance_lock(sock) as lock:
        with pytest.raises(UnsafeSocketDir, match="not a socket"):
            remove_stale_socket(sock, lock)
    assert sock.read_text() == "precious"


# --- JSON-lines logs ----------------------------------------------------------------------------------------


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def record(exc_info: Any = None, extra: dict[str, Any] | None = None) -> logging.LogRecord:
    logger = logging.getLogger("baton.test")
    return logger.makeRecord(
        "baton.test", logging.WARNING, __file__, 1, "lease of %s expired", ("t1",), exc_info, extra=extra
    )


def test_formatter_writes_one_json_object_with_extras() -> None:
    rec = record(extra={"task_id": "t1", "attempt": 2, "path": Path("/x"), "ts": "mine"})
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "warning" and obj["logger"] == "baton.test" and obj["msg"] == "lease of t1 expired"
    assert (obj["task_id"], obj["attempt"], obj["path"]) == ("t1", 2, "/x")
    assert obj["extra_ts"] == "mine"  # a colliding extra does not overwrite the timestamp
    ts = datetime.strptime(obj["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs(ts.timestamp() - rec.created) < 1e-3
    assert "exc" not in obj and "args" not in obj and "levelno" not in obj


def test_formatter_includes_the_exception_as_one_string() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        rec = record(exc_info=sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    exc = json.loads(line)["exc"]
    assert exc.startswith("Traceback") and "RuntimeError: boom\nsecond line" in exc


def test_configure_logging_sends_json_lines_to_the_stream_once(root_logger: logging.Logger) -> None:
    first, out = io.StringIO(), io.StringIO()
    configure_logging("info", first)
    configure_logging("INFO", out)  # replaces, does not add
    log = logging.getLogger("baton.daemon")
    log.debug("hidden")
    log.info("started", extra={"socket": "/run/b.sock"})
    assert first.getvalue() == ""
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["socket"] == "/run/b.sock"
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud", out)


def test_configure_logging_defaults_to_the_current_stderr(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("debug")
    logging.getLogger("baton.x").debug("to stderr")
    assert json.loads(capsys.readouterr().err.splitlines()[-1])["msg"] == "to stderr"
