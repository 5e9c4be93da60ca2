"""Local mode: how soon an enqueued job runs, woken by LISTEN/NOTIFY rather than swept.

Starts `queue-worker` (app.cli) in local mode in a temporary directory, with the
sweeper parked (`SWEEP_INTERVAL_SECONDS=3600`), then enqueues N email jobs one at a
time over the manual API and times each from the POST to its `.eml` file in the
outbox (polled every 2 ms). The POST's own round trip, measured in the same run, is
the baseline: the rest is the wake-up, the claim, composing and writing the mail.

    uv run python -m bench.local_wakeup [--jobs 50]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.postgres import ROOT
from tests.support.servers import bound_socket
from tests.support.settings import SERVICE_VARIABLES
from tests.support.waiting import wait_until


def main(jobs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="qw-bench-local-") as tmp:
        cwd = Path(tmp)
        os.chmod(cwd, 0o755)  # the embedded server's own user must reach its data
        with contextlib.closing(bound_socket()) as sock:
            port = sock.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
        env |= {
            "PYTHONPATH": str(ROOT),
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "SWEEP_INTERVAL_SECONDS": "3600",
            "LOG_LEVEL": "WARNING",
        }
        with (cwd / "worker.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "app.cli"],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _up(url), timeout=120, what="queue-worker")
            data = cwd / ".queue-worker"
            headers = {"Authorization": f"Bearer {(data / 'api_token').read_text().strip()}"}
            outbox = data / "outbox"
            post: list[float] = []
            done: list[float] = []
            with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
                for n in range(jobs):
                    before = len(list(outbox.glob("*.eml"))) if outbox.exists() else 0
                    started = time.perf_counter()
                    response = client.post(
                        "/queues/email_queue/messages",
                        json={"to": "a@example.com", "subject": f"job {n}", "text": "x"},
                    )
                    post.append(time.perf_counter() - started)
                    response.raise_for_status()
                    while len(list(outbox.glob("*.eml"))) == before:
                        time.sleep(0.002)
                    done.append(time.perf_counter() - started)
        finally:
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=60)

    def row(name: str, samples: list[float]) -> str:
        p50, p95 = (statistics.quantiles(samples, n=100)[q - 1] * 1000 for q in (50, 95))
        return f"{name:34}{p50:>10.1f}{p95:>10.1f}{max(samples) * 1000:>10.1f}"

    print(f"{jobs} jobs, one at a time, sweeper parked (ms)")  # noqa: T201
    print(f"{'':34}{'p50':>10}{'p95':>10}{'max':>10}")  # noqa: T201
    print(row("POST /queues/.../messages (base)", post))  # noqa: T201
    print(row("POST to .eml in the outbox", done))  # noqa: T201


def _up(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    return False


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    main(parser.parse_args().jobs)
