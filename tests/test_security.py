"""Security: webhook signatures, secrets at start, body limits, docs, nothing leaked.

Every request goes over loopback to a running service; the signed trigger is
exercised end to end through Vault, the pg_net stand-in and the service.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from app.api.signatures import SignatureError, verify
from app.config import ConfigError, Settings, load_settings
from app.processors.email import (
    MAX_ATTACHMENT_BYTES,
    MAX_ATTACHMENTS,
    MAX_ATTACHMENTS_TOTAL_BYTES,
    MAX_BODY_CHARS,
)
from tests.conftest import Service, ServiceFactory
from tests.support.pg_net import running_sender
from tests.support.postgres import SQL_DIR, Database, apply_migrations
from tests.support.process import service_process
from tests.support.rpc_gateway import RpcGateway
from tests.support.scrape import sample
from tests.support.settings import new_webhook_secret
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_e2e import enqueue, queue_rows, webhook_body

JOB = {"to": "a@example.com", "subject": "Hi", "text": "Hello"}


# -- helpers ------------------------------------------------------------------


def whsec() -> str:
    """A secret in the Standard Webhooks form: `whsec_` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def key_of(secret: str) -> bytes:
    """The HMAC key a secret stands for, computed here independently of the app."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_") :])
    return secret.encode()


def signature(key: bytes, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    secret: str,
    body: bytes,
    *,
    webhook_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    webhook_id = webhook_id or f"msg_{secrets.token_hex(12)}"
    stamp = int(time.time()) if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signature(key_of(secret), webhook_id, stamp, body),
    }


def encoded(msg_id: int) -> bytes:
    return json.dumps(webhook_body(msg_id)).encode()


def post_webhook(service: Service, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{service.url}/webhooks/email_queue", content=body, headers=headers)


def valid_values(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "supabase_url": "https://project-ref.supabase.co",
        "supabase_service_role_key": "sb_secret_" + new_webhook_secret(),
        "webhook_secret": new_webhook_secret(),
        "smtp_host": "smtp.example.com",
        "mail_from": "noreply@example.com",
    }
    return {**values, **overrides}


# -- secrets at start -----------------------------------------------------------

PLACEHOLDERS = [
    "",
    "   ",
    "<long-random-string>",
    "change-me-change-me-now",
    "CHANGEME-0123456789abcdef",
    "your-webhook-secret-goes-here",
    "secret",
    "x" * 40,
]


@pytest.mark.parametrize("value", PLACEHOLDERS)
@pytest.mark.parametrize(
    ("variable", "field", "extra"),
    [
        ("WEBHOOK_SECRET", "webhook_secret", {}),
        ("WEBHOOK_SECRET_PREVIOUS", "webhook_secret_previous", {}),
        ("API_TOKEN", "api_token", {}),
        ("SMTP_PASSWORD", "smtp_password", {"smtp_user": "mailer"}),
    ],
)
def test_empty_short_or_placeholder_secret_stops_start(
    variable: str, field: str, extra: dict[str, str], value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, **valid_values(**{field: value}, **extra))
    message = str(caught.value)
    assert "\n" not in message
    assert variable in message
    if len(value.strip()) >= 8:
        assert value not in message


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        ("whsec_!!not*base64!!", "WEBHOOK_SECRET is not valid base64 after whsec_"),
        (
            "whsec_" + base64.b64encode(secrets.token_bytes(9)).decode(),
            "WEBHOOK_SECRET must hold at least 16 key bytes",
        ),
    ],
    ids=["not-base64", "short-key"],
)
def test_whsec_secret_must_decode_to_a_long_key(secret: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        load_settings(_env_file=None, **valid_values(webhook_secret=secret))
    assert secret not in str(caught.value)


def test_generated_secrets_in_both_forms_are_accepted() -> None:
    settings = load_settings(
        _env_file=None,
        **valid_values(webhook_secret=whsec(), webhook_secret_previous=new_webhook_secret()),
    )
    assert len(settings.webhook_secrets) == 2
    assert settings.max_webhook_body_bytes == 1024 * 1024
    assert settings.enable_docs is False


def test_an_empty_key_never_verifies() -> None:
    body = b"{}"
    with pytest.raises(SignatureError, match="no signing key"):
        verify([b""], "msg_1", str(int(time.time())), signature(b"", "msg_1", 0, body), body, now=0)


# -- signatures ----------------------------------------------------------------


@pytest.mark.parametrize("form", ["plain", "whsec"])
def test_signed_webhook_without_bearer_is_accepted(
    db: Database, start_service: ServiceFactory, smtp: SmtpServer, form: str
) -> None:
    secret = new_webhook_secret() if form == "plain" else whsec()
    service = start_service(webhook_secret=secret)
    msg_id = enqueue(db, JOB)
    body = encoded(msg_id)
    response = post_webhook(service, body, signed_headers(secret, body))
    assert response.status_code == 202, response.text
    assert response.json() == {"status": "accepted", "msg_id": msg_id}
    [mail] = smtp.wait_for(1)
    assert mail["Subject"] == "Hi"
    wait_until(lambda: queue_rows(db) == [], what="the message to be deleted")


def test_whsec_key_is_the_decoded_bytes_not_the_text(
    db: Database, start_service: ServiceFactory
) -> None:
    secret = whsec()
    service = start_service(webhook_secret=secret)
    msg_id = enqueue(db, JOB)
    body = encoded(msg_id)
    headers = signed_headers(secret, body)
    headers["webhook-signature"] = signature(
        secret.encode(), headers["webhook-id"], headers["webhook-timestamp"], body
    )
    response = post_webhook(service, body, headers)
    assert response.status_code == 401
    assert queue_rows(db) == [(msg_id, 0, False)]


def _tampered(secret: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    return body.replace(b'"INSERT"', b'"INSERT" ', 1), signed_headers(secret, body)


def _wrong_key(secret: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    return body, signed_headers(new_webhook_secret(), body)


def _without(header: str) -> Any:
    def build(secret: str, body: bytes) -> tuple[bytes, dict[str, str]]:
        headers = signed_headers(secret, body)
        del headers[header]
        return body, headers

    return build


def _at(offset: int) -> Any:
    def build(secret: str, body: bytes) -> tuple[bytes, dict[str, str]]:
        return body, signed_headers(secret, body, timestamp=int(time.time()) + offset)

    return build


def _scheme(prefix: str) -> Any:
    def build(secret: str, body: bytes) -> tuple[bytes, dict[str, str]]:
        headers = signed_headers(secret, body)
        headers["webhook-signature"] = prefix + headers["webhook-signature"][3:]
        return body, headers

    return build


def _id_changed(secret: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    headers = signed_headers(secret, body)
    headers["webhook-id"] += "x"
    return body, headers


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (_tampered, "no webhook-signature matches"),
        (_wrong_key, "no webhook-signature matches"),
        (_id_changed, "no webhook-signature matches"),
        (_scheme("v2,"), "no webhook-signature matches"),
        (_scheme(""), "no webhook-signature matches"),
        (_without("webhook-id"), "webhook-id is missing"),
        (_without("webhook-timestamp"), "webhook-timestamp is missing"),
        (_without("webhook-signature"), "webhook-signature is missing"),
        (_at(-301), "webhook-timestamp is more than 300 s from now"),
        # int() drops up to a second: +310 is past the window however late it arrives.
        (_at(+310), "webhook-timestamp is more than 300 s from now"),
    ],
    ids=[
        "tampered-body",
        "wrong-key",
        "other-id",
        "unknown-version",
        "no-version",
        "no-id",
        "no-timestamp",
        "no-signature",
        "stale",
        "future",
    ],
)
def test_bad_signature_is_refused_and_the_message_stays(
    db: Database, service: Service, build: Any, reason: str
) -> None:
    msg_id = enqueue(db, JOB)
    body, headers = build(service.webhook_secret, encoded(msg_id))
    response = post_webhook(service, body, headers)
    assert response.status_code == 401
    payload = response.json()
    assert payload["error"] == "unauthorized"
    assert payload["message"].startswith(f"invalid webhook signature: {reason}")
    assert queue_rows(db) == [(msg_id, 0, False)]


def test_timestamp_within_five_minutes_is_accepted(db: Database, service: Service) -> None:
    for offset in (-290, 290):
        msg_id = enqueue(db, JOB)
        body = encoded(msg_id)
        headers = signed_headers(service.webhook_secret, body, timestamp=int(time.time()) + offset)
        assert post_webhook(service, body, headers).status_code == 202


def test_rotation_accepts_the_previous_secret_until_it_is_removed(
    db: Database, start_service: ServiceFactory
) -> None:
    old, new = new_webhook_secret(), whsec()
    rotating = start_service(webhook_secret=new, webhook_secret_previous=old)
    accepted = []
    for secret in (old, new):
        msg_id = enqueue(db, JOB)
        body = encoded(msg_id)
        accepted.append(post_webhook(rotating, body, signed_headers(secret, body)).status_code)
        msg_id = enqueue(db, JOB)
        accepted.append(
            post_webhook(
                rotating,
                encoded(msg_id),
                {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
            ).status_code
        )
    # A sender signing with both keys at once: one entry has to match.
    msg_id = enqueue(db, JOB)
    body = encoded(msg_id)
    headers = signed_headers(new, body)
    stray = signature(secrets.token_bytes(32), headers["webhook-id"], "0", body)
    headers["webhook-signature"] = f"{stray} {headers['webhook-signature']}"
    accepted.append(post_webhook(rotating, body, headers).status_code)
    assert accepted == [202] * 5

    rotated = start_service(register=False, webhook_secret=new)
    msg_id = enqueue(db, JOB)
    body = encoded(msg_id)
    assert post_webhook(rotated, body, signed_headers(old, body)).status_code == 401
    bearer = {"Authorization": f"Bearer {old}", "Content-Type": "application/json"}
    assert post_webhook(rotated, body, bearer).status_code == 401
    assert post_webhook(rotated, body, signed_headers(new, body)).status_code == 202


def test_replayed_webhook_id_is_a_duplicate_and_not_offered_again(
    db: Database, service: Service, smtp: SmtpServer
) -> None:
    # The sweeper's first pass (at start) is over; it sleeps an hour after it.
    wait_until(lambda: service.services.sweeper.last_sweep is not None, what="the first sweep")
    msg_id = enqueue(db, JOB)
    body = encoded(msg_id)
    headers = signed_headers(service.webhook_secret, body)
    assert post_webhook(service, body, headers).status_code == 202
    [first] = smtp.wait_for(1)
    wait_until(lambda: queue_rows(db) == [], what="the first message deleted")
    # The same msg_id visible on the queue again: if the replay below were offered
    # to the runner, it would claim and send this one.
    with db.connect() as conn:
        conn.execute(
            "insert into pgmq.q_email_queue (msg_id, vt, message) overriding system value "
            "values (%s, now(), %s::jsonb)",
            [msg_id, json.dumps({**JOB, "subject": "Replayed"})],
        )

    before = sample(
        service.url, "queue_worker_webhooks_total", queue="email_queue", result="duplicate"
    )
    again = post_webhook(service, body, headers)
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    assert (
        sample(service.url, "queue_worker_webhooks_total", queue="email_queue", result="duplicate")
        == before + 1
    )
    # Another message goes through the same runner afterwards; by the time its
    # mail arrives, an offered replay would have been claimed too.
    other = enqueue(db, {**JOB, "subject": "Other"})
    other_body = encoded(other)
    post_webhook(service, other_body, signed_headers(service.webhook_secret, other_body))
    wait_until(lambda: queue_rows(db) == [(msg_id, 0, False)], what="the other deleted")
    assert [mail["Subject"] for mail in smtp.messages] == [first["Subject"], "Other"]


def test_refused_attempt_does_not_use_up_its_webhook_id(db: Database, service: Service) -> None:
    msg_id = enqueue(db, JOB)
    body = encoded(msg_id)
    headers = signed_headers(service.webhook_secret, body)
    # Sent to the wrong path first (404); the sender's retry must still get through.
    missed = httpx.post(f"{service.url}/webhooks/other_queue", content=body, headers=headers)
    assert missed.status_code == 404
    retried = post_webhook(service, body, headers)
    assert retried.status_code == 202
    assert retried.json()["status"] == "accepted"


# -- the signed trigger ----------------------------------------------------------


def _store(db: Database, **values: str) -> None:
    with db.connect() as conn:
        for name, value in values.items():
            conn.execute("select vault.create_secret(%s, %s)", [value, name])


@pytest.mark.parametrize("form", ["plain", "whsec"])
def test_trigger_signs_webhooks_with_the_vault_secret(
    db: Database, start_service: ServiceFactory, smtp: SmtpServer, form: str
) -> None:
    secret = new_webhook_secret() if form == "plain" else whsec()
    service = start_service(register=False, webhook_secret=secret)
    _store(
        db,
        queue_worker_url=service.url,
        queue_worker_signing_secret=secret,
        # Present but not sent: with a signing secret the bearer secret stays home.
        queue_worker_webhook_secret=secret,
    )
    # Enqueued by a signed-in user: the trigger reads Vault as its owner.
    with db.connect(role="qw_postgres") as conn:
        conn.execute("grant usage on schema pgmq to authenticated")
        conn.execute("grant select, insert on pgmq.q_email_queue to authenticated")
    try:
        msg_id = enqueue(db, JOB, role="authenticated")
    finally:
        with db.connect(role="qw_postgres") as conn:
            conn.execute("revoke select, insert on pgmq.q_email_queue from authenticated")
            conn.execute("revoke usage on schema pgmq from authenticated")

    with db.connect() as conn:
        [(headers, body)] = conn.execute(
            "select headers, body from net.http_request_queue"
        ).fetchall()
    body = bytes(body)
    assert "Authorization" not in headers
    assert re.fullmatch(r"msg_[0-9a-f]{32}", headers["webhook-id"])
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert headers["webhook-signature"] == signature(
        key_of(secret), headers["webhook-id"], headers["webhook-timestamp"], body
    )
    payload = json.loads(body)
    assert payload["record"]["msg_id"] == msg_id
    assert "message" not in payload["record"]  # the job's content stays in the database

    with running_sender(db) as sender:
        [mail] = smtp.wait_for(1)
        sender.wait_idle()
    assert mail["Subject"] == "Hi"
    wait_until(lambda: queue_rows(db) == [], what="the message to be deleted")
    with db.connect() as conn:
        assert conn.execute("select status_code from net._http_response").fetchall() == [(202,)]

    # The very same request, replayed by someone who captured it: a duplicate.
    replay = post_webhook(service, body, {k: str(v) for k, v in headers.items()})
    assert replay.status_code == 200
    assert replay.json()["status"] == "duplicate"


def test_without_a_signing_secret_the_trigger_still_sends_the_bearer(db: Database) -> None:
    bearer = new_webhook_secret()
    _store(db, queue_worker_url="http://127.0.0.1:9", queue_worker_webhook_secret=bearer)
    enqueue(db, JOB)
    with db.connect() as conn:
        [(headers,)] = conn.execute("select headers from net.http_request_queue").fetchall()
    assert headers == {"Content-Type": "application/json", "Authorization": f"Bearer {bearer}"}


@pytest.fixture
def without_hmac(db: Database) -> Iterator[None]:
    """The server as if pgcrypto were not installed: `extensions.hmac` renamed away."""
    signature_sql = "extensions.{}(bytea, bytea, text)"
    with db.connect() as conn:
        conn.execute(f"alter function {signature_sql.format('hmac')} rename to hmac_gone")
    try:
        yield
    finally:
        with db.connect() as conn:
            conn.execute(f"alter function {signature_sql.format('hmac_gone')} rename to hmac")


@pytest.mark.usefixtures("without_hmac")
def test_migrations_apply_without_pgcrypto_and_inserts_still_succeed(db: Database) -> None:
    apply_migrations(db)
    _store(
        db, queue_worker_url="http://127.0.0.1:9", queue_worker_signing_secret=new_webhook_secret()
    )
    with db.connect(role="qw_postgres") as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute("select pgmq.send('email_queue', '{}')")
    assert len(queue_rows(db)) == 1
    assert any("webhook for pgmq.q_email_queue not sent" in n for n in notices), notices
    with db.connect() as conn:
        assert conn.execute("select count(*) from net.http_request_queue").fetchone() == (0,)


def _standin_sql() -> str:
    text = (SQL_DIR / "10_extensions.sql").read_text()
    match = re.search(r"\$standin\$(.*?)\$standin\$", text, re.S)
    assert match, "10_extensions.sql defines the hmac stand-in"
    return match.group(1).replace("extensions.hmac(", "pg_temp.hmac(")


def test_hmac_standin_gives_pgcrypto_output(db: Database) -> None:
    # The stand-in exists only where pgcrypto does not; here it is created in
    # pg_temp from the file's own text, so it is checked on every server.
    cases = [
        (b"", b""),
        (b"k", b"data"),
        (secrets.token_bytes(32), b"msg_1.1700000000.{}"),
        (secrets.token_bytes(64), secrets.token_bytes(1000)),
        (secrets.token_bytes(65), secrets.token_bytes(3)),
        (secrets.token_bytes(200), "ünïcode ✓".encode()),
    ]
    with db.connect() as conn:
        conn.execute(_standin_sql())  # type: ignore[arg-type]
        installed = conn.execute(
            "select e.extname from pg_extension e where e.extname = 'pgcrypto'"
        ).fetchone()
        for key, data in cases:
            expected = hmac.new(key, data, hashlib.sha256).digest()
            row = conn.execute(
                "select pg_temp.hmac(%s, %s, 'sha256'), pg_temp.hmac(%s, %s, 'SHA256'), "
                "extensions.hmac(%s, %s, 'sha256')",
                [data, key, data, key, data, key],
            ).fetchone()
            assert row is not None
            assert (bytes(row[0]), bytes(row[1]), bytes(row[2])) == (expected,) * 3
        with pytest.raises(psycopg.Error, match="No such hash algorithm"):
            conn.execute("select pg_temp.hmac('x'::bytea, 'k'::bytea, 'md5')")
    print("pgcrypto installed:", installed is not None)  # noqa: T201


# -- body limits and content types -------------------------------------------------


@pytest.fixture
def capped(start_service: ServiceFactory) -> Service:
    return start_service(
        max_webhook_body_bytes=2048, max_api_body_bytes=4096, api_token=new_webhook_secret()
    )


def _padded(msg_id: int, size: int) -> bytes:
    base = webhook_body(msg_id)
    body = json.dumps({**base, "padding": ""}).encode()
    return json.dumps({**base, "padding": "x" * (size - len(body))}).encode()


def test_webhook_body_over_the_cap_is_413_before_authentication(
    db: Database, capped: Service
) -> None:
    msg_id = enqueue(db, JOB)
    json_type = {"Content-Type": "application/json"}
    over = _padded(msg_id, 2049)
    assert len(over) == 2049
    for headers in ({**capped.auth(), **json_type}, json_type):
        response = post_webhook(capped, over, headers)
        assert response.status_code == 413
        assert response.json() == {
            "error": "payload_too_large",
            "message": "the body is larger than 2048 bytes",
        }
        assert response.headers["x-request-id"]
    # Streamed without a Content-Length: counted as it arrives.
    chunks = [over[i : i + 500] for i in range(0, len(over), 500)]
    streamed = httpx.post(
        f"{capped.url}/webhooks/email_queue",
        content=iter(chunks),
        headers={**capped.auth(), **json_type},
    )
    assert streamed.status_code == 413
    assert queue_rows(db) == [(msg_id, 0, False)]

    at_cap = _padded(msg_id, 2048)
    response = post_webhook(capped, at_cap, {**capped.auth(), **json_type})
    assert response.status_code == 202
    chunks = [at_cap[i : i + 500] for i in range(0, len(at_cap), 500)]
    streamed = httpx.post(
        f"{capped.url}/webhooks/email_queue",
        content=iter(chunks),
        headers={**capped.auth(), **json_type},
    )
    assert streamed.status_code == 202


def test_manual_api_body_over_its_cap_is_413(db: Database, capped: Service) -> None:
    assert capped.settings.api_token is not None
    token = {"Authorization": f"Bearer {capped.settings.api_token.get_secret_value()}"}
    small = httpx.post(f"{capped.url}/queues/email_queue/messages", json=JOB, headers=token)
    assert small.status_code == 201
    big = httpx.post(
        f"{capped.url}/queues/email_queue/messages",
        json={**JOB, "text": "x" * 4096},
        headers=token,
    )
    assert big.status_code == 413
    assert big.json()["message"] == "the body is larger than 4096 bytes"
    assert [row[0] for row in queue_rows(db)] == [small.json()["msg_id"]]


def test_manual_api_takes_an_email_at_the_models_caps(
    db: Database, start_service: ServiceFactory
) -> None:
    # The worst case the email model allows, with the default body cap: the
    # attachments at their total cap and both bodies at their cap, escaped by
    # JSON to six bytes a character.
    token = new_webhook_secret()
    service = start_service(register=False, api_token=token)
    per_file = MAX_ATTACHMENTS_TOTAL_BYTES // 2
    assert per_file <= MAX_ATTACHMENT_BYTES
    job = {
        **JOB,
        "text": "é" * MAX_BODY_CHARS,
        "html": "é" * MAX_BODY_CHARS,
        "attachments": [
            {"filename": f"part{i}.bin", "content": base64.b64encode(os.urandom(per_file)).decode()}
            for i in range(2)
        ],
    }
    body = json.dumps(job, ensure_ascii=True).encode()
    assert len(body) > 39_000_000
    response = httpx.post(
        f"{service.url}/queues/email_queue/messages",
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 201, response.text[:500]
    with db.connect() as conn:
        stored = conn.execute(
            "select length(message->>'text'), "
            "length(decode(message->'attachments'->0->>'content', 'base64')) "
            "+ length(decode(message->'attachments'->1->>'content', 'base64')) "
            "from pgmq.q_email_queue where msg_id = %s",
            [response.json()["msg_id"]],
        ).fetchone()
    assert stored == (MAX_BODY_CHARS, MAX_ATTACHMENTS_TOTAL_BYTES)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/json; charset=latin-1",
        "application/jsonp",
        "application/xml",
    ],
)
def test_body_that_is_not_json_is_415(db: Database, capped: Service, content_type: str) -> None:
    msg_id = enqueue(db, JOB)
    response = post_webhook(
        capped, encoded(msg_id), {**capped.auth(), "Content-Type": content_type}
    )
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"
    assert capped.settings.api_token is not None
    token = capped.settings.api_token.get_secret_value()
    api = httpx.post(
        f"{capped.url}/queues/email_queue/messages",
        content=json.dumps(JOB),
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
    )
    assert api.status_code == 415
    assert queue_rows(db) == [(msg_id, 0, False)]


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", 'Application/JSON; charset="UTF-8"'],
)
def test_json_content_types_are_accepted(db: Database, service: Service, content_type: str) -> None:
    msg_id = enqueue(db, JOB)
    response = post_webhook(
        service, encoded(msg_id), {**service.auth(), "Content-Type": content_type}
    )
    assert response.status_code == 202


def test_manual_api_refuses_unknown_fields(db: Database, start_service: ServiceFactory) -> None:
    token = new_webhook_secret()
    service = start_service(api_token=token)
    response = httpx.post(
        f"{service.url}/queues/email_queue/messages",
        json={**JOB, "priority": "high"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 422
    assert response.json() == {
        "error": "invalid_message",
        "message": "invalid EmailJob message: priority: Extra inputs are not permitted",
    }
    assert queue_rows(db) == []


def test_email_attachment_count_and_total_are_capped(
    db: Database, start_service: ServiceFactory
) -> None:
    token = new_webhook_secret()
    service = start_service(register=False, api_token=token)
    one = {"filename": "a.bin", "content": base64.b64encode(b"x").decode()}
    per_file = MAX_ATTACHMENTS_TOTAL_BYTES // 3 + 1  # three fit one file each, not in total
    large = {"filename": "b.bin", "content": base64.b64encode(bytes(per_file)).decode()}
    answers = {}
    for name, attachments in {
        "count": [one] * (MAX_ATTACHMENTS + 1),
        "total": [large] * 3,
        "at-count": [one] * MAX_ATTACHMENTS,
    }.items():
        response = httpx.post(
            f"{service.url}/queues/email_queue/messages",
            json={**JOB, "attachments": attachments},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        answers[name] = (response.status_code, response.json().get("message", ""))
    assert answers["count"] == (
        422,
        "invalid EmailJob message: "
        f"attachments: List should have at most {MAX_ATTACHMENTS} items after validation, "
        f"not {MAX_ATTACHMENTS + 1}",
    )
    assert answers["total"][0] == 422
    assert f"attachments exceed {MAX_ATTACHMENTS_TOTAL_BYTES} bytes" in answers["total"][1]
    assert answers["at-count"][0] == 201
    assert len(queue_rows(db)) == 1


# Larger than a whole manual-API body: no single field may take that much.
UNBOUNDED = 40 * 1024 * 1024 + 1


def _field_paths(schema: dict[str, Any]) -> Iterator[tuple[tuple[str | int, ...], bool]]:
    """Every field path of a model's validation schema, and whether it is an object."""
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        return node

    def walk(
        node: dict[str, Any], path: tuple[str | int, ...], depth: int
    ) -> Iterator[tuple[tuple[str | int, ...], bool]]:
        node = resolve(node)
        if depth > 6:
            return
        for option in node.get("anyOf", []):
            yield from walk(option, path, depth + 1)
        if "properties" in node:
            yield path, True
            for name, child in node["properties"].items():
                yield (*path, name), False
                yield from walk(child, (*path, name), depth + 1)
        if "items" in node:
            yield (*path, 0), False
            yield from walk(node["items"], (*path, 0), depth + 1)

    yield from walk(schema, (), 0)


