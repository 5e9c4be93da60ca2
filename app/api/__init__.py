"""The thin HTTP layer: webhooks, health and metrics. Routes hand work to the runner."""

from fastapi import APIRouter

from app.api import health, webhooks
from app.config import Settings

# Included one by one into the app, webhooks first: FastAPI matches a request against
# each route in turn, through every level of included routers, and the webhook is the
# route that takes the traffic (bench/README.md, "Webhook path").
ROUTERS = (webhooks.router, health.router)


def routers(settings: Settings) -> tuple[APIRouter, ...]:
    """ROUTERS; without a webhook secret (local mode) webhooks are off and say so."""
    if settings.webhook_secret is None:
        return (webhooks.off_router, health.router)
    return ROUTERS


__all__ = ["ROUTERS", "routers"]
