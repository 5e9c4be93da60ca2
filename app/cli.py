"""`queue-worker`: the console script that serves the app on HOST:PORT."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import uvicorn

from app.config import ConfigError, Settings, load_settings
from app.logs import configure
from app.main import create_app

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


def serve(settings: Settings) -> None:
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "proxy_headers": True,
        "timeout_graceful_shutdown": 30,
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
    except ConfigError as error:
        print(f"queue-worker: {error}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
    configure(settings.log_level, settings.log_format)
    serve(settings)


if __name__ == "__main__":
    main()
