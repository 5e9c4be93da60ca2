"""The application: `create_app()` and the lifespan that owns every long-lived resource.

`uvicorn app.main:app` serves it; `app` is built on first access, so importing this
module (as the tests do) reads no settings.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app import __version__
from app.api import router
from app.api.deps import Services
from app.api.errors import ApiError
from app.config import ConfigError, Settings, load_settings
from app.logs import configure
from app.mail import Mailer
from app.processors import Registry
from app.processors.email import EmailProcessor
from app.queue.rpc import RpcQueue, SupabaseRpc
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
            runner = Runner(backend, build_registry(Mailer(settings)), runner_config(settings))
            sweeper = Sweeper(
                runner,
                interval=settings.sweep_interval_seconds,
                batch_size=settings.sweep_batch_size,
            )
            app.state.services = Services(settings=settings, runner=runner, sweeper=sweeper)
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
    app.include_router(router)
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
    configure(settings.log_level)
    application = create_app(settings)
    globals()["app"] = application
    return application
