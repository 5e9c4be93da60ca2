"""Dependencies: the lifespan's services, and bearer-secret verification."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from fastapi import Request

from app.api.errors import ApiError
from app.api.signatures import ReplayCache
from app.config import Settings
from app.mail import Mailer
from app.metrics import QueueStats
from app.processors import Registry
from app.queue.backend import QueueBackend, RpcCaller
from app.tracing import OFF, Tracing
from app.worker import Runner, Sweeper
from app.worker.pauses import PauseWatch


@dataclass(frozen=True)
class Services:
    """Everything long-lived that routes need, created by the lifespan."""

    settings: Settings
    backend: QueueBackend
    processors: Registry
    mailer: Mailer
    runner: Runner
    sweeper: Sweeper
    queue_stats: QueueStats
    # The worker's schema functions by name (schedules call them).
    rpc: RpcCaller
    # Which queues are paused, mirrored from the database (app/worker/pauses.py).
    pauses: PauseWatch
    # Signed webhook ids seen lately (per process; see app/api/signatures.py).
    replays: ReplayCache = field(default_factory=ReplayCache)
    # Spans, or OFF (app/tracing.py).
    tracing: Tracing = OFF
    # The served queues that send mail; none: readiness does not check the mailer.
    mail_queues: tuple[str, ...] = ()


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


class BearerSecret:
    """Checks `Authorization: Bearer <secret>` in constant time.

    `settings` name the Settings fields holding accepted secrets (a current and a
    previous one while rotating). An empty or unset secret is never accepted: it
    would verify anything.
    """

    def __init__(self, *settings: str) -> None:
        self._settings = settings
        # The secrets as bytes, for the Settings object they were read from: encoded
        # once, not on every request.
        self._encoded: tuple[Settings, tuple[bytes, ...]] | None = None

    def _secrets(self, config: Settings) -> tuple[bytes, ...]:
        if self._encoded is None or self._encoded[0] is not config:
            values = (getattr(config, name) for name in self._settings)
            secrets = tuple(v.get_secret_value().encode() for v in values if v is not None)
            self._encoded = (config, tuple(s for s in secrets if s))
        return self._encoded[1]

    def matches(self, request: Request) -> bool:
        """Whether the request carries one of the configured secrets as its bearer token."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        ok = False
        for secret in self._secrets(get_services(request).settings):
            # Every secret is compared, so the time taken does not tell which one matched.
            ok |= hmac.compare_digest(given, secret)
        return ok

    def __call__(self, request: Request) -> None:
        if not self.matches(request):
            raise ApiError(
                401,
                "unauthorized",
                "missing or invalid bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
