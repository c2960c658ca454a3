"""The daemon's configuration: embedded defaults, then a TOML file, then ``BATON_*`` environment variables,
then command-line flags (each later source wins, setting by setting).

``baton serve`` must start with nothing configured, so every setting has a default; the path defaults follow
the XDG base directory spec.  Everything that reads the environment takes it as an explicit mapping so that
tests, the client and the daemon all compute paths the same way without touching ``os.environ``.

Any problem raises ``ConfigError`` listing every bad setting with its source (file path, variable name or
flag) and what is expected: the daemon refuses to start rather than run with a setting it had to guess.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from baton import wire
from baton.errors import ConfigError

__all__ = [
    "DaemonConfig",
    "ConfigError",
    "ENV_NAMES",
    "FLAG_NAMES",
    "SOCKET_PATH_MAX",
    "default_config_path",
    "default_socket_path",
    "default_state_dir",
    "load_config",
]

# sun_path is 108 bytes on Linux and needs a terminating NUL; a longer path only fails later, at bind(), with
# an error that does not say which setting to change.
SOCKET_PATH_MAX: Final = 107

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
RouterKind = Literal["native", "python"]
ModeName = Literal["INTELLIGENT", "PYTHON_ONLY", "REDUNDANT", "SPEED_CRITICAL"]


def _to_path(value: Any) -> Path:
    # Strict mode would reject the strings TOML, env and flags give; convert here and insist on absolute paths
    # because the daemon may be started from any working directory (systemd: /).  load_config has already made
    # relative paths absolute against the right base, so only direct construction can get here with one.
    if isinstance(value, str) and value:
        value = Path(value)
    if not isinstance(value, Path):
        raise ValueError("expected a path (a non-empty string)")
    if not value.is_absolute():
        raise ValueError(f"expected an absolute path, got {str(value)!r}")
    return value


AbsPath = Annotated[Path, BeforeValidator(_to_path)]


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


class DaemonConfig(BaseModel):
    """Everything ``baton serve`` needs to start.  Build it with ``load_config``; the path fields have no
    default here because their defaults depend on the environment (see ``default_state_dir`` and
    ``default_socket_path``)."""

    # strict: a port of "9002" or true in a TOML file is a mistake worth reporting, not something to coerce.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    state_dir: AbsPath
    # state_dir/baton.db unless set: _derive_db_path fills it in.  The None default only tells type checkers
    # that the argument is optional; validate_default makes sure None never survives.
    db_path: AbsPath = Field(default=None, validate_default=True)
    socket_path: AbsPath
    metrics_host: str = Field(default="127.0.0.1", min_length=1)
    metrics_port: int = Field(default=9002, ge=0, le=65535)  # 0: any free port (logged)
    log_level: Annotated[LogLevel, BeforeValidator(_lower)] = "info"
    drain_timeout_s: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    lease_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    wip_per_agent_type: int = Field(default=3, ge=1)
    max_frame_bytes: int = Field(default=wire.MAX_PAYLOAD_DEFAULT, ge=1, le=wire.MAX_PAYLOAD_LIMIT)
    # A group whose members may connect besides the daemon's own user; None: the owner only.
    allowed_gid: int | None = Field(default=None, ge=0)
    # Which data plane serves the socket: libbaton's C router in a child process, or the pure-Python router
    # inside the daemon (PYTHON_ONLY; also what a machine without the native library has to use).
    router: Annotated[RouterKind, BeforeValidator(_lower)] = "native"
    # Busy-polling budgets, microseconds (docs/daemon.md, "Spinning"): after a turn the coordinator polls the
    # router -> coordinator ring this long before it sleeps in the event loop (native router only); an idle
    # native router polls its rings this long before it sleeps.  0 = never spin.
    coordinator_spin_us: int = Field(default=0, ge=0, le=1_000_000)
    router_spin_us: int = Field(default=50, ge=0, le=1_000_000)

    # Execution mode (docs/modes.md).  router = "python" forces PYTHON_ONLY whatever this says.
    mode: Annotated[ModeName, BeforeValidator(_upper)] = "INTELLIGENT"
    # Health of the native layer (docs/modes.md, "Degradation"): a probe (a statistics round trip through
    # the native router) every probe_interval_s; each trigger switches to PYTHON_ONLY.  0 disables a trigger.
    probe_interval_s: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    degrade_probe_ms: float = Field(default=500.0, ge=0, allow_inf_nan=False)  # a probe slower than this
    degrade_error_rate: float = Field(default=0.03, ge=0, le=1, allow_inf_nan=False)  # failed native operations
    degrade_agent_failures: int = Field(default=5, ge=0)  # agent connections lost holding work, in the window
    degrade_window_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)  # for the two counts above
    # While degraded, each agent type's WIP limit is multiplied by this (at least 1 task); recovery raises it
    # back in steps.
    degraded_wip_factor: float = Field(default=0.5, gt=0, le=1, allow_inf_nan=False)
    # Recovery: every recovery_interval_s the daemon tries the native layer again (0 = stay degraded until
    # `baton mode set`); each step of the way back waits recovery_step_s with healthy probes.
    recovery_interval_s: float = Field(default=10.0, ge=0, allow_inf_nan=False)
    recovery_step_s: float = Field(default=2.0, ge=0, allow_inf_nan=False)
    # Fault injection, for tests and benchmarks only (docs/modes.md, "Fault injection"); all off by default.
    # They apply to the first fault_native_starts native routers the daemon starts.
    fault_slow_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # delay every batch from the router
    fault_fail_rate: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)  # sends that fail (retried)
    fault_kill_router_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # SIGKILL it this long after start
    fault_misroute_rate: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)  # swap two TASK frames
    fault_after_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # the others start this late
    fault_native_starts: int = Field(default=1, ge=0)
    fault_seed: int = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _derive_db_path(cls, data: Any) -> Any:
        # Derived here rather than in load_config so that moving state_dir (from any source) moves the database
        # with it unless db_path itself was set.
        if isinstance(data, Mapping) and "db_path" not in data and isinstance(data.get("state_dir"), (str, Path)):
            return {**data, "db_path": Path(data["state_dir"]) / "baton.db"}
        return data

    @field_validator("socket_path")
    @classmethod
    def _fits_sun_path(cls, value: Path) -> Path:
        n = len(os.fsencode(value))
        if n > SOCKET_PATH_MAX:
            raise ValueError(
                f"the path is {n} bytes long but unix socket paths are limited to {SOCKET_PATH_MAX}: "
                "choose a shorter path"
            )
        return value


_FIELDS: Final = tuple(DaemonConfig.model_fields)
_PATH_FIELDS: Final = frozenset({"state_dir", "db_path", "socket_path"})

# BATON_<FIELD>, except the socket: BATON_SOCKET is the name the issue gives (and the client reads it too).
ENV_NAMES: Final[dict[str, str]] = {
    f: ("BATON_SOCKET" if f == "socket_path" else f"BATON_{f.upper()}") for f in _FIELDS
}
# The flags ``baton serve`` offers, named here so that error messages can point at them.
FLAG_NAMES: Final[dict[str, str]] = {
    f: ("--socket" if f == "socket_path" else "--" + f.replace("_", "-")) for f in _FIELDS
}


# --- default paths ---------------------------------------------------------------------------------------------


def _xdg_dir(env: Mapping[str, str], var: str, fallback: str) -> Path:
    # The XDG spec: an unset, empty or relative value is ignored and the fallback under $HOME is used.
    value = env.get(var, "")
    if value and os.path.isabs(value):
        return Path(value)
    home = env.get("HOME") or str(Path.home())
    return Path(home) / fallback


def default_state_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_STATE_HOME/baton``, or ``~/.local/state/baton``: where the SQLite database lives."""
    return _xdg_dir(env, "XDG_STATE_HOME", ".local/state") / "baton"


