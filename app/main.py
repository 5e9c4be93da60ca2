"""The application: `create_app()` and the lifespan that owns every long-lived resource.

`uvicorn app.main:app` serves it; `app` is built on first access, so importing this
module (as the tests do) reads no settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import multiprocess
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import __version__, local, preflight
from app.api import console, queues, routers, schedules
from app.api.deps import Services
from app.api.errors import ApiError, http_error, internal_error, invalid_request
from app.api.limits import BodyLimits, body_caps
from app.config import ConfigError, Settings, load_settings
from app.logs import RequestIdMiddleware, configure
from app.mail import Mailer, MailNotConfigured
from app.metrics import QueueStats
from app.outbox import Outbox
from app.processors.registry import (
    QueuePlan,
    QueueSpec,
    build_processors,
    load_queues,
    require_mail,
)
from app.queue.backend import QueueBackend, RpcCaller
from app.queue.coalesce import CoalescingQueue
from app.queue.rpc import RpcError, RpcQueue, SupabaseRpc
from app.queue.sql import SqlQueue
from app.tracing import OFF, Tracing, open_tracing
from app.worker import RetryPolicy, Runner, RunnerConfig, Sweeper, shutdown
from app.worker.doorbell import Doorbell
from app.worker.pauses import PAUSE_POLL_SECONDS, PauseWatch
from app.worker.retention import Retention

log = logging.getLogger(__name__)


def serving_plan(settings: Settings) -> QueuePlan:
    """The queues this process serves (queues.toml or the built-in ones, narrowed by
    `QUEUES`), every one checked, and the mail settings if one of them sends mail;
    ConfigError with one line otherwise."""
    plan = load_queues(settings)
    require_mail(settings, plan)
    return plan


def served_queues(settings: Settings) -> list[str]:
    """The names of `serving_plan`'s queues."""
    return serving_plan(settings).names


def coalescing(inner: QueueBackend, settings: Settings) -> CoalescingQueue:
    """`inner` with the claims, acks, retries and archives of concurrent jobs batched."""
    return CoalescingQueue(
        inner,
        max_batch=settings.coalesce_max_batch,
        flush_interval=settings.coalesce_flush_ms / 1000,
    )


@asynccontextmanager
async def open_backend(
    settings: Settings, queues: Sequence[str] = ()
) -> AsyncIterator[tuple[QueueBackend, RpcCaller]]:
    """The database behind the queue interface, as the settings choose it.

    Local mode: the embedded PostgreSQL (app/local.py), started or joined here and
    left at the end, with `queues` attached. DATABASE_URL: a direct connection
    pool. Both run the worker's functions over SQL (`SqlQueue`, its own RPC
    caller). Otherwise the same
    functions through Supabase's RPC API (`RpcQueue` over `SupabaseRpc`).
    """
    if settings.local_mode or settings.database_url is not None:
        async with AsyncExitStack() as stack:
            if settings.database_url is not None:
                url = settings.database_url.get_secret_value()
            else:
                database = local.EmbeddedDatabase(settings.data_dir)
                url = await asyncio.to_thread(database.start)
                # The embedded database is the service's own: its queues are attached here.
                await asyncio.to_thread(local.attach_queues, url, queues)
                stack.push_async_callback(asyncio.to_thread, database.stop)
            pool = SqlQueue.create_pool(
                url, max_size=settings.database_pool_size, timeout=settings.rpc_timeout_seconds
            )
            await pool.open(wait=False)
            stack.push_async_callback(pool.close)
            queue = SqlQueue(pool, schema=settings.rpc_schema, timeout=settings.rpc_timeout_seconds)
            yield queue, queue
        return
    client = SupabaseRpc.create_client(
        str(settings.supabase_url),
        settings.supabase_headers,
        timeout=settings.rpc_timeout_seconds,
        max_connections=max(20, 2 * settings.max_concurrency),
    )
    async with client:
        rpc = SupabaseRpc(client, schema=settings.rpc_schema)
        yield RpcQueue(rpc), rpc


def open_mailer(settings: Settings, tracing: Tracing = OFF) -> Mailer:
    """SMTP, or in local mode without SMTP_HOST the outbox directory; without the mail
    settings (no served queue sends mail, `require_mail`), one that refuses to send."""
    if settings.mail_outbox:
        return Outbox(settings, local.outbox_dir(settings.data_dir))
    missing = settings.missing_mail()
    if missing:
        return MailNotConfigured(settings, missing)
    return Mailer(settings, tracing=tracing)