def _placed(path: tuple[str | int, ...], value: Any) -> Any:
    for part in reversed(path):
        value = [value] if isinstance(part, int) else {part: value}
    return value


def _refused_at(model: type[BaseModel], path: tuple[str | int, ...], value: Any) -> bool:
    try:
        model.model_validate(_placed(path, value))
    except ValidationError as error:
        for item in error.errors():
            loc = tuple(item["loc"])
            if loc and (loc[: len(path)] == path or path[: len(loc)] == loc):
                return True
    return False


def test_every_message_model_bounds_every_field(service: Service) -> None:
    big_string = "a" * UNBOUNDED
    probes = {
        "string": big_string,
        "array": ["a"] * 100_001,
        "object": {"k": big_string},
        "object-keys": {f"k{i}": 1 for i in range(100_001)},
    }
    unbounded = []
    models = {name: processor.model for name, processor in service.services.processors.items()}
    assert models
    for queue, model in models.items():
        seen = set()
        for path, is_object in _field_paths(model.model_json_schema()):
            if (path, is_object) in seen:
                continue
            seen.add((path, is_object))
            if is_object:
                # Unknown fields are refused, at the top and inside.
                probe = (*path, "zz_unknown_field")
                if not _refused_at(model, probe, 1):
                    unbounded.append(f"{queue}: {'.'.join(map(str, probe))} accepted")
                continue
            for kind, value in probes.items():
                if not _refused_at(model, path, value):
                    unbounded.append(f"{queue}: {'.'.join(map(str, path))} takes a huge {kind}")
    assert unbounded == []


