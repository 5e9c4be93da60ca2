"""A stand-in for pg_net's background worker (the "sender") for the test bed.

`tests/support/sql/30_pg_net.sql` provides pg_net 0.20's SQL interface: `net.http_post`
(and `http_get`, `http_delete`) inserts a row into `net.http_request_queue` and calls
`net.wake()`, a NOTIFY on `pg_net_wake` that PostgreSQL delivers only when the
inserting transaction commits. This module plays the C background worker of
supabase/pg_net, keeping what the service has to survive in production, as measured
against a real pg_net 0.20 build (../shared/SUPABASE-FACTS.md):

* Requests leave only after the inserting transaction commits: uncommitted rows are
  invisible to the sender's DELETE, and a rolled-back `net.http_post` is never sent.
* Each pass takes up to `batch_size` rows (`pg_net.batch_size`, 200), **deleting them
  before sending**, sends them concurrently, waits for the whole batch and records
  one `net._http_response` row per request. **Between passes the worker waits on its
  latch for up to a second** (`pause`): a commit that called `net.wake()` sets the
  latch and ends the wait at once, and any number of commits during a pass set it
  once. A burst committed in one transaction therefore goes out in passes of 200
  about a second apart, as real pg_net delivers 2,000 rows in about 10 s.
* There are no retries, ever: a connection error or timeout is recorded and the
  request is gone. With `drop_rate` the sender also loses requests outright, as pg_net
  does when a crash empties its unlogged tables mid-batch. Delivery is at most once.
* The wire is curl's (tests/support/curl.py): header lines as pg_net builds them,
  **CR and LF inside a value sent as is**, curl's form Content-Type when the row's
  headers are null, redirects followed as curl does. A timeout of 0 or less is sent
  anyway, with no time limit (libcurl reads 0 as "none", and pg_net 0.20 refuses
  nothing). Receiver down: `status_code` null, `timed_out` false, `error_msg`
  "Couldn't connect to server"; too slow: `timed_out` true and "Timeout of N ms
  reached. Total time: ...".

Deliberate differences from pg_net: the DELETE commits on its own before sending
(pg_net 0.19 and 0.20 commit it together with the batch's responses), so other
sessions see the queue empty while a batch is in flight and a sender that dies
mid-batch loses what it took, which is the at-most-once behaviour the service must
tolerate anyway; old `net._http_response` rows are never expired (pg_net's
`pg_net.ttl`), since tests read them; a timeout's message lacks pg_net's per-phase
timings; `net.worker_restart()` is a NOTIFY too, so it acts at commit and the sender
only counts it and starts a pass (the real worker restarts its process).

Use `running_sender(db)` as a context manager; `PgNetSender.wait_idle()` blocks
until everything committed so far has been taken and its outcome recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from tests.support import curl
from tests.support.postgres import Database

WAKE_CHANNEL = "pg_net_wake"
RESTART_PAYLOAD = "restart"
# How the worker's sessions show in pg_stat_activity; net.check_worker_is_up() looks for it.
APPLICATION_NAME = "pg_net worker"
DEFAULT_BATCH_SIZE = 200
# pg_net's worker waits on its latch this long between passes (WaitLatch, 1000 ms).
DEFAULT_PAUSE = 1.0
# pg_net sends `User-Agent: pg_net/<version>`; receivers should not depend on the
# exact version, only on the prefix.
USER_AGENT = "pg_net/0.20.0"

# pg_net hands curl the headers as "Name: value" lines built by this very
# expression, so non-string jsonb values and nulls behave as they do there
# (a null value makes the whole line null, and pg_net skips null lines).
_TAKE_SQL = """
delete from net.http_request_queue
where id in (
    select id from net.http_request_queue
    order by id
    limit %s
    for update skip locked
)
returning id, method::text, url, timeout_milliseconds,
          array(select key || ': ' || value from jsonb_each_text(headers)),
          body
"""

_RECORD_SQL = """
insert into net._http_response
    (id, status_code, content, headers, content_type, timed_out, error_msg)
values (%s, %s, %s, %s, %s, %s, %s)
"""


@dataclass(frozen=True)
class QueuedRequest:
    """One row taken (and already deleted) from `net.http_request_queue`."""

    id: int
    method: str
    url: str
    timeout_milliseconds: int
    header_lines: tuple[str | None, ...]
    body: bytes | None


@dataclass(frozen=True)
class Outcome:
    """What gets written to `net._http_response` for one request."""

    id: int
    status_code: int | None = None
    content: str | None = None
    headers: dict[str, str] | None = None
    content_type: str | None = None
    timed_out: bool = False
    error_msg: str | None = None


@dataclass(frozen=True)
class SenderStats:
    """A consistent snapshot of the sender's counters."""

    sent: int = 0
    dropped: int = 0
    failed: int = 0
    timed_out: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    batches: tuple[int, ...] = ()
    # time.monotonic() at the start of each non-empty pass, in order.
    pass_starts: tuple[float, ...] = ()
    restarts: int = 0

    @property
    def taken(self) -> int:
        return sum(self.batches)


