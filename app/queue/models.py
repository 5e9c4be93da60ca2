"""A pgmq message as the worker receives it from the database."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

# pgmq's msg_id is a bigint identity: 1 to 2^63-1. Any other number names no message.
MAX_MSG_ID = 2**63 - 1


class QueueMessage(BaseModel):
    """One row of `pgmq.q_<queue>`, parsed by key.

    pgmq versions differ in their columns (`headers` since 1.5, `last_read_at` since
    1.10), so unknown keys are ignored and `headers` may be absent.

    `unreadable` is set, and `message` and `headers` left empty, when the row's JSON
    could not be parsed (app/queue/rows.py); it says why. The runner archives such a
    message without running it.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    msg_id: int
    read_ct: int
    enqueued_at: datetime
    vt: datetime
    message: Any = None
    headers: dict[str, Any] | None = None
    unreadable: str | None = None
