"""`queue-worker`: the console script.

    queue-worker [--env-file FILE] [VERB] ...

With no verb it serves, as it always has (a deployed `CMD ["queue-worker"]` keeps
working). Verbs, each a module of this package:

    serve     the API and the jobs (serving.py)
    check     the preflight, one line per check with OK or the fix (check.py)
    migrate   print or apply the SQL this release ships (migrate.py)
    queues, enqueue, dead, replay, purge, pause, resume
              operator commands over the service's own backend and the same
              operations as the manual HTTP API (operator.py)
    schedules list, show, set and remove jobs pg_cron enqueues (schedules.py)

Exit codes: 0 success; 1 the command ran and something failed or was refused;
2 bad usage or configuration (nothing was attempted). Settings come from the
environment and `.env` exactly as for the service; a flag overrides its variable.

To add a verb: write a module with `register(verbs)` that calls
`verbs.add_parser(...)` and `set_defaults(run=<function (args) -> exit code>)`,
and add the module to VERBS below.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from app import __version__
from app.cli import check, migrate, operator, schedules, serving
from app.cli.common import Exit, warn

# The verb modules, in the order `--help` lists them.
VERBS = (serving, check, migrate, operator, schedules)


def _env_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="queue-worker",
        description="Processes Supabase pgmq queues. With no command it serves (queue-worker "
        "serve). Settings come from the environment and .env; see docs/reference/cli.md.",
        epilog="exit codes: 0 ok, 1 failure, 2 bad usage or configuration",
    )
    parser.add_argument("--version", action="version", version=f"queue-worker {__version__}")
    parser.add_argument(
        "--env-file",
        type=_env_file,
        metavar="FILE",
        help="read settings from FILE instead of ./.env (the environment still wins)",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", title="commands")
    for module in VERBS:
        module.register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parses `argv` (default: the command line), runs the verb, exits with its code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:  # no verb: serve, as before verbs existed
        run = serving.run
    try:
        code = run(args)
    except Exit as error:
        warn(f"queue-worker: {error.message}")
        code = error.code
    except KeyboardInterrupt:
        code = 130  # 128 + SIGINT, as a shell reports Ctrl-C
    raise SystemExit(code)


__all__ = ["VERBS", "build_parser", "main"]
