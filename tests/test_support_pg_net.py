"""The pg_net stand-in, proved over real loopback HTTP.

`net.http_post` (tests/support/sql/30_pg_net.sql) queues a request and the sender
(tests/support/pg_net.py) delivers it the way pg_net's worker does: only after
commit, at most once, in passes of up to 200 about a second apart, deleting rows
before sending, on curl's wire. The service's design rests on those properties, and
each fact measured against a real pg_net 0.20 build (../shared/SUPABASE-FACTS.md)
is checked here against a real receiver rather than assumed.
"""

from __future__ import annotations

import itertools
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

from tests.support.pg_net import DEFAULT_PAUSE, PgNetSender, running_sender
from tests.support.postgres import Database
from tests.support.servers import bound_socket, serve_in_thread
from tests.support.waiting import wait_until

POST_SQL = "select net.http_post(%s, %s::jsonb, headers := %s::jsonb)"
JSON_HEADERS = {"Content-Type": "application/json"}
# Long enough for wake-ups and a pass on loopback to have happened.
SETTLE = 0.3
PAUSE = DEFAULT_PAUSE


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
                Route("/redirect/{code:int}", self._redirect, methods=methods),
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

    async def _redirect(self, request: Request) -> Response:
        await self._record(request)
        location = request.query_params.get("to", "/hook")
        return Response(status_code=request.path_params["code"], headers={"Location": location})

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


def post_raw(conn: psycopg.Connection[Any], query: str, receiver_url: str) -> int:
    row = conn.execute(query, (f"{receiver_url}/hook",)).fetchone()  # type: ignore[arg-type]
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
        assert got.headers["accept"] == "*/*"
        assert got.headers["host"] == receiver_url.removeprefix("http://")

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


