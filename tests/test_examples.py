"""examples/plugin end to end: a user's own queues, as the docs tell a user to add them.

The example's migration line (attach_queue) applied as the non-superuser owner; its
queues.toml with ${NAME} values from the environment; `pgmq.send` by the app; the
real trigger through the pg_net stand-in; the webhook, the claim, the processor
(`forward` to an "Edge Function" on loopback that verifies the Standard Webhooks
signature with the reference library; the example's own Python processor posting to
a "push API" on loopback) and the ack. Then the same with every webhook dropped:
the sweeper alone does it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import ServiceFactory
from tests.support.pg_net import PgNetSender, running_sender
from tests.support.postgres import OWNER_ROLE, Database
from tests.support.servers import serve_in_thread
from tests.support.settings import NO_MAIL
from tests.support.waiting import wait_until
from tests.test_e2e import archived_rows, queue_rows

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin"
SIGNING_SECRET = "whsec_" + "ZXhhbXBsZS1wbHVnaW4tdGVzdC1rZXktMzItYnl0ZXM="  # test-only
FUNCTION_KEY = secrets.token_urlsafe(24)
TOKEN = secrets.token_urlsafe(32)


@dataclass
class Remote:
    """The Edge Function and the push API: record, verify, answer 204 (or 422 on "fail")."""

    url: str = ""
    sms: list[dict[str, Any]] = field(default_factory=list)
    sms_ids: list[str] = field(default_factory=list)
    pushes: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    async def send_sms(self, request: Request) -> Response:
        body = await request.body()
        if request.headers.get("authorization") != f"Bearer {FUNCTION_KEY}":
            self.refused.append("authorization")
            return Response("no key", status_code=401)
        try:
            job = Webhook(SIGNING_SECRET).verify(body, dict(request.headers))
        except Exception:  # noqa: BLE001 - any failure to verify is a refusal
            self.refused.append("signature")
            return Response("invalid signature", status_code=401)
        if job["text"] == "fail":
            return Response('{"error": "unknown number"}', status_code=422)
        self.sms.append(job)
        self.sms_ids.append(request.headers["webhook-id"])
        return Response(status_code=204)

    async def push(self, request: Request) -> Response:
        self.pushes.append(json.loads(await request.body()))
        return Response(status_code=201)


@pytest.fixture(scope="module")
def remote_server() -> Iterator[Remote]:
    remote = Remote()
    app = Starlette(
        routes=[
            Route("/functions/v1/send-sms", remote.send_sms, methods=["POST"]),
            Route("/push", remote.push, methods=["POST"]),
        ]
    )
    with serve_in_thread(app) as url:
        remote.url = url
        yield remote


@pytest.fixture
def remote(remote_server: Remote) -> Remote:
    for recorded in (
        remote_server.sms,
        remote_server.sms_ids,
        remote_server.pushes,
        remote_server.refused,
    ):
        recorded.clear()
    return remote_server


@pytest.fixture
def example(db: Database, remote: Remote, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The example's migration applied, its variables set; settings for start_service."""
    with db.connect(role=OWNER_ROLE) as conn:
        for path in sorted((EXAMPLE / "supabase" / "migrations").glob("*.sql")):
            conn.execute(path.read_text())  # type: ignore[arg-type]
    monkeypatch.setenv("SMS_FUNCTION_URL", f"{remote.url}/functions/v1/send-sms")
    monkeypatch.setenv("SMS_FUNCTION_KEY", FUNCTION_KEY)
    monkeypatch.setenv("SMS_SIGNING_SECRET", SIGNING_SECRET)
    monkeypatch.setenv("PUSH_API_URL", f"{remote.url}/push")
    return {"queues_file": EXAMPLE / "queues.toml", "api_token": TOKEN}


def send(db: Database, queue: str, job: dict[str, Any]) -> int:
    """What the app does: pgmq.send (the trigger rings the worker's doorbell)."""
    with db.connect(role=OWNER_ROLE) as conn:
        [(msg_id,)] = conn.execute(
            "select * from pgmq.send(%s, %s::jsonb)", [queue, json.dumps(job)]
        ).fetchall()
    return int(msg_id)


PUSH = {"device_token": "dev-token-0001", "title": "Shipped", "body": "Your order is on its way"}


def test_the_example_runs_end_to_end_through_the_webhook(
    db: Database,
    example: dict[str, Any],
    remote: Remote,
    start_service: ServiceFactory,
    sender: PgNetSender,
) -> None:
    service = start_service(**example)
    assert service.services.runner.queues == {"email_queue", "sms_queue", "push_queue"}
    sms_id = send(db, "sms_queue", {"to": "+15550100", "text": "Ваш заказ отправлен"})
    push_id = send(db, "push_queue", PUSH)
    failing = send(db, "sms_queue", {"to": "+15550199", "text": "fail"})

    wait_until(lambda: len(remote.sms) == 1 and len(remote.pushes) == 1, what="both jobs")
    assert remote.sms == [{"to": "+15550100", "text": "Ваш заказ отправлен"}]
    assert remote.sms_ids == [f"msg_sms_queue_{sms_id}"]
    assert remote.pushes == [PUSH]
    assert remote.refused == []
    wait_until(lambda: queue_rows(db, "sms_queue") == [], what="sms acks")
    wait_until(lambda: queue_rows(db, "push_queue") == [], what="the push ack")
    with db.connect() as conn:
        statuses = conn.execute("select status_code from net._http_response").fetchall()
    assert sorted(statuses) == [(202,)] * 3  # three webhooks, each accepted
    # A 422 from the function is permanent: archived at once with its status and body.
    [(msg_id, read_ct, error)] = archived_rows(db, "sms_queue")
    assert (msg_id, read_ct) == (failing, 1)
    assert error["type"] == "PermanentError"
    assert error["message"].endswith(
        '/functions/v1/send-sms answered 422: {"error": "unknown number"}'
    )
    assert archived_rows(db, "push_queue") == []
    assert push_id > 0


