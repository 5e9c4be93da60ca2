"""What an operator does to the queues, once: enqueue, list depths, pause and resume,
list, replay and purge dead letters.

The manual HTTP API (app/api/queues.py) and the CLI (app/cli/operator.py) both call
these, with the service's own backend and registry, so a job is validated and
stored the same way whichever door it came through. Failures are an
`OperationError` with a short code and a sentence; each caller turns it into its
own answer (an HTTP status, an exit code). Nothing here knows HTTP or argv.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from app.errors import PermanentError
from app.job_input import unstorable
from app.processors import Registry
from app.queue import schedules
from app.queue.backend import ArchivedMessage, DeadAction, DeadFilter, QueueBackend, RpcCaller
from app.queue.models import MAX_MSG_ID
from app.queue.rpc import RpcError
from app.queue.schedules import Schedule
from app.tracing import OFF, Tracing, messaging

# A job may wait at most a week before it runs.
MAX_DELAY_SECONDS: Final = 7 * 86_400
# Dead letters per page (queue_worker.archived caps at the same).
MAX_PAGE: Final = 500
DEFAULT_PAGE: Final = 50
# Archived rows per call of a bulk replay or purge: each call is one short transaction.
BULK_BATCH: Final = 1000
# An error-text filter is a short piece of the message, not a document.
MAX_ERROR_FILTER: Final = 200
# An idempotency key is kept as the job's pgmq header `idempotency_key`
# (supabase/migrations/20261201003100_idempotency_keys.sql): printable ASCII, no
# space at either end.
MAX_IDEMPOTENCY_KEY: Final = 255
IDEMPOTENCY_KEY_PATTERN: Final = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$"
# SQLSTATE of a function that does not exist (pgmq.send with headers, on pgmq 1.4.4).
UNDEFINED_FUNCTION: Final = "42883"


class OperationError(Exception):
    """An operation refused or failed; `code` is stable, `str()` is for people."""

    # The HTTP status the manual API answers with.
    status = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UnknownQueue(OperationError):
    status = 404

    def __init__(self, queue: str) -> None:
        super().__init__("unknown_queue", f"this service does not process queue {queue!r}")


class InvalidMessage(OperationError):
    status = 422

    def __init__(self, message: str) -> None:
        super().__init__("invalid_message", message)


class NotArchived(OperationError):
    status = 404

    def __init__(self, queue: str, msg_id: int) -> None:
        super().__init__("not_archived", f"no archived message {msg_id} in {queue}")


def served(processors: Registry, queue: str) -> None:
    """Raises UnknownQueue unless this service processes `queue`."""
    if queue not in processors:
        raise UnknownQueue(queue)


def _bounded(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise OperationError("invalid_request", f"{name}: must be from {low} to {high}")


def check_job(processors: Registry, queue: str, message: Any) -> None:
    """InvalidMessage, naming the problem, unless `message` is a job `queue` can take.

    First what the database (or the worker, reading it back) could not take: depth
    and text (app/job_input.py); then, when this service processes `queue`, what its
    processor refuses. A queue served elsewhere gets the first check only.
    """
    if not isinstance(message, dict):
        raise InvalidMessage("message: a job is a JSON object")
    problem = unstorable(message)
    if problem is not None:
        raise InvalidMessage(f"message: {problem}")
    processor = processors.get(queue)
    if processor is None:
        return
    try:
        processor.validate(message)
    except PermanentError as error:
        raise InvalidMessage(str(error)) from None


async def enqueue(
    backend: QueueBackend,
    processors: Registry,
    queue: str,
    message: Any,
    delay_seconds: int = 0,
    *,
    idempotency_key: str | None = None,
    tracing: Tracing = OFF,
) -> int:
    """Validates a job as its processor does and enqueues it; returns its msg_id.

    With `idempotency_key`, a later job with the same key, after this one succeeded,
    is acked without running. With `tracing` on, the send is a producer span whose
    context goes into the job's pgmq headers (`traceparent`), so that the job's
    processing span is its child.
    """
    served(processors, queue)
    _bounded("delay_seconds", delay_seconds, 0, MAX_DELAY_SECONDS)
    if idempotency_key is not None and not (
        len(idempotency_key) <= MAX_IDEMPOTENCY_KEY
        and re.fullmatch(IDEMPOTENCY_KEY_PATTERN, idempotency_key)
    ):
        raise OperationError(
            "invalid_request",
            f"idempotency key: 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters, "
            "no space at either end",
        )
    check_job(processors, queue, message)
    headers = {"idempotency_key": idempotency_key} if idempotency_key is not None else None
    if not tracing.enabled:
        return await backend.send(queue, message, delay_seconds, headers)
    with tracing.span(
        f"send {queue}", kind="producer", attributes=messaging(queue, "send")
    ) as span:
        carrier: dict[str, Any] = dict(headers or {})
        tracing.inject(carrier)
        try:
            msg_id = await backend.send(queue, message, delay_seconds, carrier or None)
        except RpcError as error:
            # pgmq 1.4.4 has no headers (no pgmq.send with them: 42883): a job the caller
            # gave no headers of its own is sent as it would be with tracing off.
            if headers is not None or not carrier or error.code != UNDEFINED_FUNCTION:
                raise
            span.set_attribute("queue_worker.trace_context_dropped", True)
            msg_id = await backend.send(queue, message, delay_seconds, None)
        span.set_attribute("messaging.message.id", str(msg_id))
        return msg_id


@dataclass(frozen=True)
class QueueDepth:
    """One queue as `GET /queues` and `queue-worker queues` show it."""

    queue: str
    length: int | None
    visible: int | None
    oldest_age_seconds: int | None
    # Jobs running in this process; None where nothing runs (the CLI).
    in_flight: int | None = None
    paused: bool = False

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "queue": self.queue,
            "length": self.length,
            "visible": self.visible,
            "oldest_age_seconds": self.oldest_age_seconds,
            "paused": self.paused,
        }
        if self.in_flight is not None:
            row["in_flight"] = self.in_flight
        return row


async def depths(
    backend: QueueBackend,
    processors: Registry,
    in_flight: Callable[[str], int] | None = None,
) -> list[QueueDepth]:
    """Depth, visible length and oldest message age of each served queue, by name.

    A served queue the database does not report (not created yet) has no figures.
    """
    rows = {row.queue_name: row for row in await backend.metrics()}
    try:
        paused: Collection[str] = await backend.paused()
    except RpcError as error:
        if error.code not in ("PGRST202", "42883"):  # no such function (RPC, SQL)
            raise
        paused = ()  # the database predates pausing: nothing can be paused there
    result = []
    for name in sorted(processors):
        row = rows.get(name)
        result.append(
            QueueDepth(
                queue=name,
                length=row.queue_length if row else None,
                visible=row.visible_length if row else None,
                oldest_age_seconds=row.oldest_msg_age_sec if row else None,
                in_flight=in_flight(name) if in_flight is not None else None,
                paused=name in paused,
            )
        )
    return result


@dataclass(frozen=True)
class DeadLetters:
    """One page of archived messages, newest first; `next` is the cursor of the next page."""

    queue: str
    messages: list[ArchivedMessage]
    next: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "messages": [row.model_dump(mode="json") for row in self.messages],
            "next": self.next,
        }


async def dead_letters(
    backend: QueueBackend,
    processors: Registry,
    queue: str,
    limit: int = DEFAULT_PAGE,
    before: int | None = None,
) -> DeadLetters:
    """Archived (dead) messages with their recorded error, newest first, a page at a time."""
    served(processors, queue)
    _bounded("limit", limit, 1, MAX_PAGE)
    if before is not None:
        _bounded("before", before, 1, MAX_MSG_ID)
    rows = await backend.archived(queue, limit, before)
    return DeadLetters(queue, rows, rows[-1].msg_id if len(rows) == limit else None)


async def replay(backend: QueueBackend, processors: Registry, queue: str, msg_id: int) -> int:
    """Puts one archived message back on its queue as a new message; returns the new msg_id."""
    served(processors, queue)
    _bounded("msg_id", msg_id, 1, MAX_MSG_ID)
    new_id = await backend.replay(queue, msg_id)
    if new_id is None:
        raise NotArchived(queue, msg_id)
    return new_id


async def set_paused(
    backend: QueueBackend,
    processors: Registry,
    queue: str,
    paused: bool,
    *,
    mirror: Callable[[str, bool], None] | None = None,
) -> bool:
    """Pauses (or resumes) `queue` for every replica; True when that changed its state.

    A paused queue keeps its messages and takes new ones; no replica claims any
    until it is resumed. `mirror` tells this process at once (the service's
    PauseWatch) instead of at its next poll.
    """
    served(processors, queue)
    changed = await backend.set_paused(queue, paused)
    if mirror is not None:
        mirror(queue, paused)
    return changed


def dead_filter(
    error_text: str | None = None,
    archived_from: datetime | None = None,
    archived_to: datetime | None = None,
) -> DeadFilter:
    """A checked filter: a short error text, aware times in order."""
    text = error_text.strip() if error_text else None
    if text and len(text) > MAX_ERROR_FILTER:
        raise OperationError("invalid_request", f"error: at most {MAX_ERROR_FILTER} characters")
    for name, value in (("since", archived_from), ("until", archived_to)):
        if value is not None and value.tzinfo is None:
            raise OperationError(
                "invalid_request", f"{name}: give a time zone (2026-12-02T01:00:00Z)"
            )
    if archived_from and archived_to and archived_from >= archived_to:
        raise OperationError("invalid_request", "since: must be before until")
    return DeadFilter(text or None, archived_from, archived_to)


@dataclass(frozen=True)
class Bulk:
    """What a bulk replay or purge did: archived rows looked at, rows acted on, calls made."""

    queue: str
    action: DeadAction
    scanned: int
    affected: int
    batches: int

    def as_dict(self) -> dict[str, Any]:
        key = "replayed" if self.action == "replay" else "purged"
        return {"queue": self.queue, key: self.affected, "scanned": self.scanned}


async def bulk_dead(
    backend: QueueBackend,
    processors: Registry,
    queue: str,
    action: DeadAction,
    where: DeadFilter,
    *,
    everything: bool = False,
    batch: int = BULK_BATCH,
) -> Bulk:
    """Replays or purges every dead letter of `queue` that `where` matches, `batch`
    archived rows per call (one short transaction each), oldest first.

    An empty filter takes every dead letter of the queue, only with `everything`:
    a slip of the hand must not purge an archive. Dead letters archived while it
    runs (a replayed job failing again) are not taken by the same pass.
    """
    served(processors, queue)
    if where.everything and not everything:
        raise OperationError(
            "invalid_request",
            f"no filter: give error, since or until, or all to {action} every dead letter",
        )
    newest = await backend.archived(queue, 1)
    if not newest:
        return Bulk(queue, action, 0, 0, 0)
    up_to = newest[0].msg_id
    after = scanned = affected = batches = 0
    while True:
        done = await backend.dead_batch(action, queue, after, batch, where, up_to)
        batches += 1
        scanned += done.scanned
        affected += done.affected
        if done.scanned == 0 or done.last_id is None or done.last_id >= up_to:
            return Bulk(queue, action, scanned, affected, batches)
        after = done.last_id
        await asyncio.sleep(0)  # the service's jobs and webhooks get their turn


async def latest_dead_letters(
    backend: QueueBackend, processors: Registry, limit: int = DEFAULT_PAGE
) -> list[tuple[str, ArchivedMessage]]:
    """The newest dead letters of every served queue together, newest archived first."""
    _bounded("limit", limit, 1, MAX_PAGE)
    found: list[tuple[str, ArchivedMessage]] = []
    for queue in sorted(processors):
        found.extend((queue, row) for row in await backend.archived(queue, limit))
    found.sort(key=lambda pair: pair[1].archived_at, reverse=True)
    return found[:limit]


async def set_schedule(
    rpc: RpcCaller, processors: Registry, name: str, cron: str, queue: str, job: Any
) -> Schedule:
    """Creates or replaces a schedule whose runs enqueue `job` into `queue`.

    The job is checked as an enqueued one is (`check_job`), so a schedule never
    enqueues a job that could not succeed; the database checks the name, the cron
    expression and the queue (`schedules.ScheduleError`).
    """
    check_job(processors, queue, job)
    return await schedules.set_schedule(rpc, name, cron, queue, job)
