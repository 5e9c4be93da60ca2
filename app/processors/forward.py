"""The `forward` processor: each job POSTed as JSON to a URL, such as a Supabase Edge Function.

    [queues.sms_queue]
    processor = "forward"
    url = "https://<ref>.supabase.co/functions/v1/send-sms"
    headers = { Authorization = "Bearer ${SMS_FUNCTION_KEY}" }
    signing_secret = "${SMS_SIGNING_SECRET}"   # optional: whsec_<base64>
    timeout_seconds = 30                       # optional: the whole request

The body is the job as JSON (UTF-8, compact). With `signing_secret`, each request
carries Standard Webhooks headers: `webhook-id` (the same for every attempt at one
message, derived from the queue and msg_id, or from the job's idempotency key when it
has one, so the receiver can drop a repeat), `webhook-timestamp` (unix seconds) and
`webhook-signature` (`v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`).

What the answer means for the job:

- 2xx: done (acked);
- 429 and 503: retried after their `Retry-After` (seconds or an HTTP date; capped at
  the queue's retry_max_seconds), else after the backoff;
- 408, any other 5xx, a timeout, a connection that failed: retried after the backoff;
- 3xx (redirects are not followed: the signature and headers are for `url` only) and
  every other 4xx: permanent, archived with the status and the answer's first bytes.

One pooled HTTP client serves every forward queue (created in the lifespan). An
answer is read only as far as MAX_RESPONSE_BYTES, without content encoding, so a
receiver cannot make the worker hold an unbounded body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import hmac
import json
import re
import time
from typing import Any, Final

import httpx
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, field_validator

from app import __version__
from app.config import SIGNING_SECRET_PREFIX, is_placeholder
from app.errors import PermanentError, RetryableError
from app.jobs import Message, Resources

MAX_RESPONSE_BYTES: Final = 64 * 1024  # read to reuse the connection; beyond, it is closed
EXCERPT_BYTES: Final = 500  # of an error answer, kept in the dead letter
MAX_HEADERS: Final = 50
MAX_HEADER_VALUE: Final = 8192
MIN_KEY_BYTES: Final = 16
HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
# Set by the worker: a configured header may not replace them.
RESERVED: Final = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "accept-encoding",
        "host",
        "connection",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)
RETRY_AFTER: Final = frozenset({429, 503})
SECRET_HINT: Final = (
    'generate one with: python -c "import base64, secrets; '
    "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\""
)


class ForwardOptions(BaseModel):
    """A forward queue's own keys in queues.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: AnyHttpUrl
    headers: dict[str, SecretStr] = Field(default_factory=dict, max_length=MAX_HEADERS)
    signing_secret: SecretStr | None = None
    timeout_seconds: float = Field(30.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _plain(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        if url.username or url.password:
            raise ValueError("must not hold credentials; send them in headers")
        if url.fragment:
            raise ValueError("must not have a #fragment")
        return url

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, value in headers.items():
            if not HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name[:40]!r} is not a header name")
            if name.lower() in RESERVED:
                raise ValueError(f"{name} is set by the worker and cannot be configured")
            text = value.get_secret_value()
            if len(text) > MAX_HEADER_VALUE:
                raise ValueError(f"the value of {name} is longer than {MAX_HEADER_VALUE}")
            if any(not (char == "\t" or " " <= char <= "~") for char in text):
                # A CR or LF would start another header; anything else non-ASCII
                # is not sent the same way by every HTTP stack.
                raise ValueError(f"the value of {name} holds a control or non-ASCII character")
        return headers

    @field_validator("signing_secret")
    @classmethod
    def _secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is None:
            return None
        text = secret.get_secret_value()
        if not text.startswith(SIGNING_SECRET_PREFIX) or is_placeholder(text):
            raise ValueError(f"must be a whsec_<base64> secret; {SECRET_HINT}")
        try:
            key = base64.b64decode(text.removeprefix(SIGNING_SECRET_PREFIX), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"is not valid base64 after whsec_; {SECRET_HINT}") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"must hold at least {MIN_KEY_BYTES} key bytes; {SECRET_HINT}")
        return secret


