"""The thin HTTP layer: webhooks, health and metrics. Routes hand work to the runner."""

from fastapi import APIRouter

from app.api import health, webhooks

router = APIRouter()
router.include_router(webhooks.router)
router.include_router(health.router)

__all__ = ["router"]
