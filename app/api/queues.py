"""The manual API for operators with curl: enqueue, sweep, inspect, pause, replay and purge.

Authenticated by `Authorization: Bearer <API_TOKEN>`, separate from the webhook
secret. Mounted only when API_TOKEN is set. The routes are thin: what they do is
in app/operations.py, which the CLI calls too.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from app import operations
from app.api.deps import BearerSecret, Services, get_services
from app.api.errors import ApiError
from app.job_input import Refused, load_job
from app.operations import (
    IDEMPOTENCY_KEY_PATTERN,
    MAX_DELAY_SECONDS,
    MAX_ERROR_FILTER,
    MAX_IDEMPOTENCY_KEY,
    MAX_PAGE,
    OperationError,
)
from app.queue.backend import DeadAction
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
    max_length=MAX_IDEMPOTENCY_KEY,
    pattern=IDEMPOTENCY_KEY_PATTERN,
    description="A later job with the same key, after this one succeeded, is not run",
)


def _refused(error: OperationError) -> ApiError:
    return ApiError(error.status, error.code, error.message)


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
    delay_seconds: Annotated[int, Query(ge=0, le=MAX_DELAY_SECONDS)] = 0,
    idempotency_key: Annotated[str | None, IDEMPOTENCY_KEY] = None,
) -> dict[str, Any]:
    """Validates a job as its processor does and enqueues it (with its Idempotency-Key).

    Refused with 422 when the body is not a JSON object (`invalid_request`), or is
    beyond the bounds of app/job_input.py or what its processor accepts
    (`invalid_message`); each names the problem.
    """
    try:
        operations.served(services.processors, queue)
        try:
            message = load_job(await request.body())
        except Refused as error:
            code = "invalid_request" if error.invalid_json else "invalid_message"
            raise ApiError(422, code, str(error)) from None
        msg_id = await operations.enqueue(
            services.backend,
            services.processors,
            queue,
            message,
            delay_seconds,
            idempotency_key=idempotency_key,
            tracing=services.tracing,
        )
    except OperationError as error:
        raise _refused(error) from None
    return {"queue": queue, "msg_id": msg_id}


@router.post("/{queue}/drain", status_code=202)
async def drain(queue: str, services: ServicesDep) -> dict[str, str]:
    """Runs a sweep now instead of at the next interval."""
    try:
        operations.served(services.processors, queue)
    except OperationError as error:
        raise _refused(error) from None
    services.sweeper.wake(queue)
    return {"status": "sweeping", "queue": queue}


@router.get("")
async def list_queues(services: ServicesDep) -> dict[str, Any]:
    """Depth, visible length, oldest message age and jobs in flight per queue."""
    rows = await operations.depths(
        services.backend, services.processors, in_flight=services.runner.in_flight
    )
    return {"queues": [row.as_dict() for row in rows]}


@router.get("/{queue}/archive")
async def archive(
    queue: str,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = operations.DEFAULT_PAGE,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_MSG_ID, description="msg_id cursor from `next`")
    ] = None,
) -> dict[str, Any]:
    """Archived (dead) messages with their recorded error, newest first."""
    try:
        page = await operations.dead_letters(
            services.backend, services.processors, queue, limit, before
        )
    except OperationError as error:
        raise _refused(error) from None
    return page.as_dict()


@router.post("/{queue}/archive/{msg_id}/replay", status_code=201)
async def replay(
    queue: str, msg_id: Annotated[int, Path(ge=1, le=MAX_MSG_ID)], services: ServicesDep
) -> JSONResponse:
    """Puts one archived message back on its queue as a new message."""
    try:
        new_id = await operations.replay(services.backend, services.processors, queue, msg_id)
    except OperationError as error:
        raise _refused(error) from None
    return JSONResponse({"queue": queue, "replayed": msg_id, "msg_id": new_id}, status_code=201)


@router.post("/{queue}/pause")
async def pause(queue: str, services: ServicesDep) -> dict[str, Any]:
    """Pauses a queue for every replica: nothing is claimed from it until it is resumed."""
    return await _set_paused(queue, True, services)


@router.post("/{queue}/resume")
async def resume(queue: str, services: ServicesDep) -> dict[str, Any]:
    """Resumes a paused queue; what waited in it runs now."""
    return await _set_paused(queue, False, services)


async def _set_paused(queue: str, paused: bool, services: Services) -> dict[str, Any]:
    try:
        changed = await operations.set_paused(
            services.backend, services.processors, queue, paused, mirror=services.pauses.apply
        )
    except OperationError as error:
        raise _refused(error) from None
    return {"queue": queue, "paused": paused, "changed": changed}


class DeadLetterFilter(BaseModel):
    """Which dead letters a bulk replay or purge takes. No filter needs `all: true`."""

    model_config = ConfigDict(extra="forbid")

    error: str | None = Field(
        None, max_length=MAX_ERROR_FILTER, description="text found in the error, any case"
    )
    since: AwareDatetime | None = Field(None, description="archived at or after")
    until: AwareDatetime | None = Field(None, description="archived before")
    all: bool = Field(False, description="with no other filter: every dead letter")


@router.post("/{queue}/archive/replay")
async def replay_matching(
    queue: str, where: DeadLetterFilter, services: ServicesDep
) -> dict[str, Any]:
    """Puts every dead letter that matches back on its queue, 1,000 archived rows per call."""
    return await _bulk(queue, "replay", where, services)


@router.post("/{queue}/archive/purge")
async def purge_matching(
    queue: str, where: DeadLetterFilter, services: ServicesDep
) -> dict[str, Any]:
    """Deletes every dead letter that matches, 1,000 archived rows per call."""
    return await _bulk(queue, "purge", where, services)


async def _bulk(
    queue: str, action: DeadAction, where: DeadLetterFilter, services: Services
) -> dict[str, Any]:
    try:
        done = await operations.bulk_dead(
            services.backend,
            services.processors,
            queue,
            action,
            operations.dead_filter(where.error, where.since, where.until),
            everything=where.all,
        )
    except OperationError as error:
        raise _refused(error) from None
    return done.as_dict()
