"""`queue-worker`: the console script that serves the app on HOST:PORT."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import uvicorn

from app.config import ConfigError, Settings, load_settings
from app.local import EmbeddedDatabase, LocalModeError
from app.logs import configure
from app.main import create_app, served_queues

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_metrics() -> Path:
    """An empty directory for prometheus-client's multiprocess mode.

    Files left by an earlier run would add old counts to the new ones, so the
    directory is emptied at every start (PROMETHEUS_MULTIPROC_DIR, or a fresh
    temporary directory).
    """
    configured = os.environ.get(MULTIPROC_VARIABLE)
    path = (
        Path(configured) if configured else Path(tempfile.mkdtemp(prefix="queue-worker-metrics-"))
    )
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_VARIABLE] = str(path)
    return path


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def server_options() -> dict[str, str | bool]:
    """uvloop and httptools (from `uvicorn[standard]`) when installed; the pure-Python
    asyncio loop and h11 otherwise. No access log: a line per webhook costs more than
    the webhook itself at volume, and the metrics count every request."""
    return {
        "loop": "uvloop" if _available("uvloop") else "asyncio",
        "http": "httptools" if _available("httptools") else "h11",
        "access_log": False,
    }


def serve(settings: Settings) -> None:
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "proxy_headers": True,
        "timeout_graceful_shutdown": 30,
        **server_options(),
    }
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **common)  # type: ignore[arg-type]
        return
    prepare_multiprocess_metrics()
    # Worker processes import the app by name, each reading the same settings.
    uvicorn.run("app.main:app", workers=settings.workers, **common)  # type: ignore[arg-type]


def main() -> None:
    try:
        settings = load_settings()
        served_queues(settings)
    except ConfigError as error:
        print(f"queue-worker: {error}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
    configure(settings.log_level, settings.log_format)
    if not settings.local_mode:
        serve(settings)
        return
    # Local mode: the embedded database runs around the server, so a problem with it
    # is one line before anything listens, and it stops only after the drain.
    database = EmbeddedDatabase(settings.data_dir)
    try:
        database.start()
    except LocalModeError as error:
        print(f"queue-worker: {error}", file=sys.stderr)  # noqa: T201
        raise SystemExit(1) from None
    try:
        serve(settings)
    finally:
        database.stop()


if __name__ == "__main__":
    main()