def runner_config(settings: Settings) -> RunnerConfig:
    return RunnerConfig(
        visibility_timeout=settings.visibility_timeout_seconds,
        job_timeout=settings.job_timeout_seconds,
        max_concurrency=settings.max_concurrency,
        retry=RetryPolicy(
            max_attempts=settings.max_attempts,
            base_delay=settings.retry_base_seconds,
            max_delay=settings.retry_max_seconds,
        ),
    )


def queue_config(spec: QueueSpec) -> RunnerConfig:
    """The runner's limits for one queue (its spec, global settings filled in)."""
    return RunnerConfig(
        visibility_timeout=spec.visibility_timeout_seconds,
        job_timeout=spec.job_timeout_seconds,
        max_concurrency=spec.max_concurrency,
        retry=RetryPolicy(
            max_attempts=spec.max_attempts,
            base_delay=spec.retry_base_seconds,
            max_delay=spec.retry_max_seconds,
        ),
        rate_per_second=spec.rate_per_second,
    )


def open_http(plan: QueuePlan, tracing: Tracing = OFF) -> httpx.AsyncClient:
    """The one pooled HTTP client that `forward` and plugins share (Resources.http).

    Enough connections for every served job at once; no redirects followed, and each
    request sets its own timeout (the default here is a backstop). With tracing on,
    each request is a client span and carries its trace context.
    """
    slots = sum(spec.max_concurrency for spec in plan.queues.values())
    size = max(10, min(slots, 1000))
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(30.0),
        limits=limits,
        # A transport given here takes the limits the client would have given its own.
        transport=tracing.http_transport(httpx.AsyncHTTPTransport(limits=limits))
        if tracing.enabled
        else None,
        follow_redirects=False,
        headers={"User-Agent": f"queue-worker/{__version__}"},
    )


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return JSONResponse(error.detail, status_code=error.status_code, headers=error.headers)


