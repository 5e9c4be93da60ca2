"""The HTTP server: uvicorn as `queue-worker` runs it, with the limits a public endpoint needs.

The service faces the internet (pg_net, the manual API), and uvicorn's httptools
protocol bounds none of what a hostile client controls: one 64 MB header was read
whole (httptools' llhttp has no header limit, and its Python layer concatenates a
value's pieces), 10,000 headers were accepted, and connections that trickled their
headers at a byte a second stayed open for good. uvicorn's own options do not reach
there (`h11_max_incomplete_event_size` is h11's, and h11 answers 400, not 431;
`limit_concurrency` answers 503 only once a request's headers are complete;
`timeout_keep_alive` runs only between requests), and an ASGI middleware sees a
request only after its headers are complete. So `LimitedHttpToolsProtocol` keeps
httptools (the C parser) and adds, per connection:

* a bound on the header block: at most HTTP_MAX_HEADER_BYTES (request line and
  headers, counted as they arrive, so at most one read beyond it is ever buffered)
  and HTTP_MAX_HEADERS fields: **431** and the connection closed;
* a deadline for the headers, HTTP_HEADER_TIMEOUT_SECONDS from the connection or the
  request's first byte, and one for the body, HTTP_BODY_TIMEOUT_SECONDS after the
  headers: **408** and closed (a connection that sent nothing is just closed);
* a cap of HTTP_MAX_CONNECTIONS open connections per process: beyond it a new
  connection gets **503** and is closed at once, before it is read.

Idle keep-alive connections close after HTTP_KEEPALIVE_SECONDS (uvicorn's
`timeout_keep_alive`), and no answer carries `Server: uvicorn`. These refusals are
logged as one warning line per 10 seconds at most, with counts, so a flood does not
flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState
from uvicorn.supervisors import Multiprocess

from app.config import Settings
from app.main import create_app

log = logging.getLogger(__name__)

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# uvicorn's exit status when the app failed to start (its lifespan raised).
STARTUP_FAILURE = 3
# At most one summary line of refused or closed connections per this many seconds.
REFUSAL_LOG_SECONDS = 10.0


@dataclass(frozen=True)
class HttpLimits:
    """What one request and one process may take; the defaults are the settings'."""

    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 1000

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.http_max_header_bytes,
            max_headers=settings.http_max_headers,
            header_timeout=settings.http_header_timeout_seconds,
            body_timeout=settings.http_body_timeout_seconds,
            max_connections=settings.http_max_connections,
        )


class RefusalLog:
    """Counts refused and closed connections; logs a summary at most every `every` s."""

    def __init__(self, every: float = REFUSAL_LOG_SECONDS) -> None:
        self.every = every
        self._counts: Counter[str] = Counter()
        self._last = -every
        self._flush: asyncio.TimerHandle | None = None

    def note(self, reason: str, loop: asyncio.AbstractEventLoop) -> None:
        self._counts[reason] += 1
        wait = self._last + self.every - time.monotonic()
        if wait <= 0:
            self.flush()
        elif self._flush is None:
            self._flush = loop.call_later(wait, self.flush)

    def flush(self) -> None:
        self._flush = None
        if self._counts:
            log.warning(
                "HTTP connections refused or closed by the server's limits",
                extra={"connections": dict(self._counts)},
            )
            self._counts.clear()
        self._last = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with the config into each worker process: start empty there.
        return {"every": self.every}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["every"])  # type: ignore[misc]


class ServerConfig(uvicorn.Config):
    """uvicorn's Config, carrying the limits `LimitedHttpToolsProtocol` reads."""

    def __init__(self, app: Any, *, limits: HttpLimits, **options: Any) -> None:
        self.limits = limits
        self.refusals = RefusalLog()
        super().__init__(app, http=LimitedHttpToolsProtocol, **options)


class _Phase(enum.Enum):
    IDLE = "idle"  # between requests, or a request's app still running
    HEADERS = "headers"  # inside a request line and its headers
    BODY = "body"  # headers complete, body still arriving


class _HeadersTooLarge(Exception):
    """Raised in a parser callback to stop parsing; httptools wraps it."""


def _headers_larger_than(limit: int) -> str:
    return f"request headers larger than {limit} bytes"


