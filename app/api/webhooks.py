"""`POST /webhooks/{queue}`: Supabase Database Webhook payloads for pgmq queue rows.

The webhook is a doorbell: it carries the new row's `msg_id`, and the runner claims
that message from the database. The route answers 202 at once and never waits for
the job; at capacity it answers 202 "deferred" and leaves the message to the sweeper,
and while shutting down 503 with Retry-After (pg_net does not retry, the sweeper will).

A webhook is authenticated by the bearer secret or by a Standard Webhooks signature
(app/api/signatures.py); a signed webhook whose id was seen within the signature
window is answered 200 "duplicate" and not offered to the runner again.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app import metrics
from app.api.deps import BearerSecret, Services, get_services
from app.api.errors import ApiError
from app.api.signatures import SignedWebhook, WebhookSignature
from app.errors import describe_invalid
from app.queue.models import MAX_MSG_ID
from app.worker import Offer

router = APIRouter(tags=["webhooks"])

RETRY_AFTER_SECONDS = 5


class QueueRow(BaseModel):
    """The part of a pgmq queue row the worker needs.

    `msg_id` is a bigint identity in pgmq: an id outside 1..2^63-1 names no message,
    and is refused here rather than passed on to a claim that others share.
    """

    model_config = ConfigDict(extra="allow")

    msg_id: int = Field(gt=0, le=MAX_MSG_ID)


class WebhookPayload(BaseModel):
    """What Supabase Database Webhooks and pg_net POST for a row change."""

    model_config = ConfigDict(extra="allow")

    type: Literal["INSERT", "UPDATE", "DELETE"]
    table: str
    schema_: str = Field(alias="schema")
    record: dict[str, Any] | None = None
    old_record: dict[str, Any] | None = None


def _invalid(queue: str, message: str) -> ApiError:
    _counter(queue, "invalid").inc()
    return ApiError(422, "invalid_payload", message)


_ACCEPTED_SECRETS = ("webhook_secret", "webhook_secret_previous")
_bearer = BearerSecret(*_ACCEPTED_SECRETS)
_signature = WebhookSignature(*_ACCEPTED_SECRETS)


def _label(services: Services, queue: str) -> str:
    # Only served queue names become label values: the path is caller-controlled.
    return queue if queue in services.runner.queues else "unknown"


async def _check_auth(request: Request, queue: str) -> SignedWebhook | None:
    """The bearer secret, or else a valid signature (returned, for replay detection)."""
    if _bearer.matches(request):
        return None
    try:
        signed = await _signature(request)
        if signed is None:
            _bearer(request)  # raises: neither a bearer token nor a signature
    except ApiError:
        _counter(_label(get_services(request), queue), "unauthorized").inc()
        raise
    return signed


@router.post(
    "/webhooks/{queue}",
    status_code=202,
    responses={
        200: {"description": "UPDATE or DELETE event: ignored; or a signed webhook seen before"},
        401: {"description": "Missing or wrong bearer secret or signature"},
        413: {"description": "The body is larger than MAX_WEBHOOK_BODY_BYTES"},
        415: {"description": "The body is not application/json"},
        503: {"description": "Shutting down; retry later (the message stays queued)"},
        404: {"description": "The service does not serve this queue"},
        422: {"description": "The body is not a pgmq queue row event"},
    },
    # `queue` is read from the path below rather than declared as a parameter, so it
    # is documented here.
    openapi_extra={
        "parameters": [
            {"name": "queue", "in": "path", "required": True, "schema": {"type": "string"}}
        ]
    },
)
async def receive_webhook(request: Request) -> Response:
    """Accepts the INSERT event of a queue row; the job runs in the background."""
    # This route takes every webhook, so it asks FastAPI for nothing: the path
    # parameter is read here, and the services are looked up rather than declared
    # with Depends(). Parameter and dependency resolution per request cost more than
    # the rest of the request together (bench/README.md, "Webhook path").
    queue: str = request.path_params["queue"]
    services = get_services(request)
    if services.tracing.enabled:
        return await _traced(queue, request, services)
    return await _webhook(queue, request, services)


async def _traced(queue: str, request: Request, services: Services) -> Response:
    """The webhook in a server span; the claim it starts is its child."""
    attributes = {
        "http.request.method": "POST",
        "http.route": "/webhooks/{queue}",
        "messaging.system": "pgmq",
        "messaging.destination.name": _label(services, queue),
    }
    refused: ApiError | None = None
    with services.tracing.span(
        "POST /webhooks/{queue}", kind="server", attributes=attributes
    ) as span:
        try:
            response = await _webhook(queue, request, services)
        except ApiError as error:
            # Raised after the span ends: a 4xx answer is the caller's error, not ours.
            refused = error
            if error.status_code >= 500:
                span.set_error(str(error.detail))
        span.set_attribute(
            "http.response.status_code",
            response.status_code if refused is None else refused.status_code,
        )
    if refused is not None:
        raise refused
    return response


async def _webhook(queue: str, request: Request, services: Services) -> Response:
    signed = await _check_auth(request, queue)
    if signed is None:
        return await _receive(queue, request, services)
    if not services.replays.first_seen(signed):
        _counter(_label(services, queue), "duplicate").inc()
        return JSONResponse(
            {"status": "duplicate", "reason": "this webhook-id was seen before; ignored"}
        )
    try:
        return await _receive(queue, request, services)
    except ApiError:
        # Not handled: a sender that retries with the same id must get through.
        services.replays.forget(signed)
        raise


async def _receive(queue: str, request: Request, services: Services) -> Response:
    """The event itself: checked, then its msg_id offered to the runner."""
    if queue not in services.runner.queues:
        _counter(_label(services, queue), "unknown_queue").inc()
        raise ApiError(404, "unknown_queue", f"this service does not process queue {queue!r}")
    try:
        payload = WebhookPayload.model_validate_json(await request.body())
    except ValidationError as error:
        raise _invalid(queue, describe_invalid(error, root="body")) from None
    if payload.type != "INSERT":
        _counter(queue, "ignored").inc()
        return JSONResponse({"status": "ignored", "reason": f"{payload.type} events are ignored"})
    expected = f"q_{queue}"
    if payload.schema_ != "pgmq" or payload.table != expected:
        raise _invalid(
            queue,
            f"event is for {payload.schema_}.{payload.table}, expected pgmq.{expected}",
        )
    if payload.record is None:
        raise _invalid(queue, "record: an INSERT event needs the new row")
    try:
        row = QueueRow.model_validate(payload.record)
    except ValidationError as error:
        raise _invalid(queue, describe_invalid(error, within="record")) from None
    offer = services.runner.offer(queue, [row.msg_id])
    _counter(queue, offer.value).inc()
    if offer is Offer.DRAINING:
        # pg_net does not retry; the message stays queued and is swept up later.
        raise ApiError(
            503,
            "shutting_down",
            "the service is shutting down; the message stays queued",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    # DEFERRED: at capacity; the message stays queued and the sweeper takes it.
    # What JSONResponse would render, written out: this is every webhook's answer.
    return Response(
        b'{"status":"%s","msg_id":%d}' % (offer.value.encode(), row.msg_id),
        status_code=202,
        media_type="application/json",
    )


@functools.cache
def _counter(queue: str, result: str) -> Any:
    """The webhook counter's child, looked up once (a label lookup costs a lock).

    `queue` is a served queue or "unknown" (see `_label`): the path is caller-controlled,
    and only a bounded set of names may become label values or cache entries.
    """
    return metrics.WEBHOOKS.labels(queue, result)


# Local mode without WEBHOOK_SECRET: no trigger sends webhooks (new messages wake the
# worker through LISTEN/NOTIFY), so the route tells a caller that instead of a bare 401.
off_router = APIRouter(tags=["webhooks"])


@off_router.post("/webhooks/{queue}", status_code=404, include_in_schema=False)
async def webhooks_off(queue: str) -> Response:
    raise ApiError(
        404,
        "webhooks_off",
        "webhooks are off in local mode: new messages wake the worker through "
        "LISTEN/NOTIFY; enqueue with pgmq.send() or POST /queues/{queue}/messages",
    )
