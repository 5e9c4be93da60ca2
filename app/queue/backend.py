"""The queue interface the worker is written against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from app.queue.models import QueueMessage


class QueueMetrics(BaseModel):
    """Depth and age of one queue."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    queue_name: str
    queue_length: int
    visible_length: int
    oldest_msg_age_sec: int | None = None
    newest_msg_age_sec: int | None = None


class ArchivedMessage(BaseModel):
    """A dead message and the error that ended it.

    `unreadable` says why `message` is empty when its JSON could not be parsed
    (app/queue/rows.py).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    msg_id: int
    read_ct: int
    enqueued_at: datetime
    archived_at: datetime
    message: Any = None
    error: dict[str, Any] | None = None
    unreadable: str | None = None

    @property
    def reason(self) -> str:
        """The recorded error as `Type: message`, as the console and the CLI show it."""
        if not self.error:
            return "(no error recorded)"
        return f"{self.error.get('type', 'error')}: {self.error.get('message', '')}"


@dataclass(frozen=True)
class DeadFilter:
    """Which dead letters a bulk replay or purge takes; None matches everything.

    `error_text` is found anywhere in the recorded error, in any case; the archive
    time is at or after `archived_from` and before `archived_to`.
    """

    error_text: str | None = None
    archived_from: datetime | None = None
    archived_to: datetime | None = None

    @property
    def everything(self) -> bool:
        return not self.error_text and self.archived_from is None and self.archived_to is None


@dataclass(frozen=True)
class DeadBatch:
    """One window of a bulk replay or purge: rows looked at, rows acted on, the cursor."""

    scanned: int
    affected: int
    last_id: int | None


# What a bulk call does to the matching dead letters.
DeadAction = Literal["replay", "purge"]


class RpcCaller(Protocol):
    """Calls a function of the worker's schema with named arguments; returns its JSON result.

    Processors that need the database (reports, payments) get one of these. Failures
    raise `app.queue.rpc.RpcError`, whose `transient` says whether a retry may help.
    """

    async def call(self, function: str, args: dict[str, Any]) -> Any: ...


class QueueBackend(Protocol):
    """What the worker needs from pgmq. Calls take arrays of ids so they can batch."""

    async def claim(self, queue: str, msg_ids: Sequence[int], vt: int) -> list[QueueMessage]:
        """Claims those of `msg_ids` that are visible now, for `vt` seconds.

        A message that is already claimed, locked by another reader or gone is
        simply absent from the result.
        """
        ...

    async def read(self, queue: str, vt: int, qty: int) -> list[QueueMessage]:
        """Claims up to `qty` visible messages, oldest first."""
        ...

    async def ack(self, queue: str, msg_ids: Sequence[int]) -> list[int]:
        """Deletes processed messages; returns the ids that were deleted."""
        ...

    async def set_vt(self, queue: str, msg_ids: Sequence[int], vt: int) -> list[int]:
        """Makes messages visible `vt` seconds from now; returns the ids found.

        Retries (vt = backoff), lease extensions (the heartbeat) and releases (vt = 0).
        """
        ...

    async def archive(
        self, queue: str, msg_ids: Sequence[int], errors: Mapping[int, dict[str, Any]]
    ) -> list[int]:
        """Moves messages to the archive (the dead-letter store); returns their ids.

        `errors` gives, per msg_id, the error recorded as its dead letter.
        """
        ...

    async def send(
        self,
        queue: str,
        message: dict[str, Any],
        delay_seconds: int = 0,
        headers: dict[str, Any] | None = None,
    ) -> int:
        """Enqueues a message (with pgmq `headers`, such as an idempotency key); its msg_id."""
        ...

    async def metrics(self) -> list[QueueMetrics]:
        """Depth and age of the worker's queues."""
        ...

    async def archived(
        self, queue: str, limit: int, before_id: int | None = None
    ) -> list[ArchivedMessage]:
        """Archived messages, newest first, with msg_id below `before_id` when given."""
        ...

    async def replay(self, queue: str, msg_id: int) -> int | None:
        """Moves an archived message back onto its queue; its new msg_id, None if absent."""
        ...

    async def set_paused(self, queue: str, paused: bool) -> bool:
        """Pauses (or resumes) a queue for every replica; True when that changed it."""
        ...

    async def paused(self) -> dict[str, datetime]:
        """The paused queues and when each was paused."""
        ...

    async def dead_letter_counts(self) -> dict[str, int]:
        """Archived messages per queue (an exact count: cache it)."""
        ...

    async def dead_batch(
        self,
        action: DeadAction,
        queue: str,
        after_id: int,
        max_rows: int,
        where: DeadFilter,
        up_to_id: int | None = None,
    ) -> DeadBatch:
        """Replays or purges the dead letters matching `where` among the next `max_rows`
        archived ones after msg_id `after_id` (and not above `up_to_id`); one short
        transaction."""
        ...

    async def expire_dead(self, queue: str, older_than: datetime, max_rows: int) -> int:
        """Deletes up to `max_rows` dead letters archived before `older_than`; how many."""
        ...
