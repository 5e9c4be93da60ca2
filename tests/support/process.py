"""The service as a real process: for tests that kill it or send it signals."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
from pydantic import SecretStr

from app.config import Settings
from tests.support.servers import bound_socket
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce `settings` in another process."""
    env: dict[str, str] = {}
    for name, value in settings:
        if value is None:
            continue
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | tuple):
            text = ",".join(map(str, value))  # how QUEUES is written in an environment
        else:
            text = str(value)
        env[name.upper()] = text
    return env


class ServiceProcess:
    """The service on a loopback port, started and stopped at will: `python -m uvicorn
    app.main:app`, or with `console_script` as `queue-worker` runs it (app.cli)."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        *,
        console_script: bool = False,
        under_uv: bool = False,
    ) -> None:
        with contextlib.closing(bound_socket()) as sock:
            self.port = sock.getsockname()[1]
        # `queue-worker` (app.cli) reads HOST/PORT from the settings; uvicorn from flags.
        self.console_script = console_script
        # `uv run ... uvicorn` in a process group of its own, as a developer or a
        # container entrypoint starts it: a signal to the group reaches uvicorn
        # twice (from the kernel, and forwarded by uv).
        self.under_uv = under_uv
        self.settings = settings.model_copy(update={"host": "127.0.0.1", "port": self.port})
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_dir = log_dir
        self._process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self._log_dir / f"service-{self.port}-{self.starts}.log"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "SUPABASE_"))}
        env.update(settings_env(self.settings))
        env["PYTHONPATH"] = str(ROOT)
        self.starts += 1
        log = self.log_path.open("wb")
        python = [sys.executable]
        if self.under_uv:
            uv = shutil.which("uv")
            assert uv is not None, "uv is not on PATH"
            python = [uv, "run", "--project", str(ROOT), "--no-sync", "python"]
        command = (
            [*python, "-m", "app.cli"]
            if self.console_script
            else [
                *python,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
            ]
        )
        self._process = subprocess.Popen(
            command,
            cwd=self._log_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=self.under_uv,
        )
        log.close()
        # Each worker process imports and starts the whole service on its own.
        timeout = 30 * (self.settings.workers if self.console_script else 1)
        try:
            wait_until(self._ready, timeout=timeout, what=f"the service on port {self.port}")
        except AssertionError as error:
            raise AssertionError(f"{error}; its log:\n{self.log_path.read_text()}") from None

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise AssertionError(f"service exited early:\n{self.log_path.read_text()}")
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, as a crash or an OOM kill."""
        assert self._process is not None
        if self.under_uv:
            os.killpg(self._process.pid, signal.SIGKILL)
        else:
            self._process.kill()
        self._process.wait(timeout=10)

    def signal(self, signum: int) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        """`signum` to the whole process group (a terminal's Ctrl-C, `docker stop`
        of a shell entrypoint, `kill -TERM -<pgid>`); only with `under_uv`."""
        assert self._process is not None and self.under_uv
        os.killpg(self._process.pid, signum)

    def wait(self, timeout: float) -> int:
        """The exit status; AssertionError with the end of the log if not within `timeout`."""
        assert self._process is not None
        try:
            return self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tail = self.log_path.read_text(errors="replace")[-4000:]
            raise AssertionError(f"still running after {timeout}s; log ends:\n{tail}") from None

    def wait_or_none(self, timeout: float) -> int | None:
        """The exit status within `timeout` seconds, or None while it still runs."""
        assert self._process is not None
        try:
            return self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def service_process(
    settings: Settings, *, console_script: bool = False, under_uv: bool = False
) -> Iterator[ServiceProcess]:
    with tempfile.TemporaryDirectory(prefix="qw-service-") as tmp:
        process = ServiceProcess(
            settings, Path(tmp), console_script=console_script, under_uv=under_uv
        )
        process.start()
        try:
            yield process
        finally:
            process.stop()
