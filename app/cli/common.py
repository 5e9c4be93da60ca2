"""What every verb shares: exit codes, settings, the service's resources, output.

A verb is a module with `register(verbs)`: it adds its subparser to `verbs` (the
argparse sub-parsers action) and sets `run=` to a function `(args) -> exit code`.
app/cli/__init__.py lists the verb modules; adding a verb is one module and one
line there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

# The verbs import the service only when they run, so `--help`, `--version` and
# `migrate --print` answer at once.
if TYPE_CHECKING:
    from app.config import Settings
    from app.mail import Mailer
    from app.processors import Registry
    from app.queue.backend import QueueBackend, RpcCaller

# Exit codes (docs/reference/cli.md).
OK: Final = 0
FAILURE: Final = 1  # the command ran and something failed or was refused
USAGE: Final = 2  # bad arguments or configuration: nothing was attempted

Run = Callable[[argparse.Namespace], int]
Verbs: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class Exit(Exception):
    """Ends a verb with `code`, after printing `message` (one line) to stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def fail(message: str, code: int = FAILURE) -> Exit:
    return Exit(code, message)


def say(text: str) -> None:
    """A line of the verb's result on stdout."""
    print(text, flush=True)  # noqa: T201


def warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # noqa: T201


def emit_json(data: Any) -> None:
    say(json.dumps(data, ensure_ascii=False, default=str))


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print the result as one JSON document, for scripts"
    )


def settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    """The service's settings, from the environment and the env file, with flag overrides.

    A bad setting is one line and exit 2, as when the service starts.
    """
    from app.config import ConfigError, load_settings

    given = {name: value for name, value in overrides.items() if value is not None}
    env_file: Path | None = getattr(args, "env_file", None)
    if env_file is not None:
        if not env_file.is_file():
            raise fail(f"--env-file: {env_file} is not a file", USAGE)
        given["_env_file"] = env_file
    try:
        return load_settings(**given)
    except ConfigError as error:
        raise fail(str(error), USAGE) from None


@dataclass(frozen=True)
class Opened:
    """The service's own resources, as the lifespan builds them, without the runner."""

    settings: Settings
    backend: QueueBackend
    rpc: RpcCaller
    processors: Registry
    mailer: Mailer


@asynccontextmanager
async def opened(config: Settings) -> AsyncIterator[Opened]:
    """The backend the service opens (RPC, DATABASE_URL or local mode) and its processors.

    Built as the service's lifespan builds them (app/main.py: the queue plan from
    queues.toml or the built-in queues, the shared HTTP client, the mailer), so the CLI
    validates a job exactly as the manual API does. A bad queues.toml is a
    ConfigError, as at start.
    """
    # Imported here: app.main pulls in the whole service, which `--help` does not need.
    from app.main import open_backend, open_http, open_mailer
    from app.processors.registry import build_processors, load_queues

    plan = load_queues(config)
    async with open_backend(config, plan.names) as (backend, rpc), open_http(plan) as http:
        mailer = open_mailer(config)
        try:
            processors = await build_processors(
                plan, settings=config, http=http, mailer=mailer, rpc=rpc
            )
            yield Opened(config, backend, rpc, processors, mailer)
        finally:
            await mailer.close()


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Rows as aligned columns (numbers to the right), header first."""
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(isinstance(r[i], int) or r[i] is None for r in rows) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if numeric[i] and rows else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return lines