def test_commit_wakes_the_sender_without_waiting_out_the_pause(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    # With a pause of a minute between passes, only the wake-up at commit can
    # explain a prompt delivery; stopping must not wait out the pause either.
    started = time.monotonic()
    with running_sender(db, pause=60) as sender, db.connect() as conn:
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
        assert result["error_msg"].startswith("Timeout of 200 ms reached. Total time: ")
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


def test_a_burst_goes_out_in_passes_of_200_about_a_second_apart(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    # One transaction, one wake-up, 450 rows: pg_net takes 200 per pass and waits on
    # its latch for up to a second between passes, since nothing wakes it again.
    with running_sender(db) as sender, db.connect() as conn:
        conn.execute(
            "select net.http_post(%s, jsonb_build_object('n', g)) from generate_series(1, 450) g",
            (f"{receiver_url}/hook",),
        )
        received = receiver.wait_for(450, timeout=20)
        sender.wait_idle()
        time.sleep(SETTLE)
        assert len(receiver.snapshot()) == 450
        assert sorted(r.json()["n"] for r in received) == list(range(1, 451))
        stats = sender.stats()
        assert conn.execute(
            "select count(*) from net._http_response where status_code = 200"
        ).fetchone() == (450,)
    assert stats.batches == (200, 200, 50)
    gaps = [later - earlier for earlier, later in itertools.pairwise(stats.pass_starts)]
    # Each gap is the pass itself plus the pause.
    assert all(PAUSE <= gap < PAUSE + 3 for gap in gaps), gaps


def test_a_commit_during_the_pause_starts_the_next_pass_at_once(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    url = f"{receiver_url}/hook"
    with running_sender(db, batch_size=1, pause=60) as sender, db.connect() as conn:
        conn.execute(
            "select net.http_post(%s, jsonb_build_object('n', g)) from generate_series(1, 2) g",
            (url,),
        )
        receiver.wait_for(1)
        time.sleep(SETTLE)
        assert len(receiver.snapshot()) == 1  # the second row waits for the latch
        woken = time.monotonic()
        post(conn, url, {"n": 3})
        received = receiver.wait_for(2)
        assert time.monotonic() - woken < 5  # not the minute's pause
        assert [r.json()["n"] for r in received] == [1, 2]  # oldest first, one per pass
        # One wake-up, one pass: the newest row waits for the next wake-up.
        time.sleep(SETTLE)
        assert len(receiver.snapshot()) == 2
        assert count(conn, "queue") == 1
        assert sender.stats().batches == (1, 1)


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


# -- the wire, as curl writes it ----------------------------------------------------


def test_cr_lf_in_a_header_value_is_sent_as_is_and_splits_the_header(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    # pg_net refuses nothing: a value with CR LF becomes two header lines on the wire.
    headers = {**JSON_HEADERS, "Authorization": "Bearer s3cret\r\nX-Injected: 1"}
    with running_sender(db) as sender, db.connect() as conn:
        request_id = post(conn, f"{receiver_url}/hook", {"n": 1}, headers)
        [got] = receiver.wait_for(1)
        sender.wait_idle()
        assert response_row(conn, request_id)["status_code"] == 200
    assert got.headers["authorization"] == "Bearer s3cret"
    assert got.headers["x-injected"] == "1"


def test_a_trailing_newline_in_a_header_value_is_sent_too(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    # A secret pasted with its newline: the bare LF ends the line early on the wire,
    # and a strict receiver (uvicorn's httptools here) refuses the request.
    headers = {**JSON_HEADERS, "Authorization": "Bearer s3cret\n"}
    with running_sender(db) as sender, db.connect() as conn:
        request_id = post(conn, f"{receiver_url}/hook", {"n": 1}, headers)
        sender.wait_idle()
        row = response_row(conn, request_id)
    assert row["status_code"] == 400
    assert receiver.snapshot() == []


def test_null_headers_send_curls_form_content_type(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    with running_sender(db) as sender, db.connect() as conn:
        with conn.transaction():
            request_id = post_raw(
                conn, "select net.http_post(%s, '{\"n\": 1}'::jsonb, headers := null)", receiver_url
            )
            queued = conn.execute(
                "select headers from net.http_request_queue where id = %s", (request_id,)
            ).fetchone()
        assert queued == (None,)
        [got] = receiver.wait_for(1)
        sender.wait_idle()
    assert got.headers["content-type"] == "application/x-www-form-urlencoded"
    assert got.json() == {"n": 1}


def test_content_type_is_matched_case_insensitively(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    with running_sender(db) as sender, db.connect() as conn:
        with conn.transaction():
            request_id = post(
                conn, f"{receiver_url}/hook", {}, {"content-type": "application/json"}
            )
            [(queued,)] = conn.execute(
                "select headers from net.http_request_queue where id = %s", (request_id,)
            ).fetchall()
        assert queued == {"content-type": "application/json"}  # nothing added
        [got] = receiver.wait_for(1)
        sender.wait_idle()
    assert got.headers["content-type"] == "application/json"


@pytest.mark.parametrize("timeout_ms", [0, -1])
def test_a_timeout_of_zero_or_less_is_sent_without_a_limit(
    db: Database, receiver: Receiver, receiver_url: str, timeout_ms: int
) -> None:
    with running_sender(db) as sender, db.connect() as conn:
        [(request_id,)] = conn.execute(
            "select net.http_post(%s, '{}'::jsonb, timeout_milliseconds := %s)",
            (f"{receiver_url}/slow", timeout_ms),
        ).fetchall()
        receiver.wait_for(1)
        time.sleep(SETTLE)  # longer than no time at all
        receiver.release.set()
        sender.wait_idle()
        row = response_row(conn, request_id)
    assert (row["status_code"], row["timed_out"], row["error_msg"]) == (200, False, None)


@pytest.mark.parametrize(
    ("code", "method", "with_body"),
    [(301, "GET", False), (302, "GET", False), (303, "GET", False), (307, "POST", True),
     (308, "POST", True)],
)  # fmt: skip
def test_redirects_are_followed_as_curl_follows_them(
    db: Database, receiver: Receiver, receiver_url: str, code: int, method: str, with_body: bool
) -> None:
    # A 301 turns the POST into a GET without its body (an http:// URL behind an
    # HTTPS redirect reaches the service as GET); a 308 keeps the POST.
    payload = {"record": {"msg_id": 7}}
    with running_sender(db) as sender, db.connect() as conn:
        request_id = post(conn, f"{receiver_url}/redirect/{code}", payload)
        first, second = receiver.wait_for(2)
        sender.wait_idle()
        row = response_row(conn, request_id)
    assert (first.method, first.json()) == ("POST", payload)
    assert (second.path, second.method) == ("/hook", method)
    assert second.body == (first.body if with_body else b"")
    assert row["status_code"] == 200


def test_a_redirect_to_another_host_drops_the_authorization_header(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    elsewhere = receiver_url.replace("127.0.0.1", "localhost") + "/hook"
    headers = {**JSON_HEADERS, "Authorization": "Bearer s3cret", "X-Queue": "q"}
    with running_sender(db) as sender, db.connect() as conn:
        post(conn, f"{receiver_url}/redirect/307?to={elsewhere}", {}, headers)
        first, second = receiver.wait_for(2)
        sender.wait_idle()
    assert first.headers["authorization"] == "Bearer s3cret"
    assert "authorization" not in second.headers
    assert second.headers["x-queue"] == "q"


def test_http_get_and_http_delete_are_sent(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    url = f"{receiver_url}/hook"
    with running_sender(db) as sender, db.connect() as conn:
        conn.execute('select net.http_get(%s, params := \'{"a": "1"}\')', (url,))
        receiver.wait_for(1)
        conn.execute("select net.http_delete(%s, body := '{\"x\": 1}')", (url,))
        got, deleted = receiver.wait_for(2)
        sender.wait_idle()
    assert (got.method, got.query, got.body) == ("GET", "a=1", b"")
    assert "content-type" not in got.headers
    assert (deleted.method, deleted.json()) == ("DELETE", {"x": 1})


# -- the SQL surface ---------------------------------------------------------------


def test_method_is_the_http_method_domain(db: Database) -> None:
    with db.connect() as conn:
        column = conn.execute(
            "select domain_schema, domain_name, is_nullable from information_schema.columns"
            " where table_schema = 'net' and table_name = 'http_request_queue'"
            " and column_name in ('method', 'headers') order by column_name"
        ).fetchall()
        assert column == [(None, None, "YES"), ("net", "http_method", "NO")]
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "insert into net.http_request_queue (method, url, headers, timeout_milliseconds)"
                " values ('PUT', 'http://127.0.0.1:9/', '{}', 1000)"
            )


def test_tables_sequence_and_functions_are_granted_to_public(db: Database) -> None:
    with db.connect(role="anon") as conn:
        for table in ("net.http_request_queue", "net._http_response"):
            for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"):
                assert conn.execute(
                    "select has_table_privilege(%s, %s)", (table, privilege)
                ).fetchone() == (True,), (table, privilege)
        assert conn.execute(
            "select has_sequence_privilege(%s, 'USAGE, SELECT, UPDATE')",
            ("net.http_request_queue_id_seq",),
        ).fetchone() == (True,)
        functions = dict(
            conn.execute(
                "select p.proname, has_function_privilege(p.oid, 'EXECUTE') from pg_proc p"
                " join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'net'"
            ).fetchall()
        )
    expected = {
        "http_get", "http_post", "http_delete", "wake", "worker_restart",
        "wait_until_running", "check_worker_is_up",
    }  # fmt: skip
    assert expected <= set(functions)
    assert all(functions.values()), functions


def test_responses_are_indexed_by_created(db: Database) -> None:
    with db.connect() as conn:
        indexes = [
            row[0]
            for row in conn.execute(
                "select indexdef from pg_indexes"
                " where schemaname = 'net' and tablename = '_http_response'"
            ).fetchall()
        ]
    assert any(index.endswith("(created)") for index in indexes), indexes


def test_worker_functions_answer_as_pg_nets_do(
    db: Database, receiver: Receiver, receiver_url: str
) -> None:
    with db.connect(role="anon") as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="background worker is not up"):
            conn.execute("select net.check_worker_is_up()")
    with running_sender(db, pause=60) as sender, db.connect(role="anon") as conn:
        conn.execute("select net.wait_until_running()")
        conn.execute("select net.check_worker_is_up()")
        assert conn.execute("select net.worker_restart()").fetchone() == (True,)
        wait_until(lambda: sender.stats().restarts == 1, what="the restart to reach the sender")
        sender.wait_idle()
        time.sleep(SETTLE)  # the pass that the restart started is over
        # PUBLIC may write pg_net's queue directly; without a wake-up nothing is sent...
        conn.execute(
            "insert into net.http_request_queue (method, url, headers, timeout_milliseconds)"
            " values ('get', %s, '{}', 1000)",
            (f"{receiver_url}/hook",),
        )
        time.sleep(SETTLE)
        assert receiver.snapshot() == []
        # ...until net.wake() commits.
        conn.execute("select net.wake()")
        [got] = receiver.wait_for(1)
        sender.wait_idle()
    assert got.method == "GET"
