"""HTTP limits of the service as `queue-worker` serves it (app/server.py), through raw sockets.

The service runs as a real process started by the console script's code (app.cli),
so the uvicorn configuration under test is the one that ships. Requests are written
byte by byte on loopback sockets: an HTTP library would refuse to send most of them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import ConfigError, Settings, load_settings
from app.server import HttpLimits
from tests.conftest import MAIL_FROM, register_in_vault
from tests.support.pg_net import PgNetSender
from tests.support.postgres import Database
from tests.support.process import ServiceProcess, service_process
from tests.support.rpc_gateway import GatewayHandle
from tests.support.settings import settings_against
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_e2e import enqueue, queue_rows

TIMEOUT = 1.0  # header, body and keep-alive deadlines of the `limited` service
CAP = 40  # its connection cap
# Deadlines fire on the service's event loop; on a busy shared machine they may be late.
SLACK = 4.0


def _settings(gateway: GatewayHandle, smtp: SmtpServer, **overrides: Any) -> Settings:
    return settings_against(
        gateway,
        smtp,
        mail_from=MAIL_FROM,
        sweep_interval_seconds=3600,
        shutdown_grace_seconds=5,
        log_format="json",
        **overrides,
    )


@pytest.fixture(scope="module")
def limited(gateway: GatewayHandle, smtp_server: SmtpServer) -> Iterator[ServiceProcess]:
    """The service with short deadlines, the other limits at their defaults."""
    settings = _settings(
        gateway,
        smtp_server,
        http_header_timeout_seconds=TIMEOUT,
        http_body_timeout_seconds=TIMEOUT,
        http_keepalive_seconds=1,
    )
    with service_process(settings, console_script=True) as process:
        yield process


@pytest.fixture(scope="module")
def capped(gateway: GatewayHandle, smtp_server: SmtpServer) -> Iterator[ServiceProcess]:
    """The service with a small connection cap and patient deadlines."""
    settings = _settings(gateway, smtp_server, http_max_connections=CAP)
    with service_process(settings, console_script=True) as process:
        yield process


# -- raw HTTP -------------------------------------------------------------------------


def connect(process: ServiceProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", process.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (or resets it)."""
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(raw: bytes) -> int | None:
    if not raw.startswith(b"HTTP/1.1 "):
        return None
    return int(raw[9:12])


