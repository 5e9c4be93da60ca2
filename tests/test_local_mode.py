"""Local mode: `queue-worker` on a machine with nothing configured.

The real console script runs in a subprocess with an empty configuration, as a
newcomer runs it: it starts its embedded PostgreSQL, applies the migrations,
and jobs enqueued over the manual API (or with `pgmq.send`) end up as `.eml`
files in the outbox. The sweeper is parked for an hour in these tests, so a job
that runs was woken by pgmq's insert notification (LISTEN/NOTIFY), not swept.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.types.json import Jsonb

from app.config import ConfigError, load_settings
from app.local import EmbeddedDatabase
from app.main import served_queues
from tests.support.servers import bound_socket, listening_addresses
from tests.support.settings import SERVICE_VARIABLES
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.embedded


def clean_environment() -> dict[str, str]:
    """This machine's environment without any of the service's settings."""
    prefixes = ("SUPABASE_", "SMTP_", "MAIL_", "API_TOKEN", "WEBHOOK_")
    return {
        key: value
        for key, value in os.environ.items()
        if key not in SERVICE_VARIABLES and not key.startswith(prefixes)
    }


class LocalWorker:
    """`queue-worker` (app.cli) in `cwd` with nothing configured but where it listens."""

    def __init__(
        self, cwd: Path, *, command: list[str] | None = None, **settings: str | None
    ) -> None:
        with contextlib.closing(bound_socket()) as sock:
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = cwd
        # `command`: another way to start it (an installed console script); without
        # it the checkout's package runs. A setting given as None is left unset.
        self.command = command or [sys.executable, "-m", "app.cli"]
        environment = {
            **clean_environment(),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_FORMAT": "text",
            # Parked: only a LISTEN/NOTIFY wake-up can run a job while a test waits.
            "SWEEP_INTERVAL_SECONDS": "3600",
            **({} if command else {"PYTHONPATH": str(ROOT)}),
            **settings,
        }
        self.env = {key: value for key, value in environment.items() if value is not None}
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.cwd / f"worker-{self.starts}.log"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> None:
        self.starts += 1
        with self.log_path.open("wb") as log:
            # A session of its own, like a terminal's foreground job: Ctrl-C is a
            # SIGINT to the whole process group.
            self._process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # The first start creates the database cluster: allow for a slow machine.
        wait_until(self._ready, timeout=90, what="queue-worker in local mode")

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise AssertionError(f"queue-worker exited early:\n{self.log}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        return False

    def ctrl_c(self) -> int:
        """What a terminal does on Ctrl-C; returns the exit status."""
        assert self._process is not None
        os.killpg(self._process.pid, signal.SIGINT)
        return self._process.wait(timeout=60)

    def kill(self) -> None:
        assert self._process is not None
        self._process.kill()
        self._process.wait(timeout=10)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


@pytest.fixture
def worker_factory() -> Iterator[Any]:
    started: list[LocalWorker] = []

    def make(cwd: Path, **settings: Any) -> LocalWorker:
        worker = LocalWorker(cwd, **settings)
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop()
    # A server left running by a failed test must not outlive it: join it, then
    # leave it as its last user, which stops it.
    for worker in started:
        data = Path(worker.env.get("DATA_DIR", worker.cwd / ".queue-worker"))
        if (data / "postgres" / "postmaster.pid").exists():
            with EmbeddedDatabase(data):
                pass


def token(data_dir: Path) -> str:
    return (data_dir / "api_token").read_text().strip()


def auth(data_dir: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(data_dir)}"}


def outbox(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "outbox").glob("*.eml"))


def read_mail(path: Path) -> EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def database_url(data_dir: Path) -> str:
    """The embedded server's URL, from its postmaster.pid (line 5: the socket directory)."""
    lines = (data_dir / "postgres" / "postmaster.pid").read_text().splitlines()
    return f"postgresql://postgres@/queue_worker?host={lines[4].strip()}"


