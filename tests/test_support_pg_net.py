"""The pg_net stand-in, proved over real loopback HTTP.

`net.http_post` (tests/support/sql/30_pg_net.sql) queues a request and the sender
(tests/support/pg_net.py) delivers it the way pg_net's worker does: only after
commit, at most once, in batches, deleting rows before sending. The service's
design rests on those properties, so they are checked here against a real
receiver rather than assumed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import psycopg
import pytest
from psycopg.types.json import Jsonb
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.pg_net import PgNetSender, running_sender
from tests.support.postgres import Database
from tests.support.servers import bound_socket, serve_in_thread

POST_SQL = "select net.http_post(%s, %s::jsonb, headers := %s::jsonb)"
JSON_HEADERS = {"Content-Type": "application/json"}
# Long enough for several sender polls and wake-ups to have happened.
SETTLE = 0.3


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A tiny webhook endpoint that records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._changed = threading.Condition()
        # Holds /slow open until the test is done with it.
        self.release = threading.Event()
        methods = ["GET", "POST", "DELETE"]
        self.app = Starlette(
            routes=[
                Route("/hook", self._hook, methods=methods),
                Route("/status/{code:int}", self._status, methods=methods),
                Route("/slow", self._slow, methods=methods),
            ]
        )

    async def _record(self, request: Request) -> None:
        received = Received(
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.body(),
        )
        with self._changed:
            self.requests.append(received)
            self._changed.notify_all()

    async def _hook(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"ok": True})

    async def _status(self, request: Request) -> Response:
        await self._record(request)
        return Response(status_code=request.path_params["code"])

    async def _slow(self, request: Request) -> Response:
        import asyncio

        await self._record(request)
        deadline = time.monotonic() + 5
        while not self.release.is_set() and time.monotonic() < deadline:
            if await request.is_disconnected():
                break
            await asyncio.sleep(0.02)
        return JSONResponse({"slow": True})

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"expected {count} requests, got {len(self.requests)}")
            return list(self.requests)

    def snapshot(self) -> list[Received]:
        with self._changed:
            return list(self.requests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.release.set()


@pytest.fixture
def receiver_url(receiver: Receiver) -> Iterator[str]:
    with serve_in_thread(receiver.app) as base:
        try:
            yield base
        finally:
            # Let /slow finish so the server can shut down promptly.
            receiver.release.set()


def post(
    conn: psycopg.Connection[Any],
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> int:
    row = conn.execute(
        POST_SQL, (url, Jsonb(body if body is not None else {}), Jsonb(headers or JSON_HEADERS))
    ).fetchone()
    assert row is not None
    return int(row[0])


def response_row(conn: psycopg.Connection[Any], request_id: int) -> dict[str, Any]:
    cur = conn.execute(
        "select status_code, content_type, headers, content, timed_out, error_msg"
        " from net._http_response where id = %s",
        (request_id,),
    )
    rows = cur.fetchall()
    assert len(rows) == 1, rows
    assert cur.description is not None
    return dict(zip([c.name for c in cur.description], rows[0], strict=True))


def count(conn: psycopg.Connection[Any], table: str) -> int:
    queries = {
        "queue": "select count(*) from net.http_request_queue",
        "responses": "select count(*) from net._http_response",
    }
    row = conn.execute(queries[table]).fetchone()
    assert row is not None
    return int(row[0])


def test_committed_post_arrives_once_with_body_headers_and_method(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    payload = {"type": "INSERT", "table": "q_email_queue", "record": {"msg_id": 1}}
    headers = {**JSON_HEADERS, "Authorization": "Bearer s3cret", "X-Queue": "email_queue"}
    with running_sender(db) as sender, db.connect() as conn:
        request_id = post(conn, f"{receiver_url}/hook", payload, headers)
        sender.wait_idle()
        [got] = receiver.wait_for(1)
        time.sleep(SETTLE)
        assert len(receiver.snapshot()) == 1, "delivered more than once"

        assert got.method == "POST"
        assert got.path == "/hook"
        assert got.json() == payload
        assert got.headers["content-type"] == "application/json"
        assert got.headers["authorization"] == "Bearer s3cret"
        assert got.headers["x-queue"] == "email_queue"
        assert got.headers["user-agent"].startswith("pg_net/")

        row = response_row(conn, request_id)
        assert row["status_code"] == 200
        assert row["content_type"] == "application/json"
        assert json.loads(row["content"]) == {"ok": True}
        assert row["headers"]["content-type"] == "application/json"
        assert row["timed_out"] is False
        assert row["error_msg"] is None
        assert count(conn, "queue") == 0
        assert sender.sent == 1
        assert sender.by_status == {200: 1}
        assert (sender.failed, sender.dropped) == (0, 0)


def test_commit_wakes_the_sender_without_polling(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    # With the fallback poll out of the picture, only LISTEN/NOTIFY can explain a
    # prompt delivery; stopping must not wait out the poll either.
    started = time.monotonic()
    with running_sender(db, poll_interval=60) as sender, db.connect() as conn:
        time.sleep(SETTLE)  # the sender is now parked on LISTEN
        post(conn, f"{receiver_url}/hook", {"n": 1})
        receiver.wait_for(1, timeout=5)
        sender.wait_idle()
    assert time.monotonic() - started < 10


def test_sends_only_after_commit_and_never_after_rollback(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    url = f"{receiver_url}/hook"
    with running_sender(db) as sender, db.connect() as conn:
        with conn.transaction():
            post(conn, url, {"n": "committed"})
            time.sleep(SETTLE)
            assert receiver.snapshot() == []
            assert sender.stats().taken == 0
        assert [r.json() for r in receiver.wait_for(1)] == [{"n": "committed"}]

        with conn.transaction():
            rolled_back = post(conn, url, {"n": "rolled back"})
            raise psycopg.Rollback()
        sender.wait_idle()
        time.sleep(SETTLE)
        assert [r.json() for r in receiver.snapshot()] == [{"n": "committed"}]
        assert conn.execute(
            "select count(*) from net._http_response where id = %s", (rolled_back,)
        ).fetchone() == (0,)
        assert sender.stats().taken == 1


def test_rows_are_deleted_before_sending_and_never_retried(
    db: Database, receiver: Receiver
) -> None:
    # A port nothing listens on: the receiver is down.
    sock = bound_socket()
    port = sock.getsockname()[1]
    sock.close()
    with running_sender(db) as sender, db.connect() as conn:
        lost = post(conn, f"http://127.0.0.1:{port}/hook", {"n": 1})
        sender.wait_idle()
        assert count(conn, "queue") == 0
        row = response_row(conn, lost)
        assert row["status_code"] is None
        assert row["timed_out"] is False
        assert row["error_msg"] == "Couldn't connect to server"
        assert sender.failed == 1

        # The receiver comes back on that very port: the lost request stays lost,
        # while a new one goes through.
        with serve_in_thread(receiver.app, port=port) as base:
            time.sleep(SETTLE)
            assert receiver.snapshot() == []
            post(conn, f"{base}/hook", {"n": 2})
            sender.wait_idle()
            assert [r.json() for r in receiver.wait_for(1)] == [{"n": 2}]
        assert sender.stats().taken == 2


def test_timeout_is_recorded_as_timed_out(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    with running_sender(db) as sender, db.connect() as conn:
        started = time.monotonic()
        row = conn.execute(
            "select net.http_post(%s, '{}'::jsonb, timeout_milliseconds := 200)",
            (f"{receiver_url}/slow",),
        ).fetchone()
        assert row is not None
        sender.wait_idle()
        # The receiver holds the request for seconds; the sender gave up at 200 ms.
        assert time.monotonic() - started < 2
        assert len(receiver.wait_for(1)) == 1

        result = response_row(conn, row[0])
        assert result["timed_out"] is True
        assert result["status_code"] is None
        assert result["error_msg"].startswith("Timeout of 200 ms reached")
        assert (sender.failed, sender.timed_out, sender.sent) == (1, 1, 0)


def test_non_2xx_status_is_recorded_and_not_retried(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    with running_sender(db) as sender, db.connect() as conn:
        request_id = post(conn, f"{receiver_url}/status/503", {"n": 1})
        sender.wait_idle()
        time.sleep(SETTLE)
        assert len(receiver.snapshot()) == 1
        row = response_row(conn, request_id)
        assert row["status_code"] == 503
        assert row["content"] is None  # empty body
        assert sender.by_status == {503: 1}


def test_batches_deliver_everything_at_most_batch_size_per_pass(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    with running_sender(db, batch_size=5) as sender, db.connect() as conn:
        # One transaction, one wake-up, 23 rows.
        conn.execute(
            "select net.http_post(%s, jsonb_build_object('n', g)) from generate_series(1, 23) g",
            (f"{receiver_url}/hook",),
        )
        sender.wait_idle()
        received = receiver.wait_for(23)
        time.sleep(SETTLE)
        assert len(receiver.snapshot()) == 23
        assert sorted(r.json()["n"] for r in received) == list(range(1, 24))

        batches = sender.batches
        assert sum(batches) == 23
        assert max(batches) <= 5
        assert len(batches) >= 5
        assert conn.execute(
            "select count(*) from net._http_response where status_code = 200"
        ).fetchone() == (23,)


def test_drop_rate_one_drops_everything(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    with running_sender(db, drop_rate=1.0, seed=1) as sender, db.connect() as conn:
        conn.execute(
            "select net.http_post(%s, jsonb_build_object('n', g)) from generate_series(1, 10) g",
            (f"{receiver_url}/hook",),
        )
        sender.wait_idle()
        time.sleep(SETTLE)
        assert receiver.snapshot() == []
        assert count(conn, "queue") == 0
        # A dropped request leaves no response row, like pg_net's real losses.
        assert count(conn, "responses") == 0
        assert (sender.dropped, sender.sent, sender.failed) == (10, 0, 0)


def _drop_run(db: Database, receiver: Receiver, url: str, run: int, seed: int) -> set[int]:
    with running_sender(db, drop_rate=0.3, seed=seed) as sender, db.connect() as conn:
        conn.execute(
            "select net.http_post(%s, jsonb_build_object('run', %s::int, 'n', g))"
            " from generate_series(1, 100) g",
            (url, run),
        )
        sender.wait_idle()
        stats = sender.stats()
    delivered = {r.json()["n"] for r in receiver.snapshot() if r.json()["run"] == run}
    assert stats.dropped + stats.sent == 100
    assert len(delivered) == stats.sent
    assert 15 <= stats.dropped <= 45
    return delivered


def test_fractional_drop_rate_is_seeded(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    url = f"{receiver_url}/hook"
    first = _drop_run(db, receiver, url, run=1, seed=1234)
    second = _drop_run(db, receiver, url, run=2, seed=1234)
    assert first == second


def test_params_become_a_query_string(db: Database, receiver: Receiver, receiver_url: str) -> None:
    with running_sender(db) as sender, db.connect() as conn:
        for url in (f"{receiver_url}/hook", f"{receiver_url}/hook?z=0"):
            conn.execute(
                "select net.http_post(%s, params := %s::jsonb)",
                (url, Jsonb({"a": "1", "b": "two"})),
            )
        sender.wait_idle()
        queries = [parse_qs(r.query) for r in receiver.wait_for(2)]
    assert {"a": ["1"], "b": ["two"]} in queries
    assert {"a": ["1"], "b": ["two"], "z": ["0"]} in queries


def test_content_type_other_than_json_is_rejected(db: Database) -> None:
    with db.connect() as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="Content-Type header must be"):
            post(conn, "http://127.0.0.1:9/hook", {}, {"Content-Type": "text/plain"})
        assert count(conn, "queue") == 0


def test_sender_counters_start_at_zero(db: Database) -> None:
    sender = PgNetSender(db)
    stats = sender.stats()
    assert (stats.sent, stats.dropped, stats.failed, stats.taken) == (0, 0, 0, 0)
    with pytest.raises(ValueError):
        PgNetSender(db, drop_rate=1.5)
