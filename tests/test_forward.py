"""The `forward` processor against a real HTTP server on loopback.

The receiver is a Starlette app served by uvicorn in a thread, answering as each
test scripts it. Signatures are checked with the `standardwebhooks` package (the
Standard Webhooks reference implementation), not with the sender's own code.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from app.errors import PermanentError, RetryableError
from app.processors.forward import MAX_RESPONSE_BYTES, ForwardOptions, ForwardProcessor
from app.queue.models import QueueMessage
from tests.support.servers import bound_socket, serve_in_thread

pytestmark = pytest.mark.anyio

# 32 bytes of key, base64: a test-only secret.
SECRET = "whsec_" + "dGVzdC1vbmx5LWZvcndhcmQta2V5LTMyLWJ5dGVzISE="


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    endless: bool = False  # stream a body that never ends


@dataclass
class Receiver:
    """Records each request; answers with the next scripted Answer (200 by default)."""

    url: str = ""
    script: list[Answer] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    streamed: int = 0

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        self.requests.append((dict(request.headers), body))
        answer = self.script.pop(0) if self.script else Answer()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if answer.endless:

            async def chunks() -> AsyncIterator[bytes]:
                while True:
                    self.streamed += 65536
                    yield b"x" * 65536
                    await asyncio.sleep(0)

            return StreamingResponse(chunks(), status_code=answer.status)
        return Response(answer.body, status_code=answer.status, headers=answer.headers)


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[Receiver]:
    receiver = Receiver()
    app = Starlette(routes=[Route("/hook", receiver.handle, methods=["POST"])])
    with serve_in_thread(app) as url:
        receiver.url = f"{url}/hook"
        yield receiver


@pytest.fixture
def receiver(receiver_server: Receiver) -> Receiver:
    receiver_server.script.clear()
    receiver_server.requests.clear()
    return receiver_server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as http:
        yield http


def forward(
    client: httpx.AsyncClient, url: str, queue: str = "sms_queue", **options: Any
) -> ForwardProcessor:
    return ForwardProcessor(queue, ForwardOptions.model_validate({"url": url, **options}), client)


def message(body: Any, msg_id: int = 7, headers: dict[str, Any] | None = None) -> QueueMessage:
    return QueueMessage.model_validate(
        {
            "msg_id": msg_id,
            "read_ct": 1,
            "enqueued_at": "2026-12-01T00:00:00Z",
            "vt": "2026-12-01T00:00:30Z",
            "message": body,
            "headers": headers,
        }
    )


async def test_2xx_acks_and_the_body_is_the_job_as_json(
    receiver: Receiver, client: httpx.AsyncClient
) -> None:
    receiver.script = [Answer(200), Answer(204)]
    processor = forward(client, receiver.url, headers={"Authorization": "Bearer fn-key-123"})
    job = {"to": "+15550100", "text": "Привет", "n": [1, 2.5, None]}
    await processor(message(job))
    await processor(message(job, msg_id=8))
    (headers, body), _ = receiver.requests
    assert json.loads(body) == job
    assert headers["content-type"] == "application/json"
    assert headers["authorization"] == "Bearer fn-key-123"
    assert headers["user-agent"].startswith("queue-worker/")
    assert "webhook-signature" not in headers  # no signing_secret: no signature


async def test_the_signature_verifies_with_the_standard_webhooks_library(
    receiver: Receiver, client: httpx.AsyncClient
) -> None:
    processor = forward(client, receiver.url, signing_secret=SECRET)
    job = {"to": "+15550100", "text": "ünïcødé"}
    await processor(message(job))
    await processor(message(job))  # a retry of the same message
    verifier = Webhook(SECRET)
    ids = []
    for headers, body in receiver.requests:
        assert verifier.verify(body, headers) == job  # raises when it does not verify
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
        ids.append(headers["webhook-id"])
    assert ids == ["msg_sms_queue_7", "msg_sms_queue_7"]  # stable per message
    # Another key does not verify: the check above could fail.
    other = Webhook("whsec_" + "b3RoZXItdGVzdC1vbmx5LWtleS0zMi1ieXRlcyEhISE=")
    headers, body = receiver.requests[0]
    with pytest.raises(Exception, match="No matching signature"):
        other.verify(body, headers)


async def test_the_webhook_id_follows_the_idempotency_key_when_there_is_one(
    receiver: Receiver, client: httpx.AsyncClient
) -> None:
    processor = forward(client, receiver.url, signing_secret=SECRET)
    await processor(message({"n": 1}, msg_id=1, headers={"idempotency_key": "order-17"}))
    await processor(message({"n": 1}, msg_id=2, headers={"idempotency_key": "order-17"}))
    await processor(message({"n": 1}, msg_id=3, headers={"idempotency_key": "order-18"}))
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert ids[0] == ids[1] != ids[2]
    assert all(i.startswith("msg_") and len(i) <= 40 for i in ids)


@pytest.mark.parametrize("status", [429, 503])
async def test_429_and_503_retry_after_their_retry_after_seconds(
    receiver: Receiver, client: httpx.AsyncClient, status: int
) -> None:
    receiver.script = [Answer(status, {"Retry-After": "17"}, b"slow down")]
    with pytest.raises(RetryableError) as caught:
        await forward(client, receiver.url)(message({"n": 1}))
    assert caught.value.after == 17
    assert f"answered {status}: slow down" in str(caught.value)


async def test_retry_after_as_an_http_date(receiver: Receiver, client: httpx.AsyncClient) -> None:
    when = datetime.now(UTC) + timedelta(seconds=120)
    receiver.script = [Answer(503, {"Retry-After": format_datetime(when, usegmt=True)})]
    with pytest.raises(RetryableError) as caught:
        await forward(client, receiver.url)(message({"n": 1}))
    assert caught.value.after is not None and 110 <= caught.value.after <= 121


@pytest.mark.parametrize("value", ["soon", "-5", "99999999999999", "Mon, 99 Foo 2026"])
async def test_a_retry_after_that_does_not_parse_means_the_backoff(
    receiver: Receiver, client: httpx.AsyncClient, value: str
) -> None:
    receiver.script = [Answer(429, {"Retry-After": value})]
    with pytest.raises(RetryableError) as caught:
        await forward(client, receiver.url)(message({"n": 1}))
    assert caught.value.after is None


@pytest.mark.parametrize("status", [500, 502, 504, 408])
async def test_other_5xx_and_408_retry_with_backoff(
    receiver: Receiver, client: httpx.AsyncClient, status: int
) -> None:
    receiver.script = [Answer(status, {"Retry-After": "5"}, b"boom")]
    with pytest.raises(RetryableError) as caught:
        await forward(client, receiver.url)(message({"n": 1}))
    assert caught.value.after is None
    assert f"answered {status}: boom" in str(caught.value)


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
async def test_other_4xx_are_permanent_with_the_status_and_the_first_bytes(
    receiver: Receiver, client: httpx.AsyncClient, status: int
) -> None:
    answer = b'{"error": "invalid phone number"}' + b" " * 1000 + b"TAIL-NOT-KEPT"
    receiver.script = [Answer(status, body=answer)]
    with pytest.raises(PermanentError) as caught:
        await forward(client, receiver.url + "?apikey=sk_test_in_query")(message({"n": 1}))
    text = str(caught.value)
    assert f"/hook answered {status}: " in text
    assert '{"error": "invalid phone number"}' in text
    assert "TAIL-NOT-KEPT" not in text and len(text) < 700
    assert "sk_test_in_query" not in text  # the query string may carry a key


async def test_a_redirect_is_permanent_and_not_followed(
    receiver: Receiver, client: httpx.AsyncClient
) -> None:
    receiver.script = [Answer(307, {"Location": receiver.url})]
    with pytest.raises(PermanentError, match="answered 307.*does not follow"):
        await forward(client, receiver.url, signing_secret=SECRET)(message({"n": 1}))
    assert len(receiver.requests) == 1


async def test_a_slow_receiver_is_a_timeout_retried_with_backoff(
    receiver: Receiver, client: httpx.AsyncClient
) -> None:
    receiver.script = [Answer(200, delay=3)]
    started = time.monotonic()
    with pytest.raises(RetryableError, match="did not answer within 0.5s") as caught:
        await forward(client, receiver.url, timeout_seconds=0.5)(message({"n": 1}))
    assert time.monotonic() - started < 2.5
    assert caught.value.after is None


async def test_an_endless_answer_is_never_read_whole(
    receiver: Receiver, client: httpx.AsyncClient
) -> None:
    receiver.script = [Answer(200, endless=True), Answer(500, endless=True)]
    processor = forward(client, receiver.url, timeout_seconds=10)
    started = time.monotonic()
    await processor(message({"n": 1}))  # read whole, it would time out after 10 s
    with pytest.raises(RetryableError, match="answered 500: x{10}") as caught:
        await processor(message({"n": 2}))
    assert time.monotonic() - started < 5
    assert len(str(caught.value)) < 700
    assert receiver.streamed > MAX_RESPONSE_BYTES  # there was more than the bound to read


def free_port() -> int:
    with bound_socket() as sock:
        return int(sock.getsockname()[1])


async def test_a_refused_connection_is_retried_with_backoff(client: httpx.AsyncClient) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"
    with pytest.raises(RetryableError, match="could not be reached: ConnectError") as caught:
        await forward(client, url)(message({"n": 1}))
    assert caught.value.after is None