def _response_content(raw: bytes) -> str | None:
    # pg_net stores the body as a C string: it ends at the first NUL, and an
    # empty body is recorded as NULL rather than ''.
    raw = raw.split(b"\0", 1)[0]
    if not raw:
        return None
    return raw.decode("utf-8", errors="replace")


def _wire_body(request: QueuedRequest) -> bytes | None:
    # A POST always sets CURLOPT_POSTFIELDS (empty for a null body); GET never does,
    # DELETE only with a body.
    if request.method == "POST":
        return request.body or b""
    if request.method == "DELETE":
        return request.body
    return None


class PgNetSender:
    """pg_net's background worker, run in a thread with its own event loop."""

    def __init__(
        self,
        db: Database,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        drop_rate: float = 0.0,
        seed: int | None = None,
        pause: float = DEFAULT_PAUSE,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError("drop_rate must be between 0 and 1")
        if pause <= 0:
            raise ValueError("pause must be positive")
        self.db = db
        self.batch_size = batch_size
        self.drop_rate = drop_rate
        self.pause = pause
        # Drop decisions are drawn per request in id order, so the same seed and
        # the same sequence of requests drop the same ones whatever the batching.
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._sent = 0
        self._dropped = 0
        self._failed = 0
        self._timed_out = 0
        self._by_status: Counter[int] = Counter()
        self._batches: list[int] = []
        self._pass_starts: list[float] = []
        self._restarts = 0
        # True from just before a pass's DELETE until its outcomes are recorded:
        # wait_idle() needs it because rows leave the table before they are sent.
        self._busy = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        # pg_net's latch: set by a wake-up, cleared when a pass begins.
        self._latch: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # -- counters -------------------------------------------------------------

    def stats(self) -> SenderStats:
        with self._lock:
            return SenderStats(
                sent=self._sent,
                dropped=self._dropped,
                failed=self._failed,
                timed_out=self._timed_out,
                by_status=dict(self._by_status),
                batches=tuple(self._batches),
                pass_starts=tuple(self._pass_starts),
                restarts=self._restarts,
            )

    @property
    def sent(self) -> int:
        """Requests that got an HTTP response, whatever its status."""
        with self._lock:
            return self._sent

    @property
    def dropped(self) -> int:
        """Requests deleted from the queue and deliberately never sent."""
        with self._lock:
            return self._dropped

    @property
    def failed(self) -> int:
        """Requests that got no HTTP response: connection error, timeout, bad URL."""
        with self._lock:
            return self._failed

    @property
    def timed_out(self) -> int:
        with self._lock:
            return self._timed_out

    @property
    def by_status(self) -> dict[int, int]:
        with self._lock:
            return dict(self._by_status)

    @property
    def batches(self) -> list[int]:
        """Rows taken by each non-empty pass, in order."""
        with self._lock:
            return list(self._batches)

    # -- lifecycle --------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            raise RuntimeError("sender already started")
        self._thread = threading.Thread(target=self._run, name="pg_net-sender", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.01):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._thread.join(timeout=1)
                raise RuntimeError("pg_net sender failed to start") from self._failure

    def stop(self, timeout: float = 30.0) -> None:
        """Stops after the batch in flight, if any, has been recorded."""
        thread, loop, stop, latch = self._thread, self._loop, self._stop, self._latch
        if thread is None:
            return
        if loop is not None and stop is not None and latch is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stop.set)
                loop.call_soon_threadsafe(latch.set)
            # The listener may be waiting on LISTEN; a notification ends its wait
            # without cancelling psycopg mid-read.
            with contextlib.suppress(psycopg.Error), self.db.connect() as conn:
                conn.execute("select pg_notify(%s, 'stop')", (WAKE_CHANNEL,))
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("pg_net sender did not stop")
        self.check()

    def check(self) -> None:
        """Raises if the sender's thread has died."""
        if self._failure is not None:
            raise RuntimeError("pg_net sender crashed") from self._failure

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Waits until the queue is empty and every request taken has an outcome.

        Covers everything committed before the call. The queue is counted before
        the busy flag is read: a row absent from the count was either never
        committed or already taken, and if taken, `_busy` stays set until its
        outcome is recorded.
        """
        deadline = time.monotonic() + timeout
        with self.db.connect() as conn:
            while True:
                self.check()
                row = conn.execute("select count(*) from net.http_request_queue").fetchone()
                queued = row[0] if row else 0
                with self._lock:
                    busy = self._busy
                if queued == 0 and not busy:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"pg_net sender not idle after {timeout}s: {queued} queued, busy={busy}"
                    )
                time.sleep(0.01)

    # -- the worker -------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by check(), wait_idle() and stop()
            self._failure = exc

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self.db.url, autocommit=True, application_name=APPLICATION_NAME
        )

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        latch = self._latch = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            listener = await stack.enter_async_context(await self._connect())
            worker = await stack.enter_async_context(await self._connect())
            # LISTEN before the first pass: anything committed earlier is found by
            # that pass, anything committed later sets the latch.
            await listener.execute(sql.SQL("listen {}").format(sql.Identifier(WAKE_CHANNEL)))
            listening = asyncio.create_task(self._listen(listener))
            self._ready.set()
            try:
                while not stop.is_set():
                    latch.clear()
                    await self._pass(worker)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.pause):
                            await latch.wait()
            finally:
                # stop() sends a notification, which ends the listener's wait.
                try:
                    async with asyncio.timeout(5):
                        await listening
                except TimeoutError:
                    listening.cancel()

    async def _listen(self, listener: psycopg.AsyncConnection[Any]) -> None:
        assert self._stop is not None and self._latch is not None
        async for notify in listener.notifies():
            if notify.payload == RESTART_PAYLOAD:
                with self._lock:
                    self._restarts += 1
            self._latch.set()
            if self._stop.is_set():
                return

    async def _pass(self, conn: psycopg.AsyncConnection[Any]) -> int:
        with self._lock:
            self._busy = True
        started = time.monotonic()
        try:
            requests = await self._take(conn)
            if not requests:
                return 0
            to_send: list[QueuedRequest] = []
            dropped = 0
            for request in requests:
                # Always draw, so the sequence of decisions depends only on the seed.
                if self._rng.random() < self.drop_rate:
                    # Nothing is recorded for a dropped request: pg_net's real loss
                    # (a crash emptying its unlogged tables, or the worker dying
                    # mid-batch) leaves no net._http_response row either, so the
                    # service must not count on one to notice the loss.
                    dropped += 1
                else:
                    to_send.append(request)
            # curl_multi has no connection cap: a whole batch goes out at once,
            # which is what makes bursts time out on a slow receiver.
            outcomes = await asyncio.gather(*(self._send(r) for r in to_send))
            await self._record(conn, outcomes)
            with self._lock:
                self._batches.append(len(requests))
                self._pass_starts.append(started)
                self._dropped += dropped
                for outcome in outcomes:
                    if outcome.status_code is not None:
                        self._sent += 1
                        self._by_status[outcome.status_code] += 1
                    else:
                        self._failed += 1
                        self._timed_out += outcome.timed_out
            return len(requests)
        finally:
            with self._lock:
                self._busy = False

    async def _take(self, conn: psycopg.AsyncConnection[Any]) -> list[QueuedRequest]:
        # Autocommit: the DELETE is committed before anything is sent, so from
        # here on a failure loses the request instead of retrying it.
        cursor = await conn.execute(_TAKE_SQL, (self.batch_size,))
        rows = await cursor.fetchall()
        requests = [
            QueuedRequest(
                id=row[0],
                method=row[1].upper(),
                url=row[2],
                timeout_milliseconds=row[3],
                header_lines=tuple(row[4] or ()),
                body=bytes(row[5]) if row[5] is not None else None,
            )
            for row in rows
        ]
        return sorted(requests, key=lambda r: r.id)

    async def _send(self, request: QueuedRequest) -> Outcome:
        timeout_ms = request.timeout_milliseconds
        lines = [line for line in request.header_lines if line is not None]
        started = time.perf_counter()
        try:
            # CURLOPT_TIMEOUT_MS bounds the whole transfer, redirects included; libcurl
            # reads 0 as "no limit", and a negative value leaves that default.
            async with asyncio.timeout(timeout_ms / 1000 if timeout_ms > 0 else None):
                reply = await curl.perform(
                    request.method, request.url, lines, _wire_body(request), user_agent=USER_AGENT
                )
        except TimeoutError:
            elapsed_ms = (time.perf_counter() - started) * 1000
            # pg_net's message also splits the time into DNS, handshake and
            # request phases; only the prefix is meant to be matched on.
            return Outcome(
                request.id,
                timed_out=True,
                error_msg=f"Timeout of {timeout_ms} ms reached. Total time: {elapsed_ms:f} ms",
            )
        except curl.CurlError as exc:  # no retries: every failure is final
            return Outcome(request.id, error_msg=str(exc))
        return Outcome(
            request.id,
            status_code=reply.status,
            content=_response_content(reply.body),
            headers=dict(reply.headers),
            content_type=reply.header("content-type"),
        )

    async def _record(
        self, conn: psycopg.AsyncConnection[Any], outcomes: Sequence[Outcome]
    ) -> None:
        if not outcomes:
            return
        # One transaction per batch, as pg_net inserts a batch's responses together.
        async with conn.transaction():
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    _RECORD_SQL,
                    [
                        (
                            o.id,
                            o.status_code,
                            o.content,
                            Jsonb(o.headers) if o.headers is not None else None,
                            o.content_type,
                            o.timed_out,
                            o.error_msg,
                        )
                        for o in outcomes
                    ],
                )


@contextlib.contextmanager
def running_sender(
    db: Database,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    drop_rate: float = 0.0,
    seed: int | None = None,
    pause: float = DEFAULT_PAUSE,
) -> Iterator[PgNetSender]:
    """Runs a `PgNetSender` for the duration of the block."""
    sender = PgNetSender(db, batch_size=batch_size, drop_rate=drop_rate, seed=seed, pause=pause)
    sender.start()
    try:
        yield sender
    except BaseException:
        # The block's own failure matters more than a crash during shutdown.
        with contextlib.suppress(Exception):
            sender.stop()
        raise
    sender.stop()
