"""Dependencies: the lifespan's services, and bearer-secret verification."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from app.api.errors import ApiError
from app.config import Settings
from app.worker import Runner, Sweeper


@dataclass(frozen=True)
class Services:
    """Everything long-lived that routes need, created by the lifespan."""

    settings: Settings
    runner: Runner
    sweeper: Sweeper


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


class BearerSecret:
    """Checks `Authorization: Bearer <secret>` in constant time.

    `setting` names the Settings field holding the secret. An empty secret is
    never accepted: it would verify anything.
    """

    def __init__(self, setting: str) -> None:
        self._setting = setting

    def __call__(self, request: Request) -> None:
        settings = get_services(request).settings
        secret = getattr(settings, self._setting).get_secret_value().encode()
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
