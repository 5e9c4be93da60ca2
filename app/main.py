"""The application: `create_app()` and the lifespan that owns every long-lived resource.

`uvicorn app.main:app` serves it; `app` is built on first access, so importing this
module (as the tests do) reads no settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import multiprocess

from app import __version__
from app.api import queues, router
from app.api.deps import Services
from app.api.errors import ApiError
from app.config import ConfigError, Settings, load_settings
from app.logs import RequestIdMiddleware, configure
from app.mail import Mailer
from app.metrics import QueueStats
from app.processors import Registry
from app.processors.email import EmailProcessor
from app.queue.rpc import RpcError, RpcQueue, SupabaseRpc
from app.worker import RetryPolicy, Runner, RunnerConfig, Sweeper, shutdown

log = logging.getLogger(__name__)


def build_registry(mailer: Mailer) -> Registry:
    """The queues this service serves, each with its processor."""
    return {"email_queue": EmailProcessor(mailer)}


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


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return JSONResponse(error.detail, status_code=error.status_code, headers=error.headers)


async def _rpc_error(request: Request, error: Exception) -> JSONResponse:
    # Only the manual API lets an RPC failure reach a response; the details stay in
    # the log, the caller learns that Supabase did not answer as it should.
    log.warning("request failed on an RPC", extra={"error": str(error)})
    return JSONResponse(
        {"error": "supabase_unavailable", "message": "the Supabase API call failed; try again"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Builds the app. Without `settings`, they are read from the environment."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = SupabaseRpc.create_client(
            str(settings.supabase_url),
            settings.supabase_headers,
            timeout=settings.rpc_timeout_seconds,
            max_connections=max(20, 2 * settings.max_concurrency),
        )
        async with client:
            backend = RpcQueue(SupabaseRpc(client, schema=settings.rpc_schema))
            mailer = Mailer(settings)
            processors = build_registry(mailer)
            runner = Runner(backend, processors, runner_config(settings))
            sweeper = Sweeper(
                runner,
                interval=settings.sweep_interval_seconds,
                batch_size=settings.sweep_batch_size,
            )
            app.state.services = Services(
                settings=settings,
                backend=backend,
                processors=processors,
                mailer=mailer,
                runner=runner,
                sweeper=sweeper,
                queue_stats=QueueStats(backend, max_age=settings.metrics_cache_seconds),
            )
            drained = asyncio.Event()

            async def drain() -> None:
                if drained.is_set():
                    return
                drained.set()
                log.info("draining", extra={"in_flight": runner.in_flight()})
                await sweeper.stop()
                await runner.drain(settings.shutdown_grace_seconds)
                log.info("drained")

            runner.start()
            sweeper.start()
            restore_signals = shutdown.install(drain)
            log.info("queue-worker started", extra={"queues": ",".join(sorted(runner.queues))})
            try:
                yield
            finally:
                restore_signals()
                await drain()
                await runner.close()
                if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
                    # This process's live gauges (jobs in progress) stop counting.
                    multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
                log.info("queue-worker stopped")

    app = FastAPI(
        title="queue-worker",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RpcError, _rpc_error)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(router)
    if settings.api_token is not None:
        app.include_router(queues.router)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` looks `app` up here. Building it lazily keeps settings
    # out of import time, and turns a configuration error into one line and exit 2.
    if name != "app":
        raise AttributeError(name)
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"queue-worker: {error}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
    configure(settings.log_level, settings.log_format)
    application = create_app(settings)
    globals()["app"] = application
    return application
