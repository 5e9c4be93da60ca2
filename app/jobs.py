"""The public API for your own processors: everything plugin code needs, and nothing else.

A queue's processor is named in `queues.toml` by an import path (`module:attribute`;
the directory holding queues.toml is on the import path) or by a built-in name
(`email`, `reports`, `payments`, `forward`). In its simplest form it is an async
function that takes the job's body:

    from pydantic import BaseModel, Field

    from app.jobs import PermanentError, RetryableError

    class Push(BaseModel):
        device: str = Field(max_length=200)
        text: str = Field(max_length=1000)

    async def send_push(job: Push) -> None:
        ...

- it returns: the job is done and its message deleted;
- it raises `PermanentError("why")`: the message is archived with the reason;
- it raises `RetryableError("why", after=30)`: tried again in 30 s (capped at the
  queue's retry_max_seconds); without `after`, after the queue's backoff;
- it raises anything else, or outlives job_timeout_seconds: tried again after the
  backoff, until max_attempts, then archived.

The job parameter is the body as a `dict` when annotated `dict` (or not at all), or
the pydantic model it is annotated with, validated before the call: a body that does
not fit is archived with the bad fields named, and the manual API refuses it at
enqueue (422). A second parameter, if any, receives the claimed `Message` (its
`msg_id`, `read_ct` as the attempt number, `enqueued_at`, `headers`).

A processor that needs the service's shared resources is a factory: a function (or
class) taking `Resources`, called once at start, returning the processor (an async
function as above, or an object with `validate(body)` and `async __call__(message)`
like the built-in ones):

    from app.jobs import Handler, Resources

    def push(resources: Resources) -> Handler:
        endpoint = resources.options["endpoint"]  # [queues.push_queue.options] in queues.toml

        async def send(job: dict) -> None:
            response = await resources.http.post(endpoint, json=job)
            response.raise_for_status()  # an exception: retried with backoff

        return send

The built-in processors are factories of this same shape, registered by name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import httpx

from app.config import Settings
from app.errors import PermanentError, RetryableError
from app.mail import Mailer
from app.processors import Processor
from app.queue.backend import RpcCaller
from app.queue.models import QueueMessage as Message

__all__ = ["Handler", "Message", "PermanentError", "Processor", "Resources", "RetryableError"]

# An async function taking the job body (and, optionally, the Message).
Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Resources:
    """What a factory is given: the service's long-lived resources, and its queue.

    `http` is the service's one pooled HTTP client (no base URL; give each request a
    timeout of its own); `mailer` sends mail as the email queue does; `rpc` calls
    functions of the worker's schema (RPC_SCHEMA) as service_role; `options` is the
    queue's `options` table from queues.toml, `${NAME}` values expanded.
    """

    settings: Settings
    http: httpx.AsyncClient
    mailer: Mailer
    rpc: RpcCaller
    queue: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
