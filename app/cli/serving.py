"""`queue-worker serve` (and `queue-worker` with no verb): the service on HOST:PORT.

The server itself, with its limits, is app/server.py; this verb reads the settings
(flags override their variables), refuses a bad one in one line, and runs local
mode's embedded database around the server.
"""

from __future__ import annotations

import argparse
import os

from app.cli.common import FAILURE, OK, USAGE, Verbs, fail, settings


def register(verbs: Verbs) -> None:
    parser = verbs.add_parser(
        "serve",
        help="serve the API and run the jobs (the default)",
        description="Serves the webhook and manual API and runs the jobs until SIGTERM or "
        "Ctrl-C, then drains. `queue-worker` with no verb does the same.",
    )
    parser.add_argument("--host", help="address to listen on [env HOST; local mode: 127.0.0.1]")
    parser.add_argument("--port", type=int, help="port to listen on [env PORT; 8000]")
    parser.add_argument("--workers", type=int, help="worker processes [env WORKERS; 1]")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from app.config import ConfigError
    from app.local import EmbeddedDatabase, LocalModeError
    from app.logs import configure
    from app.main import served_queues
    from app.server import serve

    config = settings(
        args,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        workers=getattr(args, "workers", None),
    )
    if args.env_file is not None and config.workers > 1:
        # Worker processes read their settings again, from the environment and ./.env:
        # the env file's values go into the environment they inherit (set ones win).
        from dotenv import dotenv_values

        for name, value in dotenv_values(args.env_file).items():
            if value is not None:
                os.environ.setdefault(name.upper(), value)
    # An unknown queue is refused before anything starts (exit 2).
    try:
        served_queues(config)
    except ConfigError as error:
        raise fail(str(error), USAGE) from None
    configure(config.log_level, config.log_format)
    if not config.local_mode:
        serve(config)
        return OK
    # Local mode: the embedded database runs around the server, so a problem with it
    # is one line before anything listens, and it stops only after the drain.
    database = EmbeddedDatabase(config.data_dir)
    try:
        database.start()
    except LocalModeError as error:
        raise fail(str(error), FAILURE) from None
    try:
        serve(config)
    finally:
        database.stop()
    return OK
