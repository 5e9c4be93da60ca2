"""The wheel carries the SQL: built, installed in a fresh venv outside the checkout, and run.

`uv build` makes the sdist and, from it, the wheel; the wheel goes into a new
virtualenv with the project's locked dependencies (`uv sync` of the lock file into
it, from uv's cache, offline), and
everything below runs from a directory that is not the checkout, with nothing of
it on the import path: `migrate --print`, local mode (which applies the packaged
migrations to its embedded database) and `check` against it.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import __version__
from app.schema import combined
from tests.support.cli import ROOT, run_cli
from tests.support.postgres import migration_files
from tests.support.waiting import wait_until
from tests.test_local_mode import (  # noqa: F401 (worker_factory: a fixture)
    LocalWorker,
    auth,
    outbox,
    read_mail,
    worker_factory,
)


@dataclass(frozen=True)
class Installed:
    wheel: Path
    bin: Path

    def command(self, name: str = "queue-worker") -> list[str]:
        return [str(self.bin / name)]


def _uv(*args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "VIRTUAL_ENV": "", **(env or {})}
    result = subprocess.run(
        ["uv", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"uv {' '.join(args)}:\n{result.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    if shutil.which("uv") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("uv is not on PATH")
        pytest.skip("uv is not on PATH")
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    _uv("build", str(ROOT), "--offline", "--out-dir", str(dist), cwd=base)
    [wheel] = dist.glob("*.whl")
    venv = base / "venv"
    _uv("venv", "--quiet", "--python", sys.executable, str(venv), cwd=base)
    # The project's locked dependencies, from the lock file's URLs and uv's wheel
    # cache: `uv pip install -r` of an export would look each name up in the package
    # index's cache instead, which a machine whose cache was filled by `uv sync --frozen`
    # alone does not have.
    _uv(
        "sync",
        "--frozen",
        "--offline",
        "--no-default-groups",
        "--extra",
        "local",
        "--no-install-project",
        "--quiet",
        cwd=ROOT,
        env={"UV_PROJECT_ENVIRONMENT": str(venv)},
    )
    _uv(
        "pip",
        "install",
        "--offline",
        "--no-deps",
        "--quiet",
        "--python",
        str(venv / "bin" / "python"),
        str(wheel),
        cwd=base,
    )
    yield Installed(wheel, venv / "bin")


def test_the_wheel_holds_the_migrations(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as archive:
        packaged = {
            Path(name).name: archive.read(name).decode()
            for name in archive.namelist()
            if name.startswith("app/migrations/") and name.endswith(".sql")
        }
    assert packaged == {path.name: path.read_text() for path in migration_files()}


def test_installed_cli_prints_the_sql_without_the_checkout(
    installed: Installed, tmp_path: Path
) -> None:
    where = run_cli(
        "-c",
        "import app, app.schema; print(app.__file__); print(app.schema.source())",
        cwd=tmp_path,
        command=installed.command("python"),
    )
    assert where.code == 0, where.err
    for line in where.lines:
        assert str(installed.bin.parent) in line and str(ROOT) not in line
    assert run_cli("--version", cwd=tmp_path, command=installed.command()).out.strip() == (
        f"queue-worker {__version__}"
    )
    printed = run_cli("migrate", "--print", cwd=tmp_path, command=installed.command())
    assert printed.code == 0, printed.err
    assert printed.out == combined()


@pytest.mark.embedded
def test_installed_local_mode_runs_jobs_and_passes_its_check(
    installed: Installed, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    start_worker: Any = request.getfixturevalue("worker_factory")
    worker: LocalWorker = start_worker(tmp_path, command=installed.command())
    data = tmp_path / ".queue-worker"
    worker.start()
    response = httpx.post(
        f"{worker.url}/queues/email_queue/messages",
        json={"to": "a@example.com", "subject": "From the wheel", "text": "x"},
        headers=auth(data),
        timeout=10,
    )
    assert response.status_code == 201, response.text
    [path] = wait_until(lambda: outbox(data), timeout=30, what="the mail in the outbox")
    assert read_mail(path)["Subject"] == "From the wheel"

    # A second process joins the running embedded server, as an operator's check does.
    ran = run_cli("check", cwd=tmp_path, command=installed.command(), env=worker.env)
    assert ran.code == 0, ran.out + ran.err
    statuses = {line.split()[0] for line in ran.lines}
    assert statuses == {"OK", "N/A"}, ran.out

    # The CLI page's enqueue example, as written, then the queue and its dead letters.
    [example] = [
        line
        for line in (ROOT / "docs" / "reference" / "cli.md").read_text().splitlines()
        if line.startswith("queue-worker enqueue email_queue '")
    ]
    args = shlex.split(example)[1:]
    enqueued = run_cli(*args, cwd=tmp_path, command=installed.command(), env=worker.env)
    assert enqueued.code == 0, enqueued.err
    assert len(wait_until(lambda: len(outbox(data)) == 2 and outbox(data), what="mail 2")) == 2
    for verb in (["queues"], ["dead", "email_queue"]):
        listed = run_cli(*verb, cwd=tmp_path, command=installed.command(), env=worker.env)
        assert listed.code == 0, listed.err
    assert worker.ctrl_c() == 0


def _in_docker_context(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches decides (`!` keeps)."""
    keep = True
    for rule in rules:
        negated = rule.startswith("!")
        pattern = rule.removeprefix("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            keep = negated
    return keep


def test_the_image_builds_the_package_with_its_migrations() -> None:
    """No Docker engine here: the build context and the build stage are read instead."""
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    force = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force == {"supabase/migrations": "app/migrations"}
    for path in migration_files():
        relative = str(path.relative_to(ROOT))
        assert _in_docker_context(relative, rules), f"{relative} is not in the build context"
    dockerfile = (ROOT / "Dockerfile").read_text()
    build_stage = dockerfile[dockerfile.index("AS build") : dockerfile.index("AS runtime")]
    copy = build_stage.index("COPY supabase/migrations ./supabase/migrations")
    assert copy < build_stage.index("RUN uv sync --locked --no-dev --no-editable")
