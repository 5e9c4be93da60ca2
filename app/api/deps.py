"""Dependencies: the lifespan's services, and bearer-secret verification."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from app.api.errors import ApiError
from app.config import Settings
from app.mail import Mailer
from app.metrics import QueueStats
from app.processors import Registry
from app.queue.backend import QueueBackend
from app.worker import Runner, Sweeper


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


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


class BearerSecret:
    """Checks `Authorization: Bearer <secret>` in constant time.

    `setting` names the Settings field holding the secret. An empty or unset
    secret is never accepted: it would verify anything.
    """

    def __init__(self, setting: str) -> None:
        self._setting = setting

    def __call__(self, request: Request) -> None:
        configured = getattr(get_services(request).settings, self._setting)
        secret = configured.get_secret_value().encode() if configured is not None else b""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        ok = (
            bool(secret)
            and scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip().encode(), secret)
        )
        if not ok:
            raise ApiError(
                401,
                "unauthorized",
                "missing or invalid bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