def default_config_path(env: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/baton/baton.toml``, or ``~/.config/baton/baton.toml`` (read only if it exists)."""
    return _xdg_dir(env, "XDG_CONFIG_HOME", ".config") / "baton" / "baton.toml"


def default_socket_path(env: Mapping[str, str], uid: int | None = None) -> Path:
    """Where the daemon listens and the client connects, unless ``BATON_SOCKET``/``--socket`` say otherwise:
    ``$XDG_RUNTIME_DIR/baton/baton.sock``, else ``/tmp/baton-<uid>/baton.sock``."""
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "baton" / "baton.sock"
    # No XDG_RUNTIME_DIR (containers, cron, su, ssh without a login session).  Not under $HOME: home
    # directories can be on NFS, where unix sockets do not work, and deep enough to pass the 107-byte sun_path
    # limit.  /tmp always exists and is short; the per-uid name keeps users apart and lets the client find it
    # without any configuration.  /tmp is shared, so another user could create the directory first:
    # runtime_dir.prepare_socket_dir refuses a directory that is not ours or is not 0700.
    return Path("/tmp") / f"baton-{os.getuid() if uid is None else uid}" / "baton.sock"


# --- loading ---------------------------------------------------------------------------------------------------


def _unknown(source: str, key: str) -> str:
    close = difflib.get_close_matches(key.replace("-", "_").lower(), _FIELDS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "known settings: " + ", ".join(_FIELDS)
    return f"{source}: unknown setting {key!r}; {hint}"


def _expand_home(text: str, env: Mapping[str, str]) -> Path:
    # ~ means the HOME of the environment we were given, the same one the default paths use.
    if text == "~" or text.startswith("~/"):
        return Path(env.get("HOME") or str(Path.home())) / text[2:]
    return Path(text).expanduser()  # ~user, or no tilde at all


def _parse_text(field: str, text: str, base: Path, env: Mapping[str, str]) -> Any:
    """Turn the text of an environment variable or flag into the field's type.  Raises ValueError saying what
    is expected; range checks are left to the model."""
    annotation = DaemonConfig.model_fields[field].annotation
    text = text.strip()
    if field in _PATH_FIELDS:
        if not text:
            raise ValueError("expected a path, got an empty string")
        return base / _expand_home(text, env)  # an absolute path ignores base
    if annotation is int or annotation == (int | None):
        try:
            return int(text, 10)
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number (seconds), got {text!r}") from None
    return text


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read: {e.strerror or e}") from None


def load_config(path: Path | None, env: Mapping[str, str], overrides: Mapping[str, Any]) -> DaemonConfig:
    """Build the daemon's configuration: defaults < the TOML file < ``BATON_*`` variables in ``env`` <
    ``overrides`` (the flags, keyed by field name; a None value means "flag not given").

    ``path`` None reads ``default_config_path(env)`` if it exists; an explicit path must exist.  The file is
    flat: ``key = value`` with the field names.  Relative paths are resolved against the file's directory
    (in the file) or the current directory (env and flags); ``~`` is expanded.  ``env`` is explicit (the daemon
    passes ``os.environ``) so that tests and the client compute the same paths without touching the process
    environment.
    """
    values: dict[str, Any] = {
        "state_dir": default_state_dir(env),
        "socket_path": default_socket_path(env),
    }
    sources: dict[str, str] = {
        "state_dir": "default (from XDG_STATE_HOME or HOME)",
        "socket_path": "default (from XDG_RUNTIME_DIR, else /tmp/baton-<uid>)",
        "db_path": "default (state_dir/baton.db)",
    }
    problems: list[str] = []
    unparsable: set[str] = set()  # already reported; their validation errors would only repeat the problem

    file_path = default_config_path(env) if path is None else path
    if path is not None and not path.exists():
        raise ConfigError(f"config file {path} does not exist (it was given explicitly, so it is required)")
    if file_path.exists():
        source = f"config file {file_path}"
        for key, value in _read_file(file_path).items():
            if key not in DaemonConfig.model_fields:
                problems.append(_unknown(source, key))
                continue
            if key in _PATH_FIELDS and isinstance(value, str) and value:
                value = file_path.parent.absolute() / _expand_home(value, env)
            values[key], sources[key] = value, source

    cwd = Path.cwd()
    for field, name in ENV_NAMES.items():
        text = env.get(name, "")
        if not text:  # unset and empty are the same, as for the XDG variables and most shells' habits
            continue
        try:
            values[field], sources[field] = _parse_text(field, text, cwd, env), f"environment variable {name}"
        except ValueError as e:
            problems.append(f"environment variable {name}: {field}: {e}")
            unparsable.add(field)

    for field, value in overrides.items():
        if field not in DaemonConfig.model_fields:
            problems.append(_unknown("flag override", field))
            continue
        if value is None:
            continue
        source = f"flag {FLAG_NAMES[field]}"
        # Flags arrive as text, or as a Path that may be relative to where the command was run.
        if isinstance(value, str) or (field in _PATH_FIELDS and isinstance(value, Path)):
            try:
                value = _parse_text(field, str(value), cwd, env)
            except ValueError as e:
                problems.append(f"{source}: {field}: {e}")
                unparsable.add(field)
                continue
        values[field], sources[field] = value, source

    unparsable_locs = {(f,) for f in unparsable}
    # Validate even when there are problems already, so that one message lists everything to fix.
    try:
        config = DaemonConfig.model_validate(values)
    except ValidationError as e:
        problems.extend(_describe(err, sources) for err in e.errors() if err["loc"][:1] not in unparsable_locs)
    else:
        if not problems:
            return config
    raise ConfigError("invalid baton configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _describe(err: Any, sources: Mapping[str, str]) -> str:
    field = str(err["loc"][0]) if err["loc"] else "(configuration)"
    # pydantic's messages say what is expected ("Input should be less than or equal to 65535"); strip its
    # "Value error, " prefix from our own validators' messages.
    msg = str(err["msg"]).removeprefix("Value error, ")
    where = f"set it in the config file, {ENV_NAMES.get(field, '?')} or {FLAG_NAMES.get(field, '?')}"
    value = err["input"]
    got = repr(str(value) if isinstance(value, Path) else value)
    return f"{sources.get(field, 'configuration')}: {field}: {msg} (got {got}; {where})"
