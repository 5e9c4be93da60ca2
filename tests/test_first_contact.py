"""What a newcomer meets first, through a real service process.

Log settings in any case, JSON log lines without uvicorn's colour codes, error
answers in the service's one shape (404 and 405 too), and a placeholder from
.env.example refused at start. (Where local mode listens and what its webhook
route says: tests/test_local_mode.py.)
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from tests.support.cli import ROOT, clean_environment, run_cli
from tests.support.process import settings_env
from tests.support.servers import bound_socket
from tests.support.waiting import wait_until


def json_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def assert_error_shape(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "message"} and body["error"] == error, body
    assert body["message"]


@contextlib.contextmanager
def serving(settings: Settings, tmp_path: Path, **env: str) -> Iterator[tuple[str, Path]]:
    """`queue-worker serve --host 127.0.0.1 --port N` as a process; yields (url, log path)."""
    with contextlib.closing(bound_socket()) as sock:
        port = sock.getsockname()[1]
    environment = {
        **clean_environment(),
        **settings_env(settings),
        "PYTHONPATH": str(ROOT),
        **env,
    }
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the service exited:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        return False

    try:
        wait_until(ready, timeout=60, what="queue-worker serve")
        yield url, log_path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_every_error_answer_has_one_shape_and_logs_are_clean_json(
    service_settings: Settings, tmp_path: Path
) -> None:
    with serving(service_settings, tmp_path, LOG_LEVEL="debug", LOG_FORMAT="Json") as (
        url,
        log_path,
    ):
        assert_error_shape(httpx.get(f"{url}/no/such/path"), 404, "not_found")
        wrong_method = httpx.get(f"{url}/webhooks/email_queue")
        assert_error_shape(wrong_method, 405, "method_not_allowed")
        assert wrong_method.headers["allow"] == "POST"
        assert_error_shape(httpx.delete(f"{url}/health"), 405, "method_not_allowed")
        # The manual API is off without API_TOKEN: its paths are unknown, in the same shape.
        assert_error_shape(httpx.get(f"{url}/queues"), 404, "not_found")
        unauthorized = httpx.post(f"{url}/webhooks/email_queue", json={})
        assert_error_shape(unauthorized, 401, "unauthorized")
    log = log_path.read_text()
    entries = json_lines(log)
    assert entries, log
    assert [line for line in log.splitlines() if line.strip() and not line.startswith("{")] == []
    assert any(e["level"] == "debug" for e in entries)  # LOG_LEVEL=debug took effect
    assert any(e["message"].startswith("Uvicorn running on") for e in entries)
    assert all("color_message" not in entry for entry in entries)
    assert "\x1b[" not in log


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MAIL_FROM", "<noreply@example.com>"),
        ("MAIL_FROM", "noreply@your-domain.com"),
        ("MAIL_FROM_NAME", "<Your App>"),
        ("SMTP_HOST", "<smtp.example.com>"),
    ],
)
def test_a_placeholder_from_the_template_stops_start_up(
    service_settings: Settings, tmp_path: Path, variable: str, value: str
) -> None:
    ran = run_cli(settings=service_settings, cwd=tmp_path, env={variable: value})
    assert ran.code == 2
    [line] = ran.err.strip().splitlines()
    assert line.startswith(f"queue-worker: invalid configuration: {variable}: looks like a ")
    assert "placeholder" in line and value not in line
