"""The queue interface the worker is written against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

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
