"""Start-up configuration: clear one-line errors, aliases, key handling."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.config import ConfigError, load_settings
from app.main import served_queues
from tests.conftest import ServiceFactory
from tests.support.settings import SERVICE_VARIABLES, new_webhook_secret

ROOT = Path(__file__).resolve().parents[1]


def fake_jwt(role: str) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'role': role})}.c2lnbmF0dXJl"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """A complete, valid environment; tests remove or break one variable."""
    for name in SERVICE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    values = {
        "SUPABASE_URL": "https://project-ref.supabase.co",
        "SUPABASE_SERVICE_ROLE_KEY": "sb_secret_" + new_webhook_secret(),
        "WEBHOOK_SECRET": new_webhook_secret(),
        "SMTP_HOST": "smtp.example.com",
        "MAIL_FROM": "noreply@example.com",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_complete_environment_loads_with_defaults(env: dict[str, str]) -> None:
    settings = load_settings()
    assert settings.smtp_port == 587
    assert settings.smtp_starttls is True
    assert settings.smtp_ssl_tls is False
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)


@pytest.mark.parametrize(
    "variable", ["SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "WEBHOOK_SECRET"]
)
def test_missing_required_variable_is_named(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.delenv(variable)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert f"{variable}: is required but not set" in message


@pytest.mark.parametrize("variable", ["SMTP_HOST", "MAIL_FROM"])
def test_the_built_in_queues_need_the_mail_settings_naming_the_queues_that_send_mail(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # The settings alone no longer decide: the served queues do. Without a queues.toml
    # they are the built-in ones, and email_queue and reports_queue send mail.
    monkeypatch.delenv(variable)
    settings = load_settings()
    with pytest.raises(ConfigError) as caught:
        served_queues(settings)
    assert str(caught.value) == (
        f"invalid configuration: {variable}: is required but not set "
        "(served queues that send mail: email_queue, reports_queue)"
    )
    # payments_queue alone sends none (its receipts go through email_queue).
    monkeypatch.setenv("QUEUES", "payments_queue")
    assert served_queues(load_settings()) == ["payments_queue"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SMTP_PORT", "not-a-port"),
        ("SMTP_PORT", "70000"),
        ("SUPABASE_URL", "not a url"),
        ("MAIL_FROM", "not-an-address"),
        ("SMTP_STARTTLS", "perhaps"),
    ],
)
def test_malformed_variable_is_named(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"invalid configuration: {variable}: ")
    assert "\n" not in str(caught.value)


def test_smtp_pass_is_read_as_the_password(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    password = new_webhook_secret()
    monkeypatch.setenv("SMTP_USER", "mailer")
    monkeypatch.setenv("SMTP_PASS", password)
    settings = load_settings()
    assert settings.smtp_password is not None
    assert settings.smtp_password.get_secret_value() == password
    assert password not in repr(settings)


def test_user_without_password_is_refused(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP_USER", "mailer")
    with pytest.raises(ConfigError, match="SMTP_USER and SMTP_PASSWORD"):
        load_settings()


def test_starttls_and_implicit_tls_together_are_refused(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP_SSL_TLS", "true")
    with pytest.raises(ConfigError, match="SMTP_STARTTLS and SMTP_SSL_TLS"):
        load_settings()


def test_short_webhook_secret_is_refused_without_echoing_it(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "short-Secret9")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "WEBHOOK_SECRET must be at least 16 characters" in str(caught.value)
    assert "short-Secret9" not in str(caught.value)


def test_secret_key_is_sent_as_apikey_only(env: dict[str, str]) -> None:
    headers = load_settings().supabase_headers
    assert headers == {"apikey": env["SUPABASE_SERVICE_ROLE_KEY"]}


def test_legacy_jwt_is_sent_as_apikey_and_bearer(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = fake_jwt("service_role")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", token)
    assert load_settings().supabase_headers == {
        "apikey": token,
        "Authorization": f"Bearer {token}",
    }


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (fake_jwt("anon"), "JWT for role 'anon'"),
        ("sb_publishable_" + "x" * 20, "publishable key"),
        ("just-some-string", "neither an sb_secret_ key nor a JWT"),
    ],
)
def test_wrong_kind_of_key_is_refused(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, key: str, expected: str
) -> None:
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", key)
    with pytest.raises(ConfigError, match=expected) as caught:
        load_settings()
    assert key not in str(caught.value)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "app.cli"],
        [sys.executable, "-m", "uvicorn", "app.main:app"],
    ],
    ids=["queue-worker", "uvicorn"],
)
def test_start_without_configuration_prints_one_line(command: list[str], tmp_path: Path) -> None:
    env = _clean_env()
    env["PYTHONPATH"] = str(ROOT)
    # Without it, nothing configured means local mode (tests/test_local_mode.py).
    env["QUEUE_WORKER_MODE"] = "supabase"
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("queue-worker: invalid configuration: SUPABASE_URL: is required")
    assert "Traceback" not in result.stderr


def test_queues_are_read_comma_separated_or_as_json(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings().queues is None  # every queue with a processor
    monkeypatch.setenv("QUEUES", " email_queue, payments_queue ")
    assert load_settings().queues == ["email_queue", "payments_queue"]
    monkeypatch.setenv("QUEUES", '["reports_queue"]')
    assert load_settings().queues == ["reports_queue"]
    monkeypatch.setenv("QUEUES", "email_queue,email_queue")
    with pytest.raises(ConfigError, match="QUEUES: names a queue twice"):
        load_settings()


def test_a_queue_without_a_processor_stops_start_up(env: dict[str, str]) -> None:
    environment = {**_clean_env(), **env, "QUEUES": "email_queue,sms_queue"}
    environment["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "app.cli"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("queue-worker: invalid configuration: QUEUES: no processor for")
    assert "'sms_queue'" in line and "email_queue" in line


def test_only_the_configured_queues_are_served(start_service: ServiceFactory) -> None:
    service = start_service(queues=["email_queue"], register=False)
    assert service.services.runner.queues == {"email_queue"}
    body = {
        "type": "INSERT",
        "table": "q_payments_queue",
        "schema": "pgmq",
        "record": {"msg_id": 1},
    }
    response = httpx.post(
        f"{service.url}/webhooks/payments_queue", json=body, headers=service.auth()
    )
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_queue"