# -- docs --------------------------------------------------------------------------


def test_docs_are_served_only_with_enable_docs(start_service: ServiceFactory) -> None:
    default = start_service(register=False)
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{default.url}{path}").status_code == 404, path
    documented = start_service(register=False, enable_docs=True, api_token=new_webhook_secret())
    schema = httpx.get(f"{documented.url}/openapi.json")
    assert schema.status_code == 200
    assert "/webhooks/{queue}" in schema.json()["paths"]
    assert httpx.get(f"{documented.url}/docs").status_code == 200


# -- secrets never leak -----------------------------------------------------------


def archived_count(db: Database) -> int:
    with db.connect() as conn:
        row = conn.execute("select count(*) from pgmq.a_email_queue").fetchone()
    assert row is not None
    return int(row[0])


def test_no_secret_in_logs_responses_metrics_or_schema(
    db: Database, gateway: RpcGateway, service_settings: Settings, smtp: SmtpServer
) -> None:
    api_token = new_webhook_secret()
    previous = new_webhook_secret()
    settings = service_settings.model_copy(
        update={
            "log_level": "DEBUG",
            "enable_docs": True,
            "api_token": SecretStr(api_token),
            "webhook_secret_previous": SecretStr(previous),
            "sweep_interval_seconds": 0.5,
        }
    )
    assert settings.smtp_password is not None
    service_key = settings.supabase_service_role_key.get_secret_value()
    secret_values = {
        "WEBHOOK_SECRET": settings.webhook_secret.get_secret_value(),
        "WEBHOOK_SECRET_PREVIOUS": previous,
        "SUPABASE_SERVICE_ROLE_KEY": service_key,
        "SUPABASE_SERVICE_ROLE_KEY signature": service_key.rsplit(".", 1)[-1],
        "SMTP_PASSWORD": settings.smtp_password.get_secret_value(),
        "API_TOKEN": api_token,
    }
    webhook_secret = secret_values["WEBHOOK_SECRET"]
    seen: list[str] = []

    def record(response: httpx.Response) -> httpx.Response:
        seen.append(f"{response.request.method} {response.request.url.path} {response.status_code}")
        seen.append("\n".join(f"{k}: {v}" for k, v in response.headers.items()))
        seen.append(response.text)
        return response

    smtp.reject_recipients(["rejected@example.com"])
    with service_process(settings) as process, httpx.Client(base_url=process.url) as client:
        good = {"Authorization": f"Bearer {webhook_secret}"}
        api = {"Authorization": f"Bearer {api_token}"}
        wrong = {"Authorization": f"Bearer {new_webhook_secret()}"}
        delivered = enqueue(db, JOB)
        rejected = enqueue(db, {**JOB, "to": "rejected@example.com"})
        for msg_id in (delivered, rejected):
            record(client.post("/webhooks/email_queue", json=webhook_body(msg_id), headers=good))
        signed_id = enqueue(db, {**JOB, "subject": "Signed"})
        body = encoded(signed_id)
        record(
            client.post(
                "/webhooks/email_queue", content=body, headers=signed_headers(previous, body)
            )
        )
        for headers in (wrong, {}, signed_headers(new_webhook_secret(), body)):
            record(client.post("/webhooks/email_queue", content=body, headers=headers))
        record(client.post("/webhooks/email_queue", content=b"{not json", headers=good))
        record(client.post("/webhooks/email_queue", content=b"x" * 2_000_000, headers=good))
        record(
            client.post(
                "/webhooks/email_queue",
                content=b"a=b",
                headers={**good, "Content-Type": "text/plain"},
            )
        )
        record(client.post("/webhooks/nope", json=webhook_body(1, "nope"), headers=good))
        record(client.post("/queues/email_queue/messages", json=JOB, headers=api))
        record(client.post("/queues/email_queue/messages", json={"to": 1}, headers=api))
        record(client.post("/queues/email_queue/messages", json=JOB, headers=wrong))
        record(client.get("/queues", headers=api))
        record(client.get("/queues/email_queue/archive", headers=api))
        for path in ("/health", "/health/ready", "/metrics", "/openapi.json", "/docs", "/nope"):
            record(client.get(path))
        smtp.wait_for(3)
        wait_until(lambda: archived_count(db) == 1, what="the rejected mail archived")
        gateway.set_down()
        try:
            record(client.get("/health/ready"))
            record(client.get("/queues", headers=api))
            record(client.get("/metrics"))
            time.sleep(1.5)  # a few failing sweeps get logged
        finally:
            gateway.set_down(False)
        log = process.log_path.read_text()
    smtp.reject_recipients(None)

    assert "job failed; archiving" in log  # the failures were logged
    assert "sweep failed" in log
    outputs = {"logs": log, "responses": "\n".join(seen)}
    leaks = [
        f"{name} in {where}"
        for name, value in secret_values.items()
        for where, text in outputs.items()
        if value in text
    ]
    assert leaks == []
    assert "Traceback" not in "\n".join(seen)
