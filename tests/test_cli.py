"""`queue-worker` verbs as an operator runs them: real processes, the test bed behind them.

The operator verbs open the backend the service opens (the RPC gateway here, or a
direct connection) and call the same operations as the manual HTTP API, so their
answers are compared with that API's answers for the same request.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import __version__
from app.config import Settings
from tests.conftest import ServiceFactory
from tests.support.cli import ROOT, Ran, clean_environment, run_cli
from tests.support.postgres import OWNER_ROLE, Database
from tests.support.process import settings_env
from tests.support.servers import bound_socket
from tests.support.waiting import wait_until
from tests.test_e2e import enqueue, queue_rows

JOB = {"to": "ops@example.com", "subject": "From the CLI", "text": "hello"}


def cli(settings: Settings, tmp_path: Path, *args: str, stdin: bytes | None = None) -> Ran:
    return run_cli(*args, settings=settings, cwd=tmp_path, stdin=stdin)


def archive(db: Database, job: dict[str, Any], error: str) -> int:
    """A dead letter with its recorded error, as the runner leaves one."""
    msg_id = enqueue(db, job)
    record = {"type": "PermanentError", "message": error, "attempt": 1}
    with db.connect(role="service_role") as conn:
        conn.execute(
            "select queue_worker.archive('email_queue', %s, %s::jsonb)",
            [[msg_id], json.dumps({str(msg_id): record})],
        )
    return msg_id


def test_help_version_and_usage_errors(tmp_path: Path) -> None:
    ran = run_cli("--help", cwd=tmp_path)
    assert ran.code == 0
    for verb in ("serve", "check", "migrate", "queues", "enqueue", "dead", "replay", "schedules"):
        assert f"    {verb} " in ran.out, verb
    assert "exit codes: 0 ok, 1 failure, 2 bad usage or configuration" in ran.out

    assert run_cli("--version", cwd=tmp_path).out.strip() == f"queue-worker {__version__}"

    unknown = run_cli("frobnicate", cwd=tmp_path)
    assert unknown.code == 2 and "invalid choice: 'frobnicate'" in unknown.err
    # Every number a verb takes is bounded before anything is opened.
    for args in (
        ["replay", "email_queue", "0"],
        ["replay", "email_queue", "9" * 30],
        ["dead", "email_queue", "--limit", "501"],
        ["enqueue", "email_queue", "{}", "--delay", "-1"],
        ["migrate"],
    ):
        ran = run_cli(*args, cwd=tmp_path)
        assert ran.code == 2, (args, ran.err)
        assert "Traceback" not in ran.err


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    ran = run_cli("queues", cwd=tmp_path, env={"QUEUE_WORKER_MODE": "supabase"})
    assert ran.code == 2
    [line] = ran.err.strip().splitlines()
    assert line.startswith("queue-worker: invalid configuration: SUPABASE_URL: is required")


def test_queues_shows_each_served_queue(
    db: Database, service_settings: Settings, tmp_path: Path
) -> None:
    enqueue(db, JOB)
    enqueue(db, JOB)
    ran = cli(service_settings, tmp_path, "queues", "--json")
    assert ran.code == 0, ran.err
    rows = {row["queue"]: row for row in ran.json()["queues"]}
    assert sorted(rows) == ["email_queue", "payments_queue", "reports_queue"]
    assert (rows["email_queue"]["length"], rows["email_queue"]["visible"]) == (2, 2)
    assert rows["payments_queue"]["length"] == 0

    human = cli(service_settings, tmp_path, "queues")
    assert human.code == 0
    assert human.lines[0].split() == ["queue", "length", "visible", "oldest_s", "state"]
    assert human.lines[1].split()[:3] == ["email_queue", "2", "2"]
    assert human.lines[1].split()[-1] == "running"


def test_enqueue_validates_as_the_manual_api_does(
    db: Database, start_service: ServiceFactory, service_settings: Settings, tmp_path: Path
) -> None:
    token = secrets.token_urlsafe(24)
    service = start_service(register=False, api_token=token)
    bad = {"to": "ops@example.com", "text": "no subject"}
    api = httpx.post(
        f"{service.url}/queues/email_queue/messages",
        json=bad,
        headers={"Authorization": f"Bearer {token}"},
    )
    assert api.status_code == 422
    refused = cli(service_settings, tmp_path, "enqueue", "email_queue", json.dumps(bad))
    assert refused.code == 1
    assert refused.err.strip() == f"queue-worker: {api.json()['message']}"
    assert queue_rows(db) == []

    ran = cli(
        service_settings,
        tmp_path,
        "enqueue",
        "email_queue",
        json.dumps(JOB),
        "--json",
        "--idempotency-key",
        "order-42-receipt",
    )
    assert ran.code == 0, ran.err
    msg_id = ran.json()["msg_id"]
    with db.connect() as conn:
        stored = conn.execute(
            "select headers from pgmq.q_email_queue where msg_id = %s", [msg_id]
        ).fetchone()
    assert stored == ({"idempotency_key": "order-42-receipt"},)
    spaced = cli(
        service_settings, tmp_path, "enqueue", "email_queue", "{}", "--idempotency-key", " x"
    )
    assert spaced.code == 1 and "idempotency key: 1 to 255 printable ASCII" in spaced.err
    (tmp_path / "job.json").write_text(json.dumps({**JOB, "subject": "From a file"}))
    from_file = cli(service_settings, tmp_path, "enqueue", "email_queue", "@job.json")
    assert from_file.code == 0, from_file.err
    piped = cli(
        service_settings,
        tmp_path,
        "enqueue",
        "email_queue",
        "-",
        "--delay",
        "3600",
        stdin=json.dumps({**JOB, "subject": "From stdin"}).encode(),
    )
    assert piped.code == 0, piped.err
    assert piped.out.startswith("enqueued email_queue msg_id ")
    with db.connect() as conn:
        rows = conn.execute(
            "select msg_id, message ->> 'subject', vt > now() + interval '59 minutes'"
            " from pgmq.q_email_queue order by msg_id"
        ).fetchall()
    assert rows[0][0] == msg_id
    assert [(subject, later) for _, subject, later in rows] == [
        ("From the CLI", False),
        ("From a file", False),
        ("From stdin", True),
    ]


@pytest.mark.parametrize(
    ("job", "stdin", "expected"),
    [
        ("{not json", None, "job: the argument is not JSON (Expecting property name"),
        ("[1, 2]", None, "message: a job is a JSON object"),
        ("@missing.json", None, "job: cannot read missing.json: No such file or directory"),
        ("-", b"\xff{}", "job: stdin is not UTF-8"),
        ("-", b"[" * 100_000 + b"]" * 100_000, "job: stdin is nested too deeply"),
        # The manual API's bounds (app/job_input.py), whichever door a job comes through.
        ("-", b'{"a": ' * 40 + b"1" + b"}" * 40, "message: nests deeper than 32 levels"),
        ('{"n": 1' + "0" * 200 + "}", None, "message: a number of 201 characters; at most 100"),
    ],
    ids=[
        "not-json",
        "not-an-object",
        "no-file",
        "not-utf8",
        "deep",
        "deeper-than-32",
        "long-number",
    ],
)
def test_enqueue_refuses_what_is_not_a_job(
    db: Database,
    service_settings: Settings,
    tmp_path: Path,
    job: str,
    stdin: bytes | None,
    expected: str,
) -> None:
    ran = cli(service_settings, tmp_path, "enqueue", "email_queue", job, stdin=stdin)
    assert ran.code in (1, 2), ran.err
    assert expected in ran.err
    assert "Traceback" not in ran.err
    assert queue_rows(db) == []


def test_enqueue_refuses_a_job_larger_than_the_api_takes(
    db: Database, service_settings: Settings, tmp_path: Path
) -> None:
    settings = service_settings.model_copy(update={"max_api_body_bytes": 1024})
    (tmp_path / "big.json").write_text(json.dumps({**JOB, "text": "x" * 2000}))
    ran = cli(settings, tmp_path, "enqueue", "email_queue", "@big.json")
    assert ran.code == 2
    assert "job: big.json is larger than 1024 bytes (MAX_API_BODY_BYTES)" in ran.err
    assert queue_rows(db) == []


def test_dead_lists_pages_and_matches_the_api(
    db: Database, start_service: ServiceFactory, service_settings: Settings, tmp_path: Path
) -> None:
    ids = [archive(db, {**JOB, "n": n}, f"SMTP refused the recipients: 550 #{n}") for n in range(3)]
    first = cli(service_settings, tmp_path, "dead", "email_queue", "--limit", "2")
    assert first.code == 0, first.err
    assert first.lines[0].split() == ["msg_id", "attempts", "archived_at", "error"]
    listed = [int(line.split()[0]) for line in first.lines[1:3]]
    assert listed == [ids[2], ids[1]]
    assert "PermanentError: SMTP refused the recipients: 550 #2" in first.lines[1]
    assert first.lines[3] == f"more: queue-worker dead email_queue --before {ids[1]} --limit 2"
    rest = cli(service_settings, tmp_path, "dead", "email_queue", "--before", str(ids[1]))
    assert [int(line.split()[0]) for line in rest.lines[1:]] == [ids[0]]

    token = secrets.token_urlsafe(24)
    service = start_service(register=False, api_token=token)
    api = httpx.get(
        f"{service.url}/queues/email_queue/archive?limit=2",
        headers={"Authorization": f"Bearer {token}"},
    ).json()
    assert (
        cli(service_settings, tmp_path, "dead", "email_queue", "--limit", "2", "--json").json()
        == api
    )

    none = cli(service_settings, tmp_path, "dead", "payments_queue")
    assert (none.code, none.out.strip()) == (0, "no dead letters in payments_queue")


def test_replay_puts_a_dead_letter_back_once(
    db: Database, service_settings: Settings, tmp_path: Path
) -> None:
    dead = archive(db, JOB, "boom")
    ran = cli(service_settings, tmp_path, "replay", "email_queue", str(dead), "--json")
    assert ran.code == 0, ran.err
    new_id = ran.json()["msg_id"]
    assert ran.json() == {"queue": "email_queue", "replayed": dead, "msg_id": new_id}
    assert [row[0] for row in queue_rows(db)] == [new_id]
    again = cli(service_settings, tmp_path, "replay", "email_queue", str(dead))
    assert again.code == 1
    assert again.err.strip() == f"queue-worker: no archived message {dead} in email_queue"


def test_an_unknown_queue_and_a_database_that_is_down_fail_with_exit_1(
    db: Database, gateway: Any, service_settings: Settings, tmp_path: Path
) -> None:
    unknown = cli(service_settings, tmp_path, "dead", "sms_queue")
    assert unknown.code == 1
    assert unknown.err.strip() == "queue-worker: this service does not process queue 'sms_queue'"
    gateway.set_down(True)
    try:
        down = cli(service_settings, tmp_path, "queues")
    finally:
        gateway.set_down(False)
    assert down.code == 1
    assert "the queue database call failed: rpc metrics failed (HTTP 503): PGRST000" in down.err
    assert "Traceback" not in down.err


def test_verbs_work_over_database_url_too(
    db: Database, service_settings: Settings, tmp_path: Path
) -> None:
    settings = service_settings.model_copy(
        update={"database_url": db.url_as(OWNER_ROLE), "supabase_url": None}
    )
    msg_id = archive(db, JOB, "boom")
    ran = cli(settings, tmp_path, "replay", "email_queue", str(msg_id))
    assert ran.code == 0, ran.err
    depth = cli(settings, tmp_path, "queues", "--json").json()["queues"]
    assert next(q for q in depth if q["queue"] == "email_queue")["length"] == 1


def test_an_env_file_reaches_every_worker_process(
    service_settings: Settings, tmp_path: Path
) -> None:
    """`--env-file` with WORKERS=2: each worker process reads the same settings."""
    with contextlib.closing(bound_socket()) as sock:
        port = sock.getsockname()[1]
    values = {**settings_env(service_settings), "WORKERS": "2", "LOG_FORMAT": "text"}
    (tmp_path / "prod.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    log_path = tmp_path / "service.log"
    environment = {**clean_environment(), "PYTHONPATH": str(ROOT)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "--env-file",
                "prod.env",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=tmp_path,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def both_started() -> bool:
            assert process.poll() is None, log_path.read_text()
            return log_path.read_text().count("queue-worker started") == 2

        wait_until(both_started, timeout=120, what="two worker processes")
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert "invalid configuration" not in log_path.read_text()
