"""Request bodies: JSON only (415) and no larger than their route allows (413).

An ASGI middleware in front of routing, so that nothing, authentication included,
reads an oversized body: a declared Content-Length above the cap is refused before
a byte is read, and a streamed (chunked) body is counted as it arrives and refused
as soon as it passes the cap. Bodies within the cap are handed on unchanged. A
client that disconnects before its body is complete is one line at info, and the
route is never called.

A body without a Content-Type is taken as JSON, as FastAPI does; the webhook trigger
always sends `Content-Type: application/json` (pg_net sends curl's form type
only when a caller passes `headers => null`).
"""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings

log = logging.getLogger(__name__)

# The one route that takes a large body: a job posted to the manual API.
ENQUEUE_PATH = re.compile(r"^/queues/[^/]+/messages/?$")


def body_caps(settings: Settings) -> Callable[[str], int]:
    """The body cap of a path: the manual API's enqueue route, or the webhook cap."""

    def cap(path: str) -> int:
        if settings.api_token is not None and ENQUEUE_PATH.match(path):
            return settings.max_api_body_bytes
        return settings.max_webhook_body_bytes

    return cap


def is_json(content_type: str) -> bool:
    """`application/json`, optionally with `charset=utf-8` (the only charset read)."""
    media_type, *params = content_type.split(";")
    if media_type.strip().lower() != "application/json":
        return False
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() != "charset":
            return False
        if value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def is_form(content_type: str) -> bool:
    """`application/x-www-form-urlencoded`, what a browser's form posts."""
    return content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded"


# The console's forms (app/api/console.py) post form bodies; every other route takes JSON.
FORM_PREFIX = "/console/"


class BodyLimits:
    """415 unless the body is JSON (a form under /console/); 413 when it is larger than
    `cap(path)` bytes."""

    def __init__(self, app: ASGIApp, *, cap: Callable[[str], int]) -> None:
        self.app = app
        self.cap = cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        cap = self.cap(scope["path"])
        length = headers.get("content-length")
        chunked = "transfer-encoding" in headers
        if length is not None and not length.isdigit():
            await _refuse(send, 400, "bad_request", "Content-Length is not a number")
            return
        if chunked or (length is not None and int(length) > 0):
            content_type = headers.get("content-type")
            if (
                content_type is not None
                and not is_json(content_type)
                and not (scope["path"].startswith(FORM_PREFIX) and is_form(content_type))
            ):
                await _refuse(
                    send,
                    415,
                    "unsupported_media_type",
                    "the body must be application/json (charset utf-8)",
                )
                return
        if length is not None and int(length) > cap:
            await _too_large(send, cap)
            return

        # Read up to the cap, then hand the chunks on as they came.
        received: deque[Message] = deque()
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away (or the server's body deadline closed it): there
                # is no one to answer, and it is the client's doing, not an error.
                log.info(
                    "client disconnected before its request body was complete",
                    extra={"method": scope["method"], "path": scope["path"], "received": size},
                )
                return
            received.append(message)
            size += len(message.get("body", b""))
            if size > cap:
                await _too_large(send, cap)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return received.popleft() if received else await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, cap: int) -> None:
    await _refuse(send, 413, "payload_too_large", f"the body is larger than {cap} bytes")


async def _refuse(send: Send, status: int, error: str, message: str) -> None:
    body = json.dumps({"error": error, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