def _plain_response(status: int, text: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    body = text.encode()
    lines = [STATUS_LINE[status]]
    lines += [name + b": " + value + b"\r\n" for name, value in default_headers]
    lines += [
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        b"connection: close\r\n",
        b"\r\n",
        body,
    ]
    return b"".join(lines)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded headers, deadlines and a connection cap."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if isinstance(config, ServerConfig):
            self.limits, self.refusals = config.limits, config.refusals
        else:
            self.limits, self.refusals = HttpLimits(), RefusalLog()
        self._phase = _Phase.IDLE
        self._streamed = 0  # bytes received while the header block is incomplete
        self._header_size = 0  # request line and headers parsed so far
        self._header_count = 0
        self._too_large: tuple[int, str] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_phase: _Phase | None = None
        self._done = False  # refused or closed by a limit: ignore whatever follows

    # -- connection --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.server_state.connections) >= self.limits.max_connections:
            self._done = True
            self.transport = transport
            transport.write(
                _plain_response(503, "Too many connections", self.server_state.default_headers)
            )
            transport.close()
            self.refusals.note("503 too many connections", self.loop)
            return
        super().connection_made(transport)
        # A new connection must deliver its first request's headers in time.
        self._arm(_Phase.HEADERS)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.flow is None:  # refused in connection_made: uvicorn never knew it
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._unset_keepalive_if_required()
        if self._phase is not _Phase.BODY:
            self._streamed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._done = True
            if self._too_large is not None:
                self._refuse(*self._too_large)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._phase is _Phase.HEADERS and self._streamed > self.limits.max_header_bytes:
            self._refuse(431, _headers_larger_than(self.limits.max_header_bytes))
            return
        self._rearm()

    # -- parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _Phase.HEADERS
        self._header_size = 0
        self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self._header_size += len(url)
        if self._header_size > self.limits.max_header_bytes:
            self._stop_parsing(
                414, f"request line longer than {self.limits.max_header_bytes} bytes"
            )
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_size += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_count > self.limits.max_headers:
            self._stop_parsing(431, f"more than {self.limits.max_headers} request header fields")
        if self._header_size > self.limits.max_header_bytes:
            self._stop_parsing(431, _headers_larger_than(self.limits.max_header_bytes))
        super().on_header(name, value)

    def _stop_parsing(self, status: int, reason: str) -> NoReturn:
        # httptools turns an exception in a callback into HttpParserError, which
        # data_received() catches; the reason travels here.
        self._too_large = (status, reason)
        raise _HeadersTooLarge(reason)

    def on_headers_complete(self) -> None:
        self._phase = _Phase.BODY
        self._streamed = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = _Phase.IDLE
        super().on_message_complete()

    # -- deadlines -------------------------------------------------------------------

    def _rearm(self) -> None:
        """After each read: the deadline of the phase the connection is now in."""
        if self._phase is _Phase.BODY:
            if self._timer_phase is not _Phase.BODY:
                self._arm(_Phase.BODY)
        elif self._phase is _Phase.HEADERS:
            if self._timer is None:
                self._arm(_Phase.HEADERS)
        elif self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the app has the request; its own timeouts apply
        elif self._timer is None:
            # Bytes that began no request (blank lines): the next one must come in time.
            self._arm(_Phase.HEADERS)

    def _arm(self, phase: _Phase) -> None:
        self._disarm()
        seconds = self.limits.body_timeout if phase is _Phase.BODY else self.limits.header_timeout
        self._timer = self.loop.call_later(seconds, self._expired, phase)
        self._timer_phase = phase

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_phase = None

    def _expired(self, phase: _Phase) -> None:
        self._timer = self._timer_phase = None
        if self._done or self.transport.is_closing():
            return
        if phase is _Phase.BODY:
            self._refuse(408, f"request body not complete within {self.limits.body_timeout:g}s")
        elif self._phase is _Phase.HEADERS:
            self._refuse(
                408, f"request headers not complete within {self.limits.header_timeout:g}s"
            )
        else:
            # Connected (or between requests) and never started a request: just close.
            self._done = True
            self.transport.close()
            self.refusals.note("closed: no request", self.loop)

    def _refuse(self, status: int, reason: str) -> None:
        """Answers `status` unless another response is under way, and closes."""
        self._done = True
        self._disarm()
        cycle = self.cycle
        writable = (
            cycle is None
            or cycle.response_complete
            or (self._phase is _Phase.BODY and not cycle.response_started)
        )
        if writable:
            self.transport.write(_plain_response(status, reason, self.server_state.default_headers))
        self.transport.close()
        self.refusals.note(f"{status} {reason}", self.loop)


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for `queue-worker`, the limits aside.

    uvloop when installed (`uvicorn[standard]`), else the asyncio loop. No access log:
    a line per webhook costs more than the webhook itself at volume, and the metrics
    count every request. No `Server` header: it tells a scanner what to try.
    """
    return {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop" if _available("uvloop") else "asyncio",
        "ws": "none",
        "access_log": False,
        "server_header": False,
        "log_config": None,
        "proxy_headers": True,
        "timeout_keep_alive": settings.http_keepalive_seconds,
        "timeout_graceful_shutdown": 30,
        # With WORKERS > 1 each worker process first imports `app.cli`, the parent's
        # main module, and answers the supervisor's pings only after that; uvicorn's
        # 5 s killed every worker while the import took longer on a busy machine.
        "timeout_worker_healthcheck": 30,
    }


def prepare_multiprocess_metrics() -> Path:
    """An empty directory for prometheus-client's multiprocess mode.

    Files left by an earlier run would add old counts to the new ones, so the
    directory is emptied at every start (PROMETHEUS_MULTIPROC_DIR, or a fresh
    temporary directory).
    """
    configured = os.environ.get(MULTIPROC_VARIABLE)
    path = (
        Path(configured) if configured else Path(tempfile.mkdtemp(prefix="queue-worker-metrics-"))
    )
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_VARIABLE] = str(path)
    return path


def serve(settings: Settings) -> None:
    """Serves the app on HOST:PORT until a signal stops it; WORKERS processes if > 1."""
    limits = HttpLimits.from_settings(settings)
    if settings.workers == 1:
        config = ServerConfig(create_app(settings), limits=limits, **server_options(settings))
        server = uvicorn.Server(config)
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
        if not server.started:
            raise SystemExit(STARTUP_FAILURE)
        return
    prepare_multiprocess_metrics()
    # Worker processes import the app by name, each reading the same settings.
    config = ServerConfig(
        "app.main:app", limits=limits, workers=settings.workers, **server_options(settings)
    )
    with contextlib.suppress(KeyboardInterrupt):
        Multiprocess(config, sockets=[config.bind_socket()]).run()
