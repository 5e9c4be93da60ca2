"""`GET /health` (liveness), `GET /health/ready` (readiness) and `GET /metrics`."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from app.api.deps import Services, get_services
from app.errors import JobError
from app.queue.rpc import RpcError

router = APIRouter(tags=["operations"])

# Each check has a timeout of its own, shorter than the whole answer's, so that one
# that hangs (an SMTP server that accepts and never speaks) is reported as itself,
# and the others still say what they found.
RPC_CHECK_SECONDS = 3.0
SMTP_CHECK_SECONDS = 4.0
READY_BUDGET_SECONDS = 5.0


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process is up and serving. Cheap; touches nothing remote."""
    return {"status": "ok"}


def _direct_sql(services: Services) -> bool:
    """The backend talks SQL to PostgreSQL (local mode or DATABASE_URL), not HTTP."""
    settings = services.settings
    return settings.local_mode or settings.database_url is not None


async def _check_rpc(services: Services) -> str:
    try:
        await services.backend.metrics()
    except RpcError as error:
        if _direct_sql(services):
            # The SQLSTATE says what the database refused; none means no connection.
            return f"failed (SQLSTATE {error.code})" if error.code else "failed (no connection)"
        return f"failed (HTTP {error.status})" if error.status else "failed (no response)"
    return "ok"


# The mail check's answer when no served queue sends mail: passing, and not run.
NOT_NEEDED = "not needed"


async def _check_smtp(services: Services) -> str:
    if not services.mail_queues:
        return NOT_NEEDED
    try:
        await services.mailer.check()
    except JobError as error:
        return f"failed ({error.__cause__.__class__.__name__ if error.__cause__ else 'SMTP'})"
    return "ok"


async def _timed(check: Awaitable[str], seconds: float) -> str:
    try:
        async with asyncio.timeout(seconds):
            return await check
    except TimeoutError:
        return f"failed (timeout after {seconds:g}s)"


async def _within_budget(*checks: Awaitable[str]) -> list[str]:
    """The checks' answers, run together; one that outlives the whole budget (its
    own timeout did not stop it) is reported as such, the others as they are."""
    tasks = [asyncio.ensure_future(check) for check in checks]
    await asyncio.wait(tasks, timeout=READY_BUDGET_SECONDS)
    answers = []
    for task in tasks:
        if task.done():
            answers.append(task.result())
        else:
            task.cancel()
            answers.append(f"failed (no answer within {READY_BUDGET_SECONDS:g}s)")
    return answers


def _check_sweeper(services: Services) -> str:
    last = services.sweeper.last_sweep
    if last is None:
        return "not started"
    age = time.monotonic() - last
    # One interval between passes, plus room for a slow pass.
    if age > 2 * services.sweeper.interval + 30:
        return f"stale (last pass {age:.0f}s ago)"
    return "ok"


@router.get("/health/ready")
async def ready(services: Annotated[Services, Depends(get_services)]) -> JSONResponse:
    """Readiness: the database answers, mail can go out, the sweeper runs.

    The database check is `rpc` (Supabase's RPC API) or `database` (a direct
    connection: DATABASE_URL or local mode); the mail check is `smtp` (connects and
    logs in) or `outbox` (local mode: the directory takes a file), or `not needed`
    without trying when no served queue sends mail. Each runs within
    its own timeout (RPC_CHECK_SECONDS, SMTP_CHECK_SECONDS); a check that fails says
    why: `failed (HTTP 503)`, `failed (timeout after 4s)`, `failed (SMTPAuthenticationError)`.
    Shows no secrets and no configuration values.
    """
    rpc, smtp = await _within_budget(
        _timed(_check_rpc(services), RPC_CHECK_SECONDS),
        _timed(_check_smtp(services), SMTP_CHECK_SECONDS),
    )
    checks = {
        "database" if _direct_sql(services) else "rpc": rpc,
        "outbox" if services.settings.mail_outbox else "smtp": smtp,
        "sweeper": _check_sweeper(services),
    }
    if services.runner.draining:
        checks["shutdown"] = "draining"
    ok = all(value == "ok" for value in checks.values() if value != NOT_NEEDED)
    return JSONResponse(
        {"status": "ready" if ok else "not ready", "checks": checks},
        status_code=200 if ok else 503,
    )


def _registry() -> CollectorRegistry:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        # Several worker processes: merge what each wrote to the shared directory.
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(
    request: Request, services: Annotated[Services, Depends(get_services)]
) -> Response:
    """Prometheus exposition, text 0.0.4 by default or what the scraper's Accept asks."""
    await services.queue_stats.refresh()
    services.runner.flush_metrics()
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(_registry()), media_type=content_type)
