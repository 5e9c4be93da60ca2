"""A pgmq message as the worker receives it from the database."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class QueueMessage(BaseModel):
    """One row of `pgmq.q_<queue>`, parsed by key.

    pgmq versions differ in their columns (`headers` since 1.5, `last_read_at` since
    1.10), so unknown keys are ignored and `headers` may be absent.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    msg_id: int
    read_ct: int
    enqueued_at: datetime
    vt: datetime
    message: Any = None
    headers: dict[str, Any] | None = None