async def _rpc_error(request: Request, error: Exception) -> JSONResponse:
    # Only the manual API lets a queue call's failure reach a response; the details
    # stay in the log, the caller learns that the database did not answer as it should
    # (through Supabase's API, or directly with DATABASE_URL / local mode).
    log.warning("request failed on a queue call", extra={"error": str(error)})
    return JSONResponse(
        {"error": "queue_unavailable", "message": "the queue database call failed; try again"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


async def warn_at_start(settings: Settings, rpc: RpcCaller, queues: Sequence[str]) -> None:
    """One warning per failed database check of `queue-worker check`, with its fix."""
    if settings.local_mode:
        return
    failures = await preflight.at_start(settings, rpc, queues)
    for result in failures:
        log.warning(
            "start-up check failed",
            extra={"check": result.name, "detail": result.detail, "fix": result.fix or ""},
        )
    if not failures:
        log.info("start-up checks passed", extra={"queues": ",".join(queues)})


def create_app(settings: Settings | None = None) -> FastAPI:
    """Builds the app. Without `settings`, they are read from the environment."""
    settings = local.with_local_token(settings or load_settings())
    # Every queue checked (file, keys, imports, mail settings) before anything starts.
    plan = serving_plan(settings)
    # OFF unless asked for: then OpenTelemetry is imported here (app/tracing.py).
    tracing = open_tracing(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with (
            open_backend(settings, plan.names) as (database, rpc),
            open_http(plan, tracing) as http,
        ):
            backend = coalescing(database, settings)
            mailer = open_mailer(settings, tracing)
            processors = await build_processors(
                plan, settings=settings, http=http, mailer=mailer, rpc=rpc
            )
            runner = Runner(
                backend,
                processors,
                runner_config(settings),
                {name: queue_config(spec) for name, spec in plan.queues.items()},
                # Local mode has no webhooks, so no doorbell that could fail.
                doorbell=None
                if settings.local_mode
                else Doorbell(plan.names, grace=settings.missed_webhook_grace_seconds),
                tracing=tracing,
                prefetch=settings.prefetch,
                ack_delay=settings.ack_max_delay_ms / 1000,
                # As large as a read, so a drained batch is acked in one call (1: off).
                ack_batch=(
                    1
                    if settings.coalesce_max_batch == 1
                    else max(settings.coalesce_max_batch, settings.sweep_batch_size)
                ),
            )
            sweeper = Sweeper(
                runner,
                interval=settings.sweep_interval_seconds,
                batch_size=settings.sweep_batch_size,
            )
            pauses = PauseWatch(backend, runner, sweeper, interval=PAUSE_POLL_SECONDS)
            retention = (
                Retention(backend, runner.queues, days=settings.archive_retention_days)
                if settings.archive_retention_days is not None
                else None
            )
            # Local mode has no webhooks: pgmq's insert notifications ring instead.
            wakeups = (
                local.InsertWakeups(rpc.conninfo, runner, batch_size=settings.sweep_batch_size)
                if settings.local_mode and isinstance(rpc, SqlQueue)
                else None
            )
            app.state.services = Services(
                settings=settings,
                backend=backend,
                processors=processors,
                mailer=mailer,
                runner=runner,
                sweeper=sweeper,
                queue_stats=QueueStats(backend, max_age=settings.metrics_cache_seconds),
                rpc=rpc,
                pauses=pauses,
                tracing=tracing,
                mail_queues=tuple(plan.mail_queues),
            )
            draining: list[asyncio.Task[None]] = []

            async def drain_once() -> None:
                log.info("draining", extra={"in_flight": runner.in_flight()})
                if wakeups is not None:
                    await wakeups.stop()
                await pauses.stop()
                if retention is not None:
                    await retention.stop()
                await sweeper.stop()
                await runner.drain(settings.shutdown_grace_seconds)
                log.info("drained")

            async def drain() -> None:
                # One drain, however it was asked for (a signal, then uvicorn's own
                # shutdown): a later caller waits for the drain under way, so that
                # shutdown never goes on while jobs still run.
                if not draining:
                    draining.append(asyncio.create_task(drain_once(), name="drain"))
                await asyncio.shield(draining[0])

            runner.start()
            # Paused queues known before the first sweep, so it reads none of them (a
            # database that does not answer delays the start 2 s at most: the claim
            # refuses a paused queue anyway).
            with contextlib.suppress(RpcError, TimeoutError):
                async with asyncio.timeout(2):
                    await pauses.refresh()
            pauses.start()
            sweeper.start()
            if retention is not None:
                retention.start()
            if wakeups is not None:
                wakeups.start()
            restore_signals = shutdown.install(drain, runner.hurry)
            # What start-up built lives as long as the process. Frozen out of the
            # collector's sight, it is not scanned again by every full collection,
            # which stalled the loop for up to 100 ms under load (bench/README.md).
            gc.collect()
            gc.freeze()
            log.info("queue-worker started", extra={"queues": ",".join(sorted(runner.queues))})
            checked = asyncio.create_task(
                warn_at_start(settings, rpc, sorted(runner.queues)), name="check at start"
            )
            app.state.checked_at_start = checked
            if settings.local_mode:
                print(local.banner(settings), file=sys.stderr, flush=True)  # noqa: T201
            try:
                yield
            finally:
                restore_signals()
                checked.cancel()
                await drain()
                await runner.close()
                await backend.close()  # sends claims/acks still batched
                await mailer.close()
                tracing.shutdown()  # sends the spans still buffered
                if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
                    # This process's live gauges (jobs in progress) stop counting.
                    multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
                gc.unfreeze()
                log.info("queue-worker stopped")

    app = FastAPI(
        title="queue-worker",
        version=__version__,
        lifespan=lifespan,
        # The schema maps the attack surface: served only with ENABLE_DOCS=true.
        docs_url="/docs" if settings.enable_docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.enable_docs else None,
    )
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RpcError, _rpc_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    # Every other error answer in the same shape: 404, 405, and a 500 from a bug.
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    # Added first so it runs inside RequestIdMiddleware: refusals carry a request id too.
    app.add_middleware(BodyLimits, cap=body_caps(settings))
    app.add_middleware(RequestIdMiddleware)
    for router in routers(settings):
        app.include_router(router)
    if settings.api_token is not None:
        app.include_router(queues.router)
        app.include_router(schedules.router)
        app.include_router(console.router)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` looks `app` up here. Building it lazily keeps settings
    # out of import time, and turns a configuration error into one line and exit 2.
    if name != "app":
        raise AttributeError(name)
    try:
        settings = load_settings()
        served_queues(settings)
    except ConfigError as error:
        print(f"queue-worker: {error}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
    configure(settings.log_level, settings.log_format)
    application = create_app(settings)
    globals()["app"] = application
    return application
