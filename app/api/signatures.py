"""Standard Webhooks signatures on incoming webhooks, and the replay cache.

A signed webhook carries `webhook-id`, `webhook-timestamp` (unix seconds) and
`webhook-signature`: space-separated `v1,<base64 HMAC-SHA256>` entries over
`{id}.{timestamp}.{raw body}`; several entries let a sender sign with an old and a
new key while rotating. The key is the webhook secret: `whsec_<base64>` decoded,
or a plain string's UTF-8 bytes (`app.config.signing_key`); the database trigger
(supabase/migrations/20261127000300_signed_webhooks.sql) signs the same way.

A timestamp more than `TOLERANCE_SECONDS` away from now is refused, so a captured
request cannot be replayed later; within that window the route remembers each
signed `webhook-id` (`ReplayCache`) and answers a repeat as a duplicate.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from app.api.errors import ApiError
from app.config import signing_key

if TYPE_CHECKING:
    from app.api.deps import Services

TOLERANCE_SECONDS = 300
MAX_ID_LENGTH = 256
MAX_SIGNATURES = 10
SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


class SignatureError(Exception):
    """A signed request that does not verify; `str()` says why, never with a key."""


@dataclass(frozen=True)
class SignedWebhook:
    """A webhook whose signature verified: its id and the time it was signed."""

    id: str
    timestamp: int


def sign(key: bytes, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    """The `v1,<base64>` signature of a request, as a Standard Webhooks sender makes it."""
    content = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def verify(
    keys: Sequence[bytes],
    webhook_id: str,
    timestamp: str,
    signatures: str,
    body: bytes,
    *,
    now: float,
    tolerance: float = TOLERANCE_SECONDS,
) -> SignedWebhook:
    """Checks one request's headers against `keys`; raises SignatureError."""
    if not keys or not all(keys):
        # An empty key would verify anything; settings refuse one, this is the last guard.
        raise SignatureError("no signing key configured")
    if not 0 < len(webhook_id) <= MAX_ID_LENGTH or not webhook_id.isprintable():
        raise SignatureError("webhook-id is missing or malformed")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise SignatureError("webhook-timestamp is missing or not unix seconds")
    signed_at = int(timestamp)
    if abs(now - signed_at) > tolerance:
        raise SignatureError(f"webhook-timestamp is more than {int(tolerance)} s from now")
    entries = signatures.split()
    if not entries or len(entries) > MAX_SIGNATURES:
        raise SignatureError("webhook-signature is missing or has too many entries")
    expected = [sign(key, webhook_id, timestamp, body).encode() for key in keys]
    ok = False
    for entry in entries:
        if not entry.startswith("v1,"):
            continue  # another scheme (v1a: asymmetric) is not ours to check
        given = entry.encode()
        for candidate in expected:
            ok |= hmac.compare_digest(given, candidate)
    if not ok:
        raise SignatureError("no webhook-signature matches")
    return SignedWebhook(webhook_id, signed_at)


class WebhookSignature:
    """FastAPI dependency: verifies a Standard Webhooks signature against settings.

    `settings` name the Settings fields holding accepted secrets (current, then
    previous while rotating). Returns None when the request carries none of the
    signature headers (the caller then requires a bearer token), the verified
    `SignedWebhook` otherwise; a bad signature is a 401.
    """

    def __init__(self, *settings: str, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock

    async def __call__(self, request: Request) -> SignedWebhook | None:
        headers = request.headers
        if not any(name in headers for name in SIGNATURE_HEADERS):
            return None
        services: Services = request.app.state.services
        keys = []
        for name in self._settings:
            secret = getattr(services.settings, name)
            if secret is not None:
                keys.append(signing_key(secret.get_secret_value()))
        try:
            return verify(
                keys,
                headers.get("webhook-id", ""),
                headers.get("webhook-timestamp", ""),
                headers.get("webhook-signature", ""),
                await request.body(),
                now=self._clock(),
            )
        except SignatureError as error:
            raise ApiError(401, "unauthorized", f"invalid webhook signature: {error}") from None


class ReplayCache:
    """The signed webhook ids seen lately, in this process, bounded in size.

    An id is kept until its timestamp leaves the tolerance window: after that the
    timestamp check refuses a replay anyway. When full, the oldest ids go first;
    a replay that slips through then costs one claim that finds nothing to do.
    """

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        tolerance: float = TOLERANCE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._max_entries = max_entries
        self._tolerance = tolerance
        self._clock = clock

    def __len__(self) -> int:
        return len(self._seen)

    def first_seen(self, signed: SignedWebhook) -> bool:
        """Records the id; False when it was seen (and not forgotten) before."""
        now = self._clock()
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now and len(self._seen) < self._max_entries:
                break
            del self._seen[oldest]
        if signed.id in self._seen:
            return False
        self._seen[signed.id] = signed.timestamp + self._tolerance
        return True

    def forget(self, signed: SignedWebhook) -> None:
        """Lets a sender's retry through: the first attempt was not answered with success."""
        self._seen.pop(signed.id, None)