def test_the_manual_api_refuses_a_job_the_plugins_model_refuses(
    db: Database, example: dict[str, Any], start_service: ServiceFactory
) -> None:
    service = start_service(register=False, **example)
    response = httpx.post(
        f"{service.url}/queues/push_queue/messages",
        json={"device_token": "short", "title": "Hi", "body": ""},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 422
    assert response.json() == {
        "error": "invalid_message",
        "message": "invalid Push message: device_token: String should have at least 8 characters",
    }
    assert queue_rows(db, "push_queue") == []


def test_with_every_webhook_dropped_the_sweeper_runs_the_example(
    db: Database, example: dict[str, Any], remote: Remote, start_service: ServiceFactory
) -> None:
    with running_sender(db, drop_rate=1.0, seed=14) as dropping:
        start_service(sweep_interval_seconds=0.3, **example)
        ids = [send(db, "sms_queue", {"to": f"+1555010{i}", "text": f"n{i}"}) for i in range(5)]
        pushes = [send(db, "push_queue", {**PUSH, "title": f"t{i}"}) for i in range(3)]
        wait_until(
            lambda: len(remote.sms) == 5 and len(remote.pushes) == 3, timeout=30, what="sweeps"
        )
        dropping.wait_idle()
        assert dropping.dropped == 8 and dropping.sent == 0
    assert sorted(job["text"] for job in remote.sms) == [f"n{i}" for i in range(5)]
    assert sorted(remote.sms_ids) == sorted(f"msg_sms_queue_{i}" for i in ids)
    assert sorted(p["title"] for p in remote.pushes) == ["t0", "t1", "t2"]
    wait_until(lambda: queue_rows(db, "sms_queue") == [], what="sms acks")
    wait_until(lambda: queue_rows(db, "push_queue") == [], what="push acks")
    assert len(pushes) == 3


# -- a deployment that sends no mail ---------------------------------------------------

SMS_ONLY = """
[queues.sms_queue]
processor = "forward"
url = "${SMS_FUNCTION_URL}"
headers = { Authorization = "Bearer ${SMS_FUNCTION_KEY}" }
signing_secret = "${SMS_SIGNING_SECRET}"
"""


def test_a_forward_only_service_needs_no_smtp_settings_and_delivers(
    db: Database,
    example: dict[str, Any],
    remote: Remote,
    start_service: ServiceFactory,
    sender: PgNetSender,
    tmp_path: Path,
) -> None:
    queues = tmp_path / "queues.toml"
    queues.write_text(SMS_ONLY)
    service = start_service(**{**example, "queues_file": queues, **NO_MAIL})
    assert service.settings.smtp_host == "" and service.settings.mail_from == ""
    assert service.services.runner.queues == {"sms_queue"}
    sms_id = send(db, "sms_queue", {"to": "+15550100", "text": "no mail here"})
    wait_until(lambda: len(remote.sms) == 1, what="the forwarded job")
    assert remote.sms == [{"to": "+15550100", "text": "no mail here"}]
    assert remote.sms_ids == [f"msg_sms_queue_{sms_id}"]
    wait_until(lambda: queue_rows(db, "sms_queue") == [], what="the ack")
    assert archived_rows(db, "sms_queue") == []
    # Ready, without trying an SMTP server it has none of.
    ready = httpx.get(f"{service.url}/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["smtp"] == "not needed"


def test_a_plugin_sending_mail_without_mail_settings_archives_the_job_saying_why(
    db: Database,
    example: dict[str, Any],
    start_service: ServiceFactory,
    sender: PgNetSender,
    tmp_path: Path,
) -> None:
    # push_queue's processor sends mail but its table does not say `mail = true`: the
    # service starts without SMTP settings, and the job is archived with the reason.
    module = f"mailing_push_{secrets.token_hex(4)}"
    (tmp_path / f"{module}.py").write_text(
        "from app.jobs import Handler, Resources\n"
        "from app.mail import Address, Mail\n\n\n"
        "def make(resources: Resources) -> Handler:\n"
        "    async def send(job: dict) -> None:\n"
        "        await resources.mailer.send(\n"
        "            Mail(to=[Address(job['to'])], subject='Shipped', text=job['text'])\n"
        "        )\n\n"
        "    return send\n"
    )
    queues = tmp_path / "queues.toml"
    queues.write_text(SMS_ONLY + f'\n[queues.push_queue]\nprocessor = "{module}:make"\n')
    start_service(**{**example, "queues_file": queues, **NO_MAIL})
    msg_id = send(db, "push_queue", {"to": "anna@example.com", "text": "on its way"})
    wait_until(lambda: archived_rows(db, "push_queue") != [], what="the dead letter")
    [(archived_id, read_ct, error)] = archived_rows(db, "push_queue")
    assert (archived_id, read_ct) == (msg_id, 1)  # permanent: not retried
    assert error["type"] == "PermanentError"
    assert error["message"] == (
        "mail is not configured (SMTP_HOST and MAIL_FROM are not set): set SMTP_HOST and "
        "MAIL_FROM and add mail = true to [queues.push_queue] in queues.toml, so that "
        "start-up requires them, then replay this job"
    )
    assert queue_rows(db, "push_queue") == []