def pgmq_send(data_dir: Path, message: dict[str, Any]) -> int:
    """Enqueues as an app would, with `pgmq.send` on the local database."""
    with psycopg.connect(database_url(data_dir), autocommit=True) as conn:
        row = conn.execute(
            "select * from pgmq.send('email_queue', %s)", [Jsonb(message)]
        ).fetchone()
    assert row is not None
    return int(row[0])


def email_queue(worker: LocalWorker, data_dir: Path) -> dict[str, Any]:
    """The email_queue row of `GET /queues`."""
    response = httpx.get(f"{worker.url}/queues", headers=auth(data_dir), timeout=10)
    assert response.status_code == 200, response.text
    row: dict[str, Any] = next(q for q in response.json()["queues"] if q["queue"] == "email_queue")
    return row


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus exposition."""
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == name and item.labels == labels:
                return float(item.value)
    return None


def assert_stopped_cleanly(data_dir: Path) -> None:
    cluster = data_dir / "postgres"
    assert not (cluster / "postmaster.pid").exists(), "the embedded server is still running"
    assert "database system is shut down" in (cluster / "log").read_text()


def test_first_run_processes_jobs_into_the_outbox(tmp_path: Path, worker_factory: Any) -> None:
    worker = worker_factory(tmp_path)  # no DATA_DIR: ./.queue-worker/
    data = tmp_path / ".queue-worker"
    worker.start()

    banner = worker.log
    assert "LOCAL MODE" in banner
    assert f"embedded PostgreSQL at {data / 'postgres'}" in banner
    assert f"written to {data / 'outbox'}/" in banner
    assert token(data) in banner  # generated at the first start, printed once there
    assert (data / "api_token").stat().st_mode & 0o077 == 0

    job = {
        "to": "Анна <anna@example.com>",
        "bcc": ["audit@example.com"],
        "subject": "Привет from local mode",
        "text": "Hello from the outbox",
    }
    response = httpx.post(
        f"{worker.url}/queues/email_queue/messages", json=job, headers=auth(data), timeout=10
    )
    assert response.status_code == 201, response.text

    [path] = wait_until(lambda: outbox(data), timeout=30, what="the mail in the outbox")
    mail = read_mail(path)
    assert mail["Subject"] == "Привет from local mode"
    assert mail["To"].addresses[0].addr_spec == "anna@example.com"
    assert mail["From"].addresses[0].addr_spec == "queue-worker@example.com"
    body = mail.get_body(("plain",))
    assert body is not None and body.get_content().strip() == "Hello from the outbox"
    # Bcc recipients get the mail but never appear in it; the envelope says who.
    assert mail["Bcc"] is None
    assert "audit@example.com" in mail["X-Envelope-To"]
    assert f"mail written to the outbox path={path}" in worker.log

    # An app enqueues with pgmq.send: the insert notification rings, no webhook.
    pgmq_send(data, {"to": "b@example.com", "subject": "From SQL", "text": "Hi"})
    mails = wait_until(lambda: len(outbox(data)) == 2 and outbox(data), what="the second mail")
    assert read_mail(mails[1])["Subject"] == "From SQL"

    wait_until(lambda: email_queue(worker, data)["length"] == 0, what="the messages to be deleted")
    metrics = httpx.get(f"{worker.url}/metrics", timeout=10).text
    assert sample(metrics, "queue_worker_emails_total", result="sent") == 2
    assert sample(metrics, "queue_worker_jobs_total", queue="email_queue", outcome="succeeded") == 2
    ready = httpx.get(f"{worker.url}/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "outbox": "ok", "sweeper": "ok"}
    # No webhook secret in local mode: the webhook endpoint lets nothing in, and says why.
    refused = httpx.post(f"{worker.url}/webhooks/email_queue", json={}, timeout=10)
    assert refused.status_code == 404
    assert refused.json()["error"] == "webhooks_off"

    assert worker.ctrl_c() == 0
    assert_stopped_cleanly(data)
    assert "embedded database stopped" in worker.log


def test_restart_keeps_messages_archive_and_token(tmp_path: Path, worker_factory: Any) -> None:
    data = tmp_path / "data"
    worker = worker_factory(tmp_path, DATA_DIR=str(data))
    worker.start()
    first_token = token(data)

    later = httpx.post(
        f"{worker.url}/queues/email_queue/messages?delay_seconds=3600",
        json={"to": "later@example.com", "subject": "Later", "text": "x"},
        headers=auth(data),
        timeout=10,
    )
    assert later.status_code == 201
    later_id = later.json()["msg_id"]
    # Not a valid email job: archived with its error.
    dead_id = pgmq_send(data, {"to": "x@example.com"})
    wait_until(
        lambda: httpx.get(
            f"{worker.url}/queues/email_queue/archive", headers=auth(data), timeout=10
        ).json()["messages"],
        what="the invalid job to be archived",
    )
    assert worker.ctrl_c() == 0
    assert_stopped_cleanly(data)

    worker.start()
    assert token(data) == first_token
    assert "creating the embedded database" not in worker.log
    # The same token still opens the API, and the delayed job is still waiting.
    row = email_queue(worker, data)
    assert (row["length"], row["visible"]) == (1, 0)
    archive = httpx.get(
        f"{worker.url}/queues/email_queue/archive", headers=auth(data), timeout=10
    ).json()["messages"]
    assert [m["msg_id"] for m in archive] == [dead_id]
    assert archive[0]["error"]["type"] == "PermanentError"
    assert archive[0]["error"]["message"].startswith("invalid EmailJob message: subject")

    response = httpx.post(
        f"{worker.url}/queues/email_queue/messages",
        json={"to": "after@example.com", "subject": "After the restart", "text": "x"},
        headers=auth(data),
        timeout=10,
    )
    assert response.json()["msg_id"] > max(later_id, dead_id)
    [path] = wait_until(lambda: outbox(data), timeout=30, what="the mail after the restart")
    assert read_mail(path)["Subject"] == "After the restart"
    assert worker.ctrl_c() == 0
    assert_stopped_cleanly(data)


def test_a_killed_worker_leaves_the_database_to_the_next_start(
    tmp_path: Path, worker_factory: Any
) -> None:
    data = tmp_path / "data"
    worker = worker_factory(tmp_path, DATA_DIR=str(data))
    worker.start()
    worker.kill()  # SIGKILL: no drain, no cleanup; the server keeps running
    assert (data / "postgres" / "postmaster.pid").exists()

    worker.start()  # joins the running server
    pgmq_send(data, {"to": "a@example.com", "subject": "Still here", "text": "x"})
    [path] = wait_until(lambda: outbox(data), timeout=30, what="the mail")
    assert read_mail(path)["Subject"] == "Still here"
    # The killed process is forgotten: this one, the last, stops the server.
    assert worker.ctrl_c() == 0
    assert_stopped_cleanly(data)


def test_local_mode_listens_on_loopback_and_says_webhooks_are_off(
    tmp_path: Path, worker_factory: Any
) -> None:
    # No HOST: local mode must not take every interface. Settings in lower and upper case.
    worker: LocalWorker = worker_factory(tmp_path, HOST=None, LOG_LEVEL="info", LOG_FORMAT="JSON")
    worker.start()
    assert listening_addresses(worker.port) == {"127.0.0.1"}

    refused = httpx.post(f"{worker.url}/webhooks/email_queue", json={}, timeout=10)
    assert refused.status_code == 404
    assert refused.json()["error"] == "webhooks_off"
    assert "webhooks are off in local mode" in refused.json()["message"]
    assert "LISTEN/NOTIFY" in refused.json()["message"]

    assert worker.ctrl_c() == 0
    entries = [json.loads(line) for line in worker.log.splitlines() if line[:1] == "{"]
    assert any(e["message"].startswith("Uvicorn running on http://127.0.0.1:") for e in entries)
    assert all("color_message" not in entry for entry in entries)
    assert "\x1b[" not in worker.log


# -- which mode the settings choose ---------------------------------------------


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [*SERVICE_VARIABLES, "API_TOKEN", "WEBHOOK_SECRET"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


@pytest.mark.usefixtures("no_settings")
def test_nothing_configured_is_local_mode() -> None:
    settings = load_settings()
    assert settings.local_mode and settings.mail_outbox
    assert settings.data_dir == Path(".queue-worker")


@pytest.mark.usefixtures("no_settings")
def test_local_mode_with_smtp_needs_a_sender(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_HOST", "smtp.example.com")
    with pytest.raises(ConfigError, match="MAIL_FROM: is required but not set"):
        served_queues(load_settings())
    monkeypatch.setenv("MAIL_FROM", "noreply@example.com")
    settings = load_settings()
    assert settings.local_mode and not settings.mail_outbox
    assert served_queues(settings) == ["email_queue", "payments_queue", "reports_queue"]


@pytest.mark.usefixtures("no_settings")
def test_database_url_needs_no_supabase_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres:pw@db.example.com:5432/postgres")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "WEBHOOK_SECRET: is required" in message
    assert "SUPABASE_URL" not in message and "pw@" not in message
    monkeypatch.setenv("WEBHOOK_SECRET", "k9" * 16)
    # The built-in queues send mail: outside local mode they need SMTP_HOST.
    with pytest.raises(ConfigError, match="SMTP_HOST: is required but not set"):
        served_queues(load_settings())
    monkeypatch.setenv("SMTP_HOST", "smtp.example.com")
    monkeypatch.setenv("MAIL_FROM", "noreply@example.com")
    assert not load_settings().local_mode


@pytest.mark.usefixtures("no_settings")
def test_mode_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_URL", "https://project-ref.supabase.co")
    with pytest.raises(ConfigError, match="SUPABASE_SERVICE_ROLE_KEY: is required"):
        load_settings()
    monkeypatch.setenv("QUEUE_WORKER_MODE", "local")
    assert load_settings().local_mode
    monkeypatch.setenv("DATABASE_URL", "postgresql://localhost/postgres")
    with pytest.raises(ConfigError, match="QUEUE_WORKER_MODE=local"):
        load_settings()


def test_a_queue_of_ones_own_runs_locally_without_a_migration_line(
    tmp_path: Path, worker_factory: Any
) -> None:
    # ./queues.toml and a plugin next to it; local mode attaches the queue itself.
    (tmp_path / "queues.toml").write_text('[queues.notes_queue]\nprocessor = "notes:write"\n')
    (tmp_path / "notes.py").write_text(
        "import json\nimport pathlib\n\n\n"
        "async def write(job: dict) -> None:\n"
        "    with pathlib.Path('notes.jsonl').open('a') as file:\n"
        "        file.write(json.dumps(job) + '\\n')\n"
    )
    worker = worker_factory(tmp_path)
    data = tmp_path / ".queue-worker"
    worker.start()
    response = httpx.post(
        f"{worker.url}/queues/notes_queue/messages",
        json={"note": "from the API"},
        headers=auth(data),
        timeout=10,
    )
    assert response.status_code == 201, response.text
    with psycopg.connect(database_url(data), autocommit=True) as conn:
        conn.execute("select pgmq.send('notes_queue', %s)", [Jsonb({"note": "from SQL"})])
    notes = tmp_path / "notes.jsonl"
    wait_until(
        lambda: notes.is_file() and len(notes.read_text().splitlines()) == 2,
        timeout=30,
        what="both notes",
    )
    assert sorted(json.loads(line)["note"] for line in notes.read_text().splitlines()) == [
        "from SQL",
        "from the API",
    ]
    assert worker.ctrl_c() == 0
