"""The daemon's HTTP endpoints (docs/metrics.md): /metrics, /health/live, /health/ready.

A small HTTP/1.1 server on the daemon's event loop (asyncio streams), not a thread: a scrape then runs between
coordinator turns and reads a consistent state without locks.  Three GET routes, keep-alive, Content-Length
bodies; nothing else of HTTP is needed by Prometheus or a health checker, so no web framework (aiohttp would
add ~10 MB and tens of milliseconds to every daemon start for this).  prometheus_client is imported at the
first scrape for the same reason (~70 ms of imports).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Final

from baton.metrics import BatonCollector

__all__ = ["MetricsServer"]

log = logging.getLogger("baton.metrics")

_MAX_LINE: Final = 8192  # request line or header line
_MAX_HEADERS: Final = 100
_IDLE_TIMEOUT_S: Final = 60.0  # a keep-alive connection with no request for this long is closed
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   503: "Service Unavailable"}
_JSON: Final = "application/json"


class _BadRequest(Exception):
    pass


class MetricsServer:
    """Serves one daemon's metrics and health.  ``start()`` binds (OSError when it cannot), ``close()`` stops."""

    def __init__(self, daemon: Any, host: str, port: int) -> None:
        self.daemon = daemon
        self.host = host
        self.port = port
        self.collector = BatonCollector(daemon)
        self._registry: Any = None
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=_MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]  # the one chosen when asked for port 0

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # --- HTTP ----------------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await asyncio.wait_for(self._read_request(reader), _IDLE_TIMEOUT_S)
                except (TimeoutError, _BadRequest, ValueError) as exc:
                    if not isinstance(exc, TimeoutError) and not reader.at_eof():
                        self._respond(writer, 400, "text/plain", f"bad request: {exc}\n".encode(), head=False,
                                      close=True)
                    break
                if request is None:
                    break
                method, path, headers, keep_alive = request
                status, ctype, body = await self._route(method, path, headers)
                self._respond(writer, status, ctype, body, head=method == "HEAD", close=not keep_alive)
                await writer.drain()
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bool] | None:
        line = await reader.readline()  # ValueError (LimitOverrunError) past _MAX_LINE
        if not line:
            return None
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest("expected 'METHOD /path HTTP/1.1'")
        method, target, version = parts
        headers: dict[str, str] = {}
        while True:
            h = await reader.readline()
            if h in (b"\r\n", b"\n"):
                break
            if not h:
                raise _BadRequest("connection closed inside the headers")
            if len(headers) >= _MAX_HEADERS:
                raise _BadRequest("too many headers")
            name, sep, value = h.decode("latin-1").partition(":")
            if not sep:
                raise _BadRequest(f"malformed header line {h[:40]!r}")
            headers[name.strip().lower()] = value.strip()
        if headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers:
            raise _BadRequest("request bodies are not accepted")
        conn = headers.get("connection", "").lower()
        keep_alive = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        return method, target.split("?", 1)[0], headers, keep_alive

    @staticmethod
    def _respond(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, *, head: bool,
                 close: bool) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {ctype}", f"Content-Length: {len(body)}"]
        if close:
            lines.append("Connection: close")
        if status == 405:
            lines.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))

    async def _route(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
        if path not in ("/metrics", "/health/live", "/health/ready"):
            return 404, "text/plain", b"not found: try /metrics, /health/live or /health/ready\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        if path == "/health/live":
            return 200, _JSON, b'{"status": "live"}\n'
        if path == "/health/ready":
            checks = self.readiness()
            ok = all(checks.values())
            return (200 if ok else 503), _JSON, (json.dumps({"ready": ok, "checks": checks}) + "\n").encode()
        return await self._scrape(headers.get("accept", ""))

    def readiness(self) -> dict[str, bool]:
        """/health/ready's checks: the task store is loaded, a router is serving, the daemon is not draining."""
        co = self.daemon.coordinator
        return {
            "store": co is not None and co.scheduler.store.is_open,
            "router": co is not None and co.link.alive,
            "not_draining": co is not None and not co.draining,
        }

    async def _scrape(self, accept: str) -> tuple[int, str, bytes]:
        co = self.daemon.coordinator
        self.collector.router_stats = await co.router_stats() if co is not None and co.link.alive else None
        if self._registry is None:
            from prometheus_client import CollectorRegistry
            from prometheus_client.process_collector import ProcessCollector

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self.collector)
            ProcessCollector(registry=self._registry)
        if "application/openmetrics-text" in accept:
            from prometheus_client.openmetrics import exposition as om

            return 200, om.CONTENT_TYPE_LATEST, om.generate_latest(self._registry)  # type: ignore[no-untyped-call]
        from prometheus_client import exposition

        # Text format 0.0.4, which every Prometheus reads (baton's names need nothing newer).
        return 200, exposition.CONTENT_TYPE_PLAIN_0_0_4, exposition.generate_latest(self._registry)
