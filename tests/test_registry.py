"""queues.toml and Python processors: the registry built at start, loud on every mistake.

Each mistake stops start-up with one line naming the file, the queue and the key.
Plugins are real modules written next to a queues.toml in a temporary directory
(the directory holding queues.toml is on the import path, as for a user).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import ConfigError, Settings
from app.errors import PermanentError
from app.mail import Mailer
from app.main import open_mailer
from app.processors.registry import QueuePlan, build_processors, load_queues, require_mail
from app.queue.models import QueueMessage
from tests.support.settings import SERVICE_VARIABLES, settings_for

ROOT = Path(__file__).resolve().parents[1]
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # base64 of 24 bytes, test-only


def base_settings(**values: Any) -> Settings:
    return settings_for(
        **{
            "supabase_url": "http://127.0.0.1:9",
            "supabase_service_role_key": "sb_secret_" + "x" * 30,
            "webhook_secret": "w" * 10 + "-test-secret-abc",
            "smtp_host": "localhost",
            "mail_from": "worker@example.com",
            **values,
        }
    )


_counter = iter(range(10**6))


def write(tmp_path: Path, toml: str, **modules: str) -> Path:
    """queues.toml and plugin modules (name -> source) in `tmp_path`; returns the file."""
    for name, source in modules.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    path = tmp_path / "queues.toml"
    path.write_text(textwrap.dedent(toml))
    return path


def load(path: Path, environ: dict[str, str] | None = None, **values: Any) -> QueuePlan:
    return load_queues(base_settings(queues_file=path, **values), environ or {})


def refused(path: Path, environ: dict[str, str] | None = None, **values: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path, environ, **values)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"invalid configuration: {path}: ")
    return message.removeprefix(f"invalid configuration: {path}: ")


def unique(prefix: str) -> str:
    # Plugin module names differ per test: the import system caches modules by name.
    return f"{prefix}_{next(_counter)}_{id(object())}"


# -- without a file: today's service ------------------------------------------------


def test_without_a_file_the_three_built_in_queues_run_with_the_global_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./queues.toml here
    plan = load_queues(base_settings(max_concurrency=7, max_attempts=3), {})
    assert plan.file is None
    assert plan.names == ["email_queue", "payments_queue", "reports_queue"]
    for name, kind in zip(plan.names, ["email", "payments", "reports"], strict=True):
        spec = plan.queues[name]
        assert (spec.processor, spec.max_concurrency, spec.max_attempts) == (kind, 7, 3)
        assert spec.rate_per_second is None


def test_queues_narrows_the_built_in_queues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_queues(base_settings(queues=["reports_queue"]), {}).names == ["reports_queue"]


def test_a_queues_toml_in_the_working_directory_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, '[queues.mail_only]\nprocessor = "email"\n')
    monkeypatch.chdir(tmp_path)
    plan = load_queues(base_settings(), {})
    assert plan.file == Path("queues.toml")
    assert plan.names == ["mail_only"]


# -- a file ---------------------------------------------------------------------------


def test_a_file_lists_exactly_the_served_queues_with_their_own_limits(tmp_path: Path) -> None:
    module = unique("sms_plugin")
    path = write(
        tmp_path,
        f"""
        [queues.sms_queue]
        processor = "forward"
        url = "https://${{REF}}.supabase.co/functions/v1/send-sms"
        headers = {{ Authorization = "Bearer ${{SMS_KEY}}" }}
        signing_secret = "${{SMS_SECRET}}"
        max_concurrency = 8
        rate_per_second = 14
        max_attempts = 5

        [queues.push_queue]
        processor = "{module}:send_push"
        job_timeout_seconds = 120
        retry_base_seconds = 2
        retry_max_seconds = 30
        visibility_timeout_seconds = 60
        """,
        **{module: "async def send_push(job: dict) -> None:\n    pass\n"},
    )
    environ = {"REF": "abcd", "SMS_KEY": "k" * 20, "SMS_SECRET": SECRET}
    plan = load(path, environ, max_concurrency=16, job_timeout_seconds=300)
    assert plan.names == ["push_queue", "sms_queue"]
    sms, push = plan.queues["sms_queue"], plan.queues["push_queue"]
    assert (sms.max_concurrency, sms.rate_per_second, sms.max_attempts) == (8, 14, 5)
    assert sms.job_timeout_seconds == 300  # the global setting
    assert sms.options["url"] == "https://abcd.supabase.co/functions/v1/send-sms"
    assert sms.options["headers"] == {"Authorization": "Bearer " + "k" * 20}
    assert (push.max_concurrency, push.job_timeout_seconds) == (16, 120)
    assert (push.retry_base_seconds, push.retry_max_seconds) == (2, 30)
    assert push.visibility_timeout_seconds == 60
    assert "k" * 20 not in repr(plan)  # secrets stay out of reprs (and logs)


def test_queues_narrows_a_file_and_only_served_queues_need_their_variables(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        """
        [queues.a_queue]
        processor = "forward"
        url = "${A_URL}"

        [queues.b_queue]
        processor = "forward"
        url = "https://b.example.com/hook"
        """,
    )
    assert load(path, {}, queues=["b_queue"]).names == ["b_queue"]
    assert refused(path, {}) == "queues.a_queue.url: ${A_URL} is not set in the environment"


def test_an_unknown_queues_name_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[queues.a_queue]\nprocessor = "email"\n')
    with pytest.raises(ConfigError) as caught:
        load(path, {}, queues=["z_queue"])
    assert str(caught.value) == (
        f"invalid configuration: QUEUES: no processor for 'z_queue' (not in {path}); "
        "known queues: a_queue"
    )


@pytest.mark.parametrize(
    ("toml", "environ", "expected"),
    [
        (
            '[queues.sms_queue]\nprocessor = "forward"\nurl = "https://x.example"\n'
            'headers = { Authorization = "Bearer ${SMS_KEY}" }\n',
            {},
            "queues.sms_queue.headers.Authorization: ${SMS_KEY} is not set in the environment",
        ),
        (
            '[queues.sms_queue]\nprocessor = "forward"\nurl = "${URL}"\n',
            {"URL": ""},
            "queues.sms_queue.url: ${URL} is set but empty",
        ),
        (
            '[queues.sms_queue]\nprocessor = "email"\nrate_limit = 3\n',
            {},
            "queues.sms_queue.rate_limit: unknown key; the keys of a email queue are: ",
        ),
        (
            '[queues.sms_queue]\nprocessor = "forward"\nurl = "https://x.example"\nretries = 3\n',
            {},
            "queues.sms_queue.retries: unknown key; the keys of a forward queue are: ",
        ),
        (
            '[queues.sms_queue]\nprocessor = "sms"\n',
            {},
            "queues.sms_queue.processor: 'sms' is neither a built-in processor nor an import path",
        ),
        (
            '[queues.sms_queue]\nprocessor = "nowhere_to_be_found:send"\n',
            {},
            "queues.sms_queue.processor: cannot import 'nowhere_to_be_found': no module named "
            "'nowhere_to_be_found'",
        ),
        (
            '[queues.sms_queue]\nprocessor = "email"\n\n[queues.other]\nprocessor = "email"\n'
            '\n[queues.sms_queue]\nprocessor = "forward"\n',
            {},
            "queues.sms_queue: declared twice (lines 1 and 7)",
        ),
        (
            '[queues.sms_queue]\nprocessor = "email"\nmax_concurrency = 0\n',
            {},
            "queues.sms_queue.max_concurrency: Input should be greater than or equal to 1",
        ),
        (
            '[queues.sms_queue]\nprocessor = "email"\nmax_concurrency = "8"\n',
            {},
            "queues.sms_queue.max_concurrency: Input should be a valid integer",
        ),
        (
            '[queues.sms_queue]\nprocessor = "email"\nretry_base_seconds = 60\n'
            "retry_max_seconds = 10\n",
            {},
            "queues.sms_queue.retry_max_seconds: retry_max_seconds (10) is below",
        ),
        (
            '[queues.SMS]\nprocessor = "email"\n',
            {},
            "queues.SMS: invalid queue name",
        ),
        (
            "[queues.sms_queue]\nmax_attempts = 3\n",
            {},
            "queues.sms_queue.processor: is required",
        ),
        (
            '[queue.sms_queue]\nprocessor = "email"\n',
            {},
            "queue: unknown key; the file holds [queues.<name>] tables only",
        ),
        (
            '[queues.sms_queue]\nprocessor = "forward"\nurl = "https://user:pw@x.example/"\n',
            {},
            "queues.sms_queue.url: must not hold credentials",
        ),
        (
            '[queues.sms_queue]\nprocessor = "forward"\nurl = "https://x.example/"\n'
            'signing_secret = "not-a-whsec"\n',
            {},
            "queues.sms_queue.signing_secret: must be a whsec_<base64> secret",
        ),
        (
            '[queues.sms_queue]\nprocessor = "forward"\nurl = "https://x.example/"\n'
            'headers = { "X-A" = "line\\r\\nX-Injected: 1" }\n',
            {},
            "queues.sms_queue.headers: the value of X-A holds a control or non-ASCII character",
        ),
        (
            '[queues.sms_queue]\nprocessor = "forward"\nurl = "https://x.example/"\n'
            'headers = { "webhook-signature" = "v1,forged" }\n',
            {},
            "queues.sms_queue.headers: webhook-signature is set by the worker",
        ),
        (
            "[queues.sms_queue\n",
            {},
            "file: is not valid TOML: ",
        ),
    ],
)
def test_each_mistake_is_one_line_naming_file_queue_and_key(
    tmp_path: Path, toml: str, environ: dict[str, str], expected: str
) -> None:
    path = write(tmp_path, toml)
    message = refused(path, environ)
    assert message.startswith(expected), message
    assert "pw" not in message and "v1,forged" not in message


def test_a_secret_never_appears_in_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[queues.sms_queue]\nprocessor = "forward"\nurl = "${URL}"\n',
    )
    message = refused(path, {"URL": "not a url with sk_live_very_secret"})
    assert message.startswith("queues.sms_queue.url: ")
    assert "sk_live_very_secret" not in message


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "def send(job: dict) -> None:\n    pass\n",
            ":send is not async; write async def send(job: dict) -> None",
        ),
        (
            "async def send() -> None:\n    pass\n",
            ":send takes 0 arguments; a processor takes the job body",
        ),
        (
            "async def send(job: str) -> None:\n    pass\n",
            ": the job parameter is annotated <class 'str'>; annotate it dict or a pydantic model",
        ),
        (
            "async def send(job: dict, *, client) -> None:\n    pass\n",
            ":send requires keyword argument(s) client",
        ),
        (
            "send = 42\n",
            ":send is a int, not a function; write async def send(job: dict) -> None",
        ),
        (
            "raise RuntimeError('no database configured')\n",
            "importing '{module}' failed: RuntimeError: no database configured",
        ),
        (
            "def send(job: dict) -> None\n",
            "importing '{module}' failed: SyntaxError: ",
        ),
        (
            "async def other(job: dict) -> None:\n    pass\n",
            "'{module}' has no attribute 'send'",
        ),
        (
            "from app.jobs import Resources\n"
            "def send(resources: Resources, extra: int) -> None:\n    pass\n",
            ":send looks like a factory (it takes Resources) but requires 2 arguments",
        ),
    ],
)
def test_a_processor_that_cannot_be_called_is_refused_with_the_code_to_write(
    tmp_path: Path, source: str, expected: str
) -> None:
    module = unique("bad_plugin")
    path = write(
        tmp_path, f'[queues.push_queue]\nprocessor = "{module}:send"\n', **{module: source}
    )
    message = refused(path)
    assert message.startswith("queues.push_queue.processor: "), message
    assert expected.format(module=module) in message, message


def test_a_bad_file_stops_the_console_script_with_exit_2_and_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[queues.sms_queue]\nprocessor = "forward"\nurl = "${NO_SUCH_VAR}"\n')
    environment = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    environment.update(
        PYTHONPATH=str(ROOT),
        QUEUES_FILE=str(path),
        SUPABASE_URL="http://127.0.0.1:9",
        SUPABASE_SERVICE_ROLE_KEY="sb_secret_" + "x" * 30,
        WEBHOOK_SECRET="w" * 10 + "-test-secret-abc",
        SMTP_HOST="localhost",
        MAIL_FROM="worker@example.com",
    )
    result = subprocess.run(
        [sys.executable, "-m", "app.cli"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"queue-worker: invalid configuration: {path}: queues.sms_queue.url: "
        "${NO_SUCH_VAR} is not set in the environment"
    ]


# -- Python processors: the forms they take ------------------------------------------


def build(plan: QueuePlan, settings: Settings | None = None) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            return await build_processors(
                plan,
                settings=settings or base_settings(),
                http=http,
                mailer=Mailer(base_settings()),
                rpc=None,  # type: ignore[arg-type]
            )

    return asyncio.run(run())


def message(body: Any, msg_id: int = 7) -> QueueMessage:
    return QueueMessage.model_validate(
        {
            "msg_id": msg_id,
            "read_ct": 1,
            "enqueued_at": "2026-12-01T00:00:00Z",
            "vt": "2026-12-01T00:00:30Z",
            "message": body,
            "headers": {"trace": "t-1"},
        }
    )


def test_a_handler_taking_a_model_is_validated_like_a_built_in_job(tmp_path: Path) -> None:
    module = unique("model_plugin")
    path = write(
        tmp_path,
        f'[queues.push_queue]\nprocessor = "{module}:send"\n',
        **{
            module: """
            from pydantic import BaseModel, ConfigDict, Field

            SEEN = []

            class Push(BaseModel):
                model_config = ConfigDict(extra="forbid")
                device: str = Field(max_length=100)
                text: str = Field(max_length=100)

            async def send(job: Push) -> None:
                SEEN.append(job)
            """
        },
    )
    processor = build(load(path))["push_queue"]
    processor.validate({"device": "d1", "text": "hi"})
    with pytest.raises(PermanentError, match=r"invalid Push message: text: Field required"):
        processor.validate({"device": "d1"})
    with pytest.raises(PermanentError, match=r"text: String should have at most 100"):
        asyncio.run(processor(message({"device": "d1", "text": "x" * 101})))
    asyncio.run(processor(message({"device": "d1", "text": "hi"})))
    seen = sys.modules[module].SEEN
    assert [(job.device, job.text) for job in seen] == [("d1", "hi")]


def test_a_dict_handler_gets_the_body_and_optionally_the_message(tmp_path: Path) -> None:
    module = unique("dict_plugin")
    path = write(
        tmp_path,
        f"""
        [queues.one_queue]
        processor = "{module}:body_only"

        [queues.two_queue]
        processor = "{module}:with_message"
        """,
        **{
            module: """
            from app.jobs import Message

            SEEN = []

            async def body_only(job):
                SEEN.append(("body", job))

            async def with_message(job: dict, message: Message) -> None:
                SEEN.append(("message", job, message.msg_id, message.read_ct, message.headers))
            """
        },
    )
    processors = build(load(path))
    asyncio.run(processors["one_queue"](message({"n": 1})))
    asyncio.run(processors["two_queue"](message({"n": 2}, msg_id=9)))
    with pytest.raises(PermanentError, match="message: must be a JSON object"):
        processors["one_queue"].validate(["not", "an", "object"])
    assert sys.modules[module].SEEN == [
        ("body", {"n": 1}),
        ("message", {"n": 2}, 9, 1, {"trace": "t-1"}),
    ]


def test_a_factory_receives_the_shared_resources_and_its_options(tmp_path: Path) -> None:
    module = unique("factory_plugin")
    path = write(
        tmp_path,
        f"""
        [queues.push_queue]
        processor = "{module}:make"
        options = {{ endpoint = "https://${{PUSH_HOST}}/send", batch = 3 }}
        """,
        **{
            module: """
            from app.jobs import Handler, Resources

            GIVEN = []

            def make(resources: Resources) -> Handler:
                GIVEN.append(resources)

                async def send(job: dict) -> None:
                    GIVEN.append(job)

                return send
            """
        },
    )
    settings = base_settings()
    processor = build(load(path, {"PUSH_HOST": "push.example.com"}), settings)["push_queue"]
    asyncio.run(processor(message({"n": 1})))
    resources, job = sys.modules[module].GIVEN
    assert resources.queue == "push_queue"
    assert dict(resources.options) == {"endpoint": "https://push.example.com/send", "batch": 3}
    assert resources.settings is settings
    assert isinstance(resources.http, httpx.AsyncClient)
    assert isinstance(resources.mailer, Mailer)
    assert job == {"n": 1}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "from app.jobs import Resources\ndef make(resources: Resources):\n    return 42\n",
            ":make(resources) returned int; a factory returns the processor",
        ),
        (
            "from app.jobs import Resources\ndef make(resources: Resources):\n"
            "    def send(job):\n        pass\n    return send\n",
            ":make(resources) is not async; write async def send(job: dict) -> None",
        ),
        (
            "from app.jobs import Resources\ndef make(resources: Resources):\n"
            "    raise KeyError('endpoint')\n",
            ":make(resources) raised KeyError: 'endpoint'",
        ),
    ],
)
def test_a_factory_returning_no_processor_stops_start_up_naming_it(
    tmp_path: Path, source: str, expected: str
) -> None:
    module = unique("bad_factory")
    path = write(
        tmp_path, f'[queues.push_queue]\nprocessor = "{module}:make"\n', **{module: source}
    )
    with pytest.raises(ConfigError) as caught:
        build(load(path))
    text = str(caught.value)
    assert text.startswith(f"invalid configuration: {path}: queues.push_queue.processor: ")
    assert expected in text, text
    assert "\n" not in text


def test_an_async_factory_and_a_processor_object_are_accepted(tmp_path: Path) -> None:
    module = unique("object_plugin")
    path = write(
        tmp_path,
        f'[queues.push_queue]\nprocessor = "{module}:make"\n',
        **{
            module: """
            from app.jobs import Message, PermanentError, Resources

            SEEN = []

            class Pusher:
                def validate(self, body):
                    if "device" not in body:
                        raise PermanentError("device is required")

                async def __call__(self, message: Message) -> None:
                    SEEN.append(message.msg_id)

            async def make(resources: Resources) -> Pusher:
                return Pusher()
            """
        },
    )
    processor = build(load(path))["push_queue"]
    with pytest.raises(PermanentError, match="device is required"):
        processor.validate({})
    asyncio.run(processor(message({"device": "d"}, msg_id=11)))
    assert sys.modules[module].SEEN == [11]


# -- mail: which served queues need SMTP ---------------------------------------------


def no_mail_settings(**values: Any) -> Settings:
    """Settings of a deployment that sends no mail: no SMTP_HOST, no MAIL_FROM."""
    return base_settings(smtp_host="", mail_from="", **values)


def test_the_served_queues_that_send_mail_decide_whether_smtp_is_required(
    tmp_path: Path,
) -> None:
    module = unique("mail_plugin")
    path = write(
        tmp_path,
        f"""
        [queues.email_queue]
        processor = "email"

        [queues.reports_queue]
        processor = "reports"

        [queues.payments_queue]
        processor = "payments"

        [queues.sms_queue]
        processor = "forward"
        url = "https://example.net/send-sms"

        [queues.notify_queue]
        processor = "{module}:send"
        mail = true

        [queues.push_queue]
        processor = "{module}:send"
        """,
        **{module: "async def send(job: dict) -> None:\n    pass\n"},
    )
    plan = load_queues(no_mail_settings(queues_file=path), {})
    assert plan.mail_queues == ["email_queue", "notify_queue", "reports_queue"]
    with pytest.raises(ConfigError) as caught:
        require_mail(no_mail_settings(queues_file=path), plan)
    assert str(caught.value) == (
        "invalid configuration: SMTP_HOST: is required but not set; MAIL_FROM: is required "
        "but not set (served queues that send mail: email_queue, notify_queue, reports_queue)"
    )
    # Served without the mail queues, the same file needs no mail settings.
    settings = no_mail_settings(queues_file=path, queues="payments_queue,sms_queue,push_queue")
    narrowed = load_queues(settings, {})
    assert narrowed.names == ["payments_queue", "push_queue", "sms_queue"]
    assert narrowed.mail_queues == []
    require_mail(settings, narrowed)  # no error


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            'processor = "{module}:send"\nmail = "yes"',
            "queues.push_queue.mail: must be true or false (does the processor send mail?)",
        ),
        (
            'processor = "email"\nmail = false',
            "queues.push_queue.mail: only for a processor of your own: the built-in email "
            "processor always sends mail",
        ),
        (
            'processor = "forward"\nurl = "https://example.net/x"\nmail = true',
            "queues.push_queue.mail: only for a processor of your own: the built-in forward "
            "processor never sends mail",
        ),
    ],
)
def test_a_wrong_mail_key_is_one_line_naming_it(tmp_path: Path, table: str, expected: str) -> None:
    module = unique("mail_key")
    path = write(
        tmp_path,
        "[queues.push_queue]\n" + table.format(module=module) + "\n",
        **{module: "async def send(job: dict) -> None:\n    pass\n"},
    )
    assert refused(path) == expected


def test_a_plugin_that_sends_mail_without_mail_settings_gets_a_permanent_error(
    tmp_path: Path,
) -> None:
    # Not declared `mail = true`, so start-up did not ask for SMTP; it sends anyway.
    module = unique("sneaky_mail")
    path = write(
        tmp_path,
        f'[queues.push_queue]\nprocessor = "{module}:make"\n',
        **{
            module: """
            from app.jobs import Handler, Resources
            from app.mail import Address, Mail

            def make(resources: Resources) -> Handler:
                async def send(job: dict) -> None:
                    await resources.mailer.send(
                        Mail(to=[Address(job["to"])], subject="Hi", text="Hello")
                    )

                return send
            """
        },
    )
    settings = no_mail_settings(queues_file=path)
    plan = load_queues(settings, {})
    require_mail(settings, plan)  # nothing declared mail: start-up goes on

    async def run() -> None:
        async with httpx.AsyncClient() as http:
            processors = await build_processors(
                plan,
                settings=settings,
                http=http,
                mailer=open_mailer(settings),
                rpc=None,  # type: ignore[arg-type]
            )
            await processors["push_queue"](message({"to": "anna@example.com"}))

    with pytest.raises(PermanentError) as caught:
        asyncio.run(run())
    assert str(caught.value) == (
        "mail is not configured (SMTP_HOST and MAIL_FROM are not set): set SMTP_HOST and "
        "MAIL_FROM and add mail = true to [queues.push_queue] in queues.toml, so that "
        "start-up requires them, then replay this job"
    )


@pytest.mark.parametrize(
    "command",
    [["-m", "app.cli"], ["-m", "uvicorn", "app.main:app"]],
    ids=["queue-worker", "uvicorn"],
)
def test_serving_email_without_smtp_host_stops_start_up_naming_it_and_the_queue(
    tmp_path: Path, command: list[str]
) -> None:
    module = unique("declared_mail")
    path = write(
        tmp_path,
        f"""
        [queues.email_queue]
        processor = "email"

        [queues.sms_queue]
        processor = "forward"
        url = "https://example.net/send-sms"

        [queues.notify_queue]
        processor = "{module}:send"
        mail = true
        """,
        **{module: "async def send(job: dict) -> None:\n    pass\n"},
    )
    environment = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    environment.update(
        PYTHONPATH=str(ROOT),
        QUEUES_FILE=str(path),
        SUPABASE_URL="http://127.0.0.1:9",
        SUPABASE_SERVICE_ROLE_KEY="sb_secret_" + "x" * 30,
        WEBHOOK_SECRET="w" * 10 + "-test-secret-abc",
        MAIL_FROM="worker@example.com",
    )
    result = subprocess.run(
        [sys.executable, *command],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "queue-worker: invalid configuration: SMTP_HOST: is required but not set "
        "(served queues that send mail: email_queue, notify_queue)"
    ]
