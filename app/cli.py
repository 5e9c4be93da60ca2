"""`queue-worker`: the console script that serves the app on HOST:PORT."""

from __future__ import annotations

import sys

from app.config import ConfigError, load_settings
from app.local import EmbeddedDatabase, LocalModeError
from app.logs import configure
from app.main import served_queues
from app.server import serve


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