def header_names(raw: bytes) -> set[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {line.partition(":")[0].strip().lower() for line in head}


def exchange(process: ServiceProcess, request: bytes) -> bytes:
    """Sends one request with `Connection: close` semantics and reads the answer."""
    with connect(process) as sock:
        sock.sendall(request)
        return read_until_closed(sock)


def get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def log_lines(process: ServiceProcess) -> list[dict[str, Any]]:
    lines = []
    for text in process.log_path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            lines.append({"level": "raw", "message": text})
    return lines


# -- headers ------------------------------------------------------------------------


def test_a_64_mb_header_is_refused_without_reading_it(limited: ServiceProcess) -> None:
    for _ in range(20):  # warm up, so that the peak below is the attack's own
        assert status_of(exchange(limited, get("/health"))) == 200
    before = peak_rss_kib(limited.pid)
    sent = 0
    answer = b""
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        chunk = b"a" * (1024 * 1024)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            while sent < 64 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        answer = read_until_closed(sock)
    grown_kib = peak_rss_kib(limited.pid) - before
    # The service answered 431 and closed long before the 64 MB were through (the
    # kernel's socket buffers hold a few MB of what was "sent").
    assert status_of(answer) == 431 or (answer == b"" and sent < 32 * 1024 * 1024), answer[:80]
    assert grown_kib < 5 * 1024, f"peak RSS grew by {grown_kib} KiB"
    assert status_of(exchange(limited, get("/health"))) == 200


def test_ten_thousand_headers_get_431(limited: ServiceProcess) -> None:
    headers = [f"X-H{n}: v" for n in range(10_000)]
    answer = exchange(limited, get("/health", *headers))
    assert status_of(answer) == 431


@pytest.mark.parametrize(("fields", "status"), [(98, 200), (99, 431)])
def test_more_than_100_header_fields_get_431(
    limited: ServiceProcess, fields: int, status: int
) -> None:
    # Host and Connection count too: 98 + 2 = 100 fields pass, one more does not.
    headers = [f"X-H{n}: v" for n in range(fields)]
    assert status_of(exchange(limited, get("/health", *headers))) == status


@pytest.mark.parametrize(("size", "status"), [(15_000, 200), (17_000, 431)])
def test_a_header_block_over_16_kib_gets_431(
    limited: ServiceProcess, size: int, status: int
) -> None:
    answer = exchange(limited, get("/health", "X-Big: " + "a" * size))
    assert status_of(answer) == status


def test_a_request_line_over_16_kib_gets_414(limited: ServiceProcess) -> None:
    assert status_of(exchange(limited, get("/health?" + "a" * 20_000))) == 414


# -- deadlines ----------------------------------------------------------------------


def test_connections_trickling_their_headers_are_closed_after_the_timeout(
    limited: ServiceProcess,
) -> None:
    # 300 slow-loris connections: the request line at once, then a byte a while.
    started = time.monotonic()
    socks = [connect(limited) for _ in range(300)]
    closed_at: dict[int, float] = {}
    answers: dict[int, bytes] = {}
    try:
        for sock in socks:
            sock.sendall(b"POST /webhooks/email_queue HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sock.setblocking(False)
        while len(closed_at) < len(socks) and time.monotonic() - started < TIMEOUT + SLACK:
            for n, sock in enumerate(socks):
                if n in closed_at:
                    continue
                with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                    sock.send(b"a")
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                answers[n] = answers.get(n, b"") + data
                if not data or data.endswith(b"not complete within 1s"):
                    closed_at[n] = time.monotonic() - started
            time.sleep(0.05)
    finally:
        for sock in socks:
            sock.close()
    assert len(closed_at) == len(socks), f"{len(socks) - len(closed_at)} still open"
    assert min(closed_at.values()) >= TIMEOUT * 0.9
    assert {status_of(a) for a in answers.values()} == {408}
    assert status_of(exchange(limited, get("/health"))) == 200


def test_a_connection_that_sends_nothing_is_closed(limited: ServiceProcess) -> None:
    with connect(limited) as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""  # nothing to answer: just closed
        assert TIMEOUT * 0.9 <= time.monotonic() - started < TIMEOUT + SLACK


def test_an_idle_keep_alive_connection_is_closed(limited: ServiceProcess) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        started = time.monotonic()
        answer = read_until_closed(sock)
        assert status_of(answer) == 200
        assert 0.9 <= time.monotonic() - started < 4  # HTTP_KEEPALIVE_SECONDS=1, not 5


def test_a_body_that_stops_arriving_is_closed_after_the_timeout(limited: ServiceProcess) -> None:
    with connect(limited) as sock:
        sock.sendall(
            b"POST /webhooks/email_queue HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"type"'
        )
        started = time.monotonic()
        answer = read_until_closed(sock)
        assert status_of(answer) == 408
        assert answer.endswith(b"request body not complete within 1s")
        assert TIMEOUT * 0.9 <= time.monotonic() - started < TIMEOUT + SLACK


def test_a_client_that_disconnects_mid_body_is_one_info_line(limited: ServiceProcess) -> None:
    # Authenticated, so that the route would read the body (an unauthenticated
    # request is refused without it).
    bearer = limited.settings.webhook_secret.get_secret_value().encode()
    before = len(log_lines(limited))
    with connect(limited) as sock:
        sock.sendall(
            b"POST /webhooks/email_queue HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + bearer + b"\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"type": "IN'
        )
        time.sleep(0.2)  # the service has the headers and is reading the body

    # This request's lines: the body it sent is 12 bytes. (The previous test's request,
    # closed by the body deadline, says the same with its own count, and under load its
    # line may come after `before` was taken.)
    def disconnects() -> list[dict[str, Any]]:
        return [
            line
            for line in log_lines(limited)[before:]
            if "disconnect" in line["message"] and line.get("received") == 12
        ]

    wait_until(disconnects, what="the disconnect to be logged")
    time.sleep(0.5)  # anything else it would log about this request is out by now
    new = log_lines(limited)[before:]
    lines = disconnects()
    assert [line["message"] for line in lines] == [
        "client disconnected before its request body was complete"
    ]
    [line] = lines
    assert line["level"] == "info"
    assert (line["path"], line["received"]) == ("/webhooks/email_queue", 12)
    assert not [entry for entry in new if entry["level"] in ("error", "critical", "raw")], new
    assert not [entry for entry in new if "exception" in entry], new


# -- the connection cap --------------------------------------------------------------


def test_connections_beyond_the_cap_get_503_and_are_closed(capped: ServiceProcess) -> None:
    held = [connect(capped) for _ in range(CAP)]
    try:
        # The service has taken every one of them (a request on the last one is answered).
        held[-1].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        held[-1].settimeout(10)
        assert status_of(held[-1].recv(65536)) == 200
        refused = exchange(capped, get("/health"))
        assert status_of(refused) == 503
        assert refused.endswith(b"Too many connections")
        for sock in held[:5]:
            sock.close()
        # Room again: served as soon as the service has seen the closes.
        wait_until(
            lambda: status_of(exchange(capped, get("/health"))) == 200,
            what="a connection to be accepted again",
        )
    finally:
        for sock in held:
            sock.close()


# -- what every answer looks like ----------------------------------------------------


def test_no_answer_names_the_server(limited: ServiceProcess, capped: ServiceProcess) -> None:
    answers = {
        "health": exchange(limited, get("/health")),
        "not found": exchange(limited, get("/nope")),
        "unauthenticated webhook": exchange(
            limited,
            b"POST /webhooks/email_queue HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        ),
        "too many headers": exchange(limited, get("/health", *[f"X-{n}: v" for n in range(200)])),
        "invalid request": exchange(limited, b"NOT HTTP AT ALL\r\n\r\n"),
    }
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        answers["header timeout"] = read_until_closed(sock)
    held = [connect(capped) for _ in range(CAP)]
    try:
        time.sleep(0.3)
        answers["connection cap"] = exchange(capped, get("/health"))
    finally:
        for sock in held:
            sock.close()
    statuses = {name: status_of(raw) for name, raw in answers.items()}
    assert statuses == {
        "health": 200,
        "not found": 404,
        "unauthenticated webhook": 401,
        "too many headers": 431,
        "invalid request": 400,
        "header timeout": 408,
        "connection cap": 503,
    }
    for name, raw in answers.items():
        assert "server" not in header_names(raw), name


# -- and webhooks still work -----------------------------------------------------------


def test_a_webhook_is_delivered_and_processed(
    db: Database, limited: ServiceProcess, sender: PgNetSender, smtp: SmtpServer
) -> None:
    register_in_vault(db, limited.url, limited.settings.webhook_secret.get_secret_value())
    enqueue(db, {"to": "a@example.com", "subject": "Through the limits", "text": "x"})
    [mail] = smtp.wait_for(1, timeout=10)
    assert mail["Subject"] == "Through the limits"
    wait_until(lambda: queue_rows(db) == [], what="the message to be deleted")
    sender.wait_idle()
    assert sender.by_status == {202: 1}


def test_concurrent_webhook_bursts_fit_under_the_default_cap(
    db: Database, limited: ServiceProcess, sender: PgNetSender, smtp: SmtpServer
) -> None:
    # pg_net sends a whole pass of up to 200 requests at once, each on its own
    # connection: the default cap (1000) leaves room for that.
    register_in_vault(db, limited.url, limited.settings.webhook_secret.get_secret_value())
    with db.connect(role="qw_postgres") as conn:
        conn.execute(
            "select pgmq.send('email_queue', jsonb_build_object('to', 'b' || g || "
            "'@example.com', 'subject', 'Burst ' || g, 'text', 'x')) from generate_series(1, 200) g"
        )
    smtp.wait_for(200, timeout=60)
    sender.wait_idle()
    assert sender.stats().batches == (200,)
    assert set(sender.by_status) <= {202}


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HTTP_MAX_HEADER_BYTES", "100"),
        ("HTTP_MAX_HEADERS", "0"),
        ("HTTP_HEADER_TIMEOUT_SECONDS", "0"),
        ("HTTP_BODY_TIMEOUT_SECONDS", "-1"),
        ("HTTP_KEEPALIVE_SECONDS", "0"),
        ("HTTP_MAX_CONNECTIONS", "0"),
    ],
)
def test_limits_out_of_range_are_refused_at_start(
    gateway: GatewayHandle, smtp_server: SmtpServer, variable: str, value: str
) -> None:
    values = dict(_settings(gateway, smtp_server))
    values[variable.lower()] = value
    with pytest.raises(ConfigError, match=variable):
        load_settings(_env_file=None, **values)


def test_the_defaults_are_the_documented_ones() -> None:
    limits = HttpLimits.from_settings(Settings.model_construct())
    assert limits == HttpLimits(
        max_header_bytes=16384,
        max_headers=100,
        header_timeout=10.0,
        body_timeout=60.0,
        max_connections=1000,
    )
    assert Settings.model_fields["http_keepalive_seconds"].default == 5
