"""The manual API for operators with curl: enqueue, sweep, inspect and replay.

Authenticated by `Authorization: Bearer <API_TOKEN>`, separate from the webhook
secret. Mounted only when API_TOKEN is set.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse

from app.api.deps import BearerSecret, Services, get_services
from app.api.errors import ApiError
from app.api.job_json import Refused, load_job
from app.errors import PermanentError
from app.queue.models import MAX_MSG_ID

router = APIRouter(
    prefix="/queues", tags=["queues"], dependencies=[Depends(BearerSecret("api_token"))]
)

ServicesDep = Annotated[Services, Depends(get_services)]
# An Idempotency-Key is kept as the job's pgmq header `idempotency_key`
# (supabase/migrations/20261201003100_idempotency_keys.sql): printable ASCII.
IDEMPOTENCY_KEY = Header(
    alias="Idempotency-Key",
    min_length=1,
    max_length=255,
    pattern=r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$",
    description="A later job with the same key, after this one succeeded, is not run",
)


def _served(services: Services, queue: str) -> None:
    if queue not in services.processors:
        raise ApiError(404, "unknown_queue", f"this service does not process queue {queue!r}")


@router.post(
    "/{queue}/messages",
    status_code=201,
    # The body is read by load_job(), not by FastAPI: documented here.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def enqueue(
    queue: str,
    request: Request,
    services: ServicesDep,
    delay_seconds: Annotated[int, Query(ge=0, le=86_400 * 7)] = 0,
    idempotency_key: Annotated[str | None, IDEMPOTENCY_KEY] = None,
) -> dict[str, Any]:
    """Validates a job as its processor does and enqueues it (with its Idempotency-Key).

    Refused with 422 when the body is not a JSON object (`invalid_request`), or is
    beyond the bounds of app/api/job_json.py or what its processor accepts
    (`invalid_message`); each names the problem.
    """
    _served(services, queue)
    try:
        message = load_job(await request.body())
    except Refused as error:
        code = "invalid_request" if error.invalid_json else "invalid_message"
        raise ApiError(422, code, str(error)) from None
    try:
        services.processors[queue].validate(message)
    except PermanentError as error:
        raise ApiError(422, "invalid_message", str(error)) from None
    headers = {"idempotency_key": idempotency_key} if idempotency_key is not None else None
    msg_id = await services.backend.send(queue, message, delay_seconds, headers)
    return {"queue": queue, "msg_id": msg_id}


@router.post("/{queue}/drain", status_code=202)
async def drain(queue: str, services: ServicesDep) -> dict[str, str]:
    """Runs a sweep now instead of at the next interval."""
    _served(services, queue)
    services.sweeper.wake(queue)
    return {"status": "sweeping", "queue": queue}


@router.get("")
async def list_queues(services: ServicesDep) -> dict[str, Any]:
    """Depth, visible length, oldest message age and jobs in flight per queue."""
    rows = {row.queue_name: row for row in await services.backend.metrics()}
    queues = []
    for name in sorted(services.processors):
        row = rows.get(name)
        queues.append(
            {
                "queue": name,
                "length": row.queue_length if row else None,
                "visible": row.visible_length if row else None,
                "oldest_age_seconds": row.oldest_msg_age_sec if row else None,
                "in_flight": services.runner.in_flight(name),
            }
        )
    return {"queues": queues}


@router.get("/{queue}/archive")
async def archive(
    queue: str,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_MSG_ID, description="msg_id cursor from `next`")
    ] = None,
) -> dict[str, Any]:
    """Archived (dead) messages with their recorded error, newest first."""
    _served(services, queue)
    rows = await services.backend.archived(queue, limit, before)
    return {
        "queue": queue,
        "messages": [row.model_dump(mode="json") for row in rows],
        "next": rows[-1].msg_id if len(rows) == limit else None,
    }


@router.post("/{queue}/archive/{msg_id}/replay", status_code=201)
async def replay(
    queue: str, msg_id: Annotated[int, Path(ge=1, le=MAX_MSG_ID)], services: ServicesDep
) -> JSONResponse:
    """Puts one archived message back on its queue as a new message."""
    _served(services, queue)
    new_id = await services.backend.replay(queue, msg_id)
    if new_id is None:
        raise ApiError(404, "not_archived", f"no archived message {msg_id} in {queue}")
    return JSONResponse({"queue": queue, "replayed": msg_id, "msg_id": new_id}, status_code=201)
