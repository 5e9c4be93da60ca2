"""`queue-worker`: the console script that serves the app on HOST:PORT."""

from __future__ import annotations

import sys

import uvicorn

from app.config import ConfigError, load_settings
from app.logs import configure
from app.main import create_app


def main() -> None:
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"queue-worker: {error}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
    configure(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
