"""The thin HTTP layer: webhooks, health and metrics. Routes hand work to the runner."""

from app.api import health, webhooks

# Included one by one into the app, webhooks first: FastAPI matches a request against
# each route in turn, through every level of included routers, and the webhook is the
# route that takes the traffic (bench/README.md, "Webhook path").
ROUTERS = (webhooks.router, health.router)

__all__ = ["ROUTERS"]
