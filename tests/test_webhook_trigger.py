"""The webhook trigger refuses Vault values that would split a header on pg_net's wire.

Real pg_net sends a header value as it is, CR and LF included (the stand-in does the
same, tests/test_support_pg_net.py), so `queue_worker.notify_webhook()`
(supabase/migrations/20261201001000_webhook_refuses_control_characters.sql) checks
the URL and the secret it is about to use: a control character, or a URL that is
not a plausible http(s) base URL, means a WARNING naming the Vault secret (never its
value) and no request at all. The insert still succeeds, and the sweeper takes the
message.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import ServiceFactory
from tests.support.pg_net import running_sender
from tests.support.postgres import Database
from tests.support.servers import serve_in_thread
from tests.support.settings import new_webhook_secret
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_e2e import queue_rows
from tests.test_security import JOB, whsec

SETTLE = 0.5


def store(db: Database, **values: str) -> None:
    with db.connect() as conn:
        conn.execute("delete from vault.secrets where name like 'queue_worker_%'")
        for name, value in values.items():
            conn.execute("select vault.create_secret(%s, %s)", [value, name])


def enqueue_noting_warnings(db: Database) -> list[str]:
    """Enqueues JOB as the migrations' owner would; returns the WARNINGs it raised."""
    warnings: list[str] = []

    def note(diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized == "WARNING":
            warnings.append(diag.message_primary or "")

    with db.connect(role="qw_postgres") as conn:
        conn.add_notice_handler(note)
        conn.execute("select pgmq.send('email_queue', %s)", [psycopg.types.json.Jsonb(JOB)])
    return warnings


def requests_queued(db: Database) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return conn.execute("select url, headers from net.http_request_queue").fetchall()


class Recorder:
    """Whatever sits at the Vault URL: records the headers of every request."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self.app = Starlette(routes=[Route("/webhooks/{queue}", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> JSONResponse:
        with self._lock:
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
        return JSONResponse({"status": "accepted"}, status_code=202)

    def seen(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.headers)


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    r = Recorder()
    with serve_in_thread(r.app) as url:
        yield r, url


def test_a_bearer_secret_pasted_with_its_newline_sends_nothing_and_the_sweeper_delivers(
    db: Database, start_service: ServiceFactory, smtp: SmtpServer
) -> None:
    secret = new_webhook_secret()
    service = start_service(register=False, webhook_secret=secret, sweep_interval_seconds=0.3)
    store(db, queue_worker_url=service.url, queue_worker_webhook_secret=secret + "\n")
    with running_sender(db) as sender:
        warnings = enqueue_noting_warnings(db)
        assert requests_queued(db) == []  # nothing for pg_net to send
        [mail] = smtp.wait_for(1, timeout=10)  # the sweeper found the message
        wait_until(lambda: queue_rows(db) == [], what="the message to be deleted")
        sender.wait_idle()
        assert sender.stats().taken == 0
    assert mail["Subject"] == JOB["subject"]
    [warning] = warnings
    assert "webhook for pgmq.q_email_queue not sent" in warning
    assert "queue_worker_webhook_secret holds a control character" in warning
    assert secret not in warning


@pytest.mark.parametrize("form", ["bearer", "signing"])
@pytest.mark.parametrize(
    "suffix",
    ["\r\nX-Injected: 1", "\nX-Injected: 1", "\rX-Injected: 1", "\x0bX-Injected: 1"],
    ids=["crlf", "lf", "cr", "vt"],
)
def test_an_injected_header_never_reaches_the_url(
    db: Database, recorder: tuple[Recorder, str], form: str, suffix: str
) -> None:
    seen, url = recorder
    secret = new_webhook_secret() if form == "bearer" else whsec()
    name = "queue_worker_webhook_secret" if form == "bearer" else "queue_worker_signing_secret"
    with running_sender(db) as sender:
        # A clean secret first: the webhook goes through, so the one after is a fair test.
        store(db, queue_worker_url=url, **{name: secret})
        assert enqueue_noting_warnings(db) == []
        wait_until(lambda: len(seen.seen()) == 1, what="the clean webhook")
        store(db, queue_worker_url=url, **{name: secret + suffix})
        [warning] = enqueue_noting_warnings(db)
        sender.wait_idle()
    assert f"{name} holds a control character" in warning
    assert secret not in warning
    assert len(seen.seen()) == 1
    assert all("x-injected" not in headers for headers in seen.seen())


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9\n",
        "http://127.0.0.1:9/\r\nX-Injected: 1",
        "http://127.0.0.1:9/\tbase",
        "http://127.0.0.1:9/\x7f",
        "http://127.0.0.1:9/\u2028",
        " http://127.0.0.1:9",
        "http://127.0.0.1:9/a b",
        "ftp://127.0.0.1:9",
        "127.0.0.1:9",
        "javascript:alert(1)",
        "http://user:pw@127.0.0.1:9",
        "http://127.0.0.1:9/?a=1",
        "http://127.0.0.1:9/#top",
        "http://",
        "http://-bad-.example.com",
        "http://127.0.0.1:123456",
        "http://example.com/" + "a" * 2048,
    ],
)
def test_an_implausible_url_sends_nothing_and_names_the_secret(db: Database, url: str) -> None:
    store(db, queue_worker_url=url, queue_worker_webhook_secret=new_webhook_secret())
    [warning] = enqueue_noting_warnings(db)
    assert "Vault secret queue_worker_url " in warning
    assert "127.0.0.1" not in warning and "example.com" not in warning  # never the value
    assert requests_queued(db) == []
    assert len(queue_rows(db)) == 1  # the insert itself succeeded


@pytest.mark.parametrize(
    ("url", "sent_to"),
    [
        ("http://127.0.0.1:9", "http://127.0.0.1:9/webhooks/email_queue"),
        ("https://Worker.Example.com/", "https://Worker.Example.com/webhooks/email_queue"),
        ("HTTPS://example.com/base/path", "HTTPS://example.com/base/path/webhooks/email_queue"),
        ("http://[::1]:8000/q-w_1.~%20", "http://[::1]:8000/q-w_1.~%20/webhooks/email_queue"),
        ("http://localhost", "http://localhost/webhooks/email_queue"),
    ],
)
def test_a_plausible_url_still_gets_its_webhook(db: Database, url: str, sent_to: str) -> None:
    store(db, queue_worker_url=url, queue_worker_webhook_secret=new_webhook_secret())
    assert enqueue_noting_warnings(db) == []
    [(queued_url, _)] = requests_queued(db)
    assert queued_url == sent_to


def test_an_overlong_secret_sends_nothing(db: Database) -> None:
    store(db, queue_worker_url="http://127.0.0.1:9", queue_worker_webhook_secret="s" * 4097)
    [warning] = enqueue_noting_warnings(db)
    assert "queue_worker_webhook_secret is longer than 4096 characters" in warning
    assert requests_queued(db) == []


def test_an_unused_bearer_secret_does_not_stop_a_signed_webhook(db: Database) -> None:
    # With a signing secret the bearer secret is not sent, so it is not checked.
    store(
        db,
        queue_worker_url="http://127.0.0.1:9",
        queue_worker_signing_secret=whsec(),
        queue_worker_webhook_secret="left over\n",
    )
    assert enqueue_noting_warnings(db) == []
    [(_, headers)] = requests_queued(db)
    assert "Authorization" not in headers
    assert headers["webhook-signature"].startswith("v1,")
