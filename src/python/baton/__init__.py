"""baton: a local coordination daemon for multi-agent work.

Importing baton never requires the native library: ``baton.native.AVAILABLE`` says whether libbaton loaded,
and the pure-Python twins (wire codec, Python router) serve when it did not.

``baton.Client``, ``baton.AsyncClient`` and ``baton.Agent`` are imported on first use (PEP 562), so that
``import baton`` stays cheap for tools that need only a submodule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "Client", "AsyncClient", "Agent", "AgentTask", "Message"]

if TYPE_CHECKING:
    from baton.agent import Agent, AgentTask
    from baton.client import AsyncClient, Client, Message

_LAZY = {
    "Client": "baton.client",
    "AsyncClient": "baton.client",
    "Message": "baton.client",
    "Agent": "baton.agent",
    "AgentTask": "baton.agent",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'baton' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