def webhook_id(queue: str, message: Message) -> str:
    """The same for every attempt at a message, and for every copy of an idempotency key."""
    key = (message.headers or {}).get("idempotency_key")
    if key is not None:
        digest = hashlib.sha256(f"{queue}\0{key}".encode()).hexdigest()[:32]
        return f"msg_{digest}"
    return f"msg_{queue}_{message.msg_id}"


def signature(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    content = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or an HTTP date), or None."""
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 64:
        return None
    if text.isascii() and text.isdigit():
        return float(text) if len(text) <= 10 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _printable(raw: bytes) -> str:
    text = raw[:EXCERPT_BYTES].decode("utf-8", errors="replace")
    return "".join(char if char.isprintable() else " " for char in text).strip()


class ForwardProcessor:
    """POSTs each job of its queue to one URL."""

    def __init__(self, queue: str, options: ForwardOptions, client: httpx.AsyncClient) -> None:
        self._queue = queue
        self._client = client
        self._url = str(options.url)
        # For messages: never the query string, which may carry a key.
        self._target = f"{options.url.scheme}://{options.url.host}{options.url.path or ''}"
        self._headers = {
            **{name: value.get_secret_value() for name, value in options.headers.items()},
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": f"queue-worker/{__version__}",
        }
        secret = options.signing_secret
        self._key = (
            base64.b64decode(secret.get_secret_value().removeprefix(SIGNING_SECRET_PREFIX))
            if secret is not None
            else None
        )
        self._timeout = options.timeout_seconds
        self._http_timeout = httpx.Timeout(options.timeout_seconds)

    def validate(self, body: Any) -> None:
        """Any JSON is forwarded as it is; the receiver validates it."""

    async def __call__(self, message: Message) -> None:
        body = json.dumps(message.message, ensure_ascii=False, separators=(",", ":")).encode()
        headers = dict(self._headers)
        if self._key is not None:
            identifier = webhook_id(self._queue, message)
            timestamp = int(time.time())
            headers["webhook-id"] = identifier
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = signature(self._key, identifier, timestamp, body)
        try:
            async with asyncio.timeout(self._timeout):
                status, answer, retry = await self._post(body, headers)
        except TimeoutError:
            raise RetryableError(
                f"{self._target} did not answer within {self._timeout:g}s"
            ) from None
        except httpx.HTTPError as error:
            raise RetryableError(
                f"{self._target} could not be reached: {type(error).__name__}"
            ) from None
        if 200 <= status < 300:
            return
        said = f"{self._target} answered {status}" + (f": {answer}" if answer else "")
        if status in RETRY_AFTER:
            raise RetryableError(said, after=retry_after(retry, time.time()))
        if status == 408 or status >= 500:
            raise RetryableError(said)
        if 300 <= status < 400:
            raise PermanentError(
                f"{said} (a redirect; forward does not follow them: set url to the final address)"
            )
        raise PermanentError(said)

    async def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, str, str | None]:
        """(status, the first bytes of the answer, Retry-After), reading a bounded body."""
        async with self._client.stream(
            "POST", self._url, content=body, headers=headers, timeout=self._http_timeout
        ) as response:
            received = bytearray()
            async for chunk in response.aiter_raw():
                received += chunk
                if len(received) > MAX_RESPONSE_BYTES:
                    break  # the rest is never read; leaving closes the connection
            excerpt = "" if response.is_success else _printable(bytes(received))
            return response.status_code, excerpt, response.headers.get("retry-after")


def processor(resources: Resources) -> ForwardProcessor:
    """The built-in `forward` processor (registered in app/processors/registry.py)."""
    options = ForwardOptions.model_validate(resources.options)
    return ForwardProcessor(resources.queue, options, resources.http)
