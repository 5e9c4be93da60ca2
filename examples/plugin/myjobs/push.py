"""push_queue: a push notification per job, sent to a push provider's HTTP API.

A factory (it takes `Resources`), because it needs the service's HTTP client and
its queue's `options` from queues.toml; it returns the processor, an async
function taking the job as a pydantic model (a job that does not fit is archived,
and the manual API refuses it at enqueue).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.jobs import Handler, Message, PermanentError, Resources, RetryableError


class Push(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_token: str = Field(min_length=8, max_length=256, pattern=r"^[A-Za-z0-9:_-]+$")
    title: str = Field(min_length=1, max_length=100)
    body: str = Field(max_length=1000)


def push(resources: Resources) -> Handler:
    endpoint = str(resources.options["endpoint"])
    http = resources.http

    async def send_push(job: Push, message: Message) -> None:
        response = await http.post(
            endpoint,
            json=job.model_dump(),
            headers={"Idempotency-Key": f"push-{message.msg_id}"},
            timeout=10,
        )
        if response.status_code == 429:
            raise RetryableError("push API rate limit", after=30)
        if 400 <= response.status_code < 500:
            raise PermanentError(f"push API refused the job: {response.status_code}")
        response.raise_for_status()  # a 5xx: retried with backoff

    return send_push
