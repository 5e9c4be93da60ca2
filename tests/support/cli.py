"""`queue-worker <verb>` as an operator runs it: a real process, settings from its environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings
from tests.support.process import settings_env
from tests.support.settings import SERVICE_VARIABLES

ROOT = Path(__file__).resolve().parents[2]
# Variables a developer's shell may hold that would change what the CLI reads.
_PREFIXES = ("SUPABASE_", "SMTP_", "MAIL_", "API_TOKEN", "WEBHOOK_", "DATABASE_")


def clean_environment() -> dict[str, str]:
    """This machine's environment without any of the service's settings."""
    return {
        key: value
        for key, value in os.environ.items()
        if key not in SERVICE_VARIABLES and not key.startswith(_PREFIXES)
    }


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def json(self) -> Any:
        return json.loads(self.out)


def run_cli(
    *args: str,
    settings: Settings | None = None,
    env: dict[str, str] | None = None,
    cwd: Path,
    stdin: bytes | None = None,
    command: list[str] | None = None,
    timeout: float = 120,
) -> Ran:
    """Runs `python -m app.cli ARGS` (or `command ARGS`) in `cwd`; settings as variables."""
    environment = clean_environment()
    if command is None:
        environment["PYTHONPATH"] = str(ROOT)
        command = [sys.executable, "-m", "app.cli"]
    else:
        environment.pop("PYTHONPATH", None)  # only what `command` itself has installed
    if settings is not None:
        environment.update(settings_env(settings))
    environment.update(env or {})
    result = subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=environment,
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )
    return Ran(
        result.returncode,
        result.stdout.decode("utf-8", errors="replace"),
        result.stderr.decode("utf-8", errors="replace"),
    )
