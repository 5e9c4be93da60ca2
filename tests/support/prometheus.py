"""A real Prometheus server for the test bed, and `promtool check metrics`.

The binaries come from Debian's ``prometheus`` package (``/usr/bin/prometheus``
and ``/usr/bin/promtool``; ``.ci/run`` installs it). Nothing here is mocked: a
Prometheus process listens on a free loopback port with a generated config
(one scrape job over static targets), keeps its TSDB in a temporary directory,
scrapes the service over HTTP and answers PromQL through its HTTP API::

    with running_prometheus(["127.0.0.1:8000"]) as prometheus:
        prometheus.wait_for("up", lambda result: bool(result))
        [sample] = prometheus.query('queue_worker_jobs_total{outcome="succeeded"}')

When a binary is missing the test is skipped on a laptop and fails under CI
(`CI=true`), with one line saying what to install (tests/support/tools.py).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.support.servers import bound_socket
from tests.support.tools import require_tool

__all__ = [
    "JOB_NAME",
    "PrometheusServer",
    "promtool_check_metrics",
    "require_binary",
    "running_prometheus",
    "sample_value",
]

JOB_NAME = "queue-worker"
INSTALL_HINT = (
    "install Prometheus: apt-get install --no-install-recommends prometheus "
    "(macOS: brew install prometheus; .ci/run installs it)"
)


def require_binary(name: str) -> str:
    """The path of `name` (prometheus or promtool): skipped without it, failed under CI."""
    return require_tool(name, INSTALL_HINT)


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    """Pipes a metrics exposition into `promtool check metrics` (its lint) and returns the run."""
    promtool = require_binary("promtool")
    return subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def sample_value(sample: dict[str, Any]) -> float:
    """The value of one instant-vector element: `{"metric": ..., "value": [ts, "1"]}`."""
    return float(sample["value"][1])


class PrometheusServer:
    """A running Prometheus: its base URL and a thin client for the HTTP API."""

    def __init__(self, url: str, log_path: Path, process: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.log_path = log_path
        self._process = process
        self._client = httpx.Client(base_url=url, timeout=5)

    def log(self) -> str:
        """Prometheus's own log so far, for failure messages."""
        return self.log_path.read_text(errors="replace")

    def _api(self, path: str, params: dict[str, str] | None = None) -> Any:
        response = self._client.get(path, params=params)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"GET {path} {params or ''}: {response.status_code} {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query (GET /api/v1/query); the vector's elements, empty if none."""
        data = self._api("/api/v1/query", {"query": expr})
        if data["resultType"] != "vector":
            raise AssertionError(f"{expr!r} is a {data['resultType']}, not an instant vector")
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        *,
        timeout: float = 10.0,
        interval: float = 0.2,
    ) -> list[dict[str, Any]]:
        """Polls `expr` until `predicate(result)` holds; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {expr!r}; last result: {result}\n"
                    f"targets: {self.targets()}\nprometheus log:\n{self.log()}"
                )
            time.sleep(interval)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (GET /api/v1/targets): health, lastError, scrapeUrl..."""
        data = self._api("/api/v1/targets", {"state": "active"})
        active: list[dict[str, Any]] = data["activeTargets"]
        return active

    def close(self) -> None:
        self._client.close()


def _config(targets: list[str], scrape_interval: str) -> str:
    # JSON is YAML, so no YAML library is needed to write the config.
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "scrape_configs": [
            {
                "job_name": JOB_NAME,
                "metrics_path": "/metrics",
                "scheme": "http",
                "static_configs": [{"targets": targets}],
            }
        ],
    }
    return json.dumps(config, indent=2)


def _free_port() -> int:
    with contextlib.closing(bound_socket()) as sock:
        port: int = sock.getsockname()[1]
    return port


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start(
    binary: str, workdir: Path, attempt: int, timeout: float
) -> tuple[subprocess.Popen[bytes], str, Path] | None:
    """Starts Prometheus and waits for /-/ready; None if the chosen port was taken meanwhile."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / f"prometheus-{attempt}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / f'data-{attempt}'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=1) as client:
        while True:
            if process.poll() is not None:
                process.wait()
                text = log_path.read_text(errors="replace")
                if "address already in use" in text:
                    return None
                raise AssertionError(f"prometheus exited with {process.returncode}:\n{text}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/-/ready").status_code == 200:
                    return process, url, log_path
            if time.monotonic() > deadline:
                _stop(process)
                text = log_path.read_text(errors="replace")
                raise AssertionError(f"prometheus not ready after {timeout}s:\n{text}")
            time.sleep(0.05)


@contextlib.contextmanager
def running_prometheus(
    targets: list[str], *, scrape_interval: str = "1s", ready_timeout: float = 30.0
) -> Iterator[PrometheusServer]:
    """Runs Prometheus on a free loopback port, scraping `targets` ("host:port") at /metrics.

    Yields once /-/ready answers 200; on exit sends SIGTERM and waits, and removes
    the config and the TSDB.
    """
    binary = require_binary("prometheus")
    with tempfile.TemporaryDirectory(prefix="qw-prometheus-") as tmp:
        workdir = Path(tmp)
        (workdir / "prometheus.yml").write_text(_config(targets, scrape_interval))
        started = None
        for attempt in range(3):
            started = _start(binary, workdir, attempt, ready_timeout)
            if started is not None:
                break
        if started is None:
            raise AssertionError("prometheus found its loopback port taken three times")
        process, url, log_path = started
        server = PrometheusServer(url, log_path, process)
        try:
            yield server
        finally:
            server.close()
            _stop(process)
