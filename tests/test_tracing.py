"""Traces: OpenTelemetry spans across the queue, and nothing imported when tracing is off.

The service runs on loopback against the real test bed (PostgreSQL with pgmq, the
webhook trigger and the pg_net sender, the RPC gateway, SMTP with STARTTLS); its own
TracerProvider gets the SDK's InMemorySpanExporter after start, and the spans are read
from there. A job enqueued through the manual API carries its `traceparent` in the
pgmq headers, so its processing span is the child of the enqueue span, linked to the
webhook that claimed it; the SMTP session and the ack are children of the processing.
The OTLP/HTTP exporter is checked against a collector stand-in on loopback that
decodes what it receives with OpenTelemetry's own protobuf classes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app import operations
from app.config import ConfigError, Settings
from app.otel import OtelTracing
from app.processors.forward import ForwardOptions, ForwardProcessor
from app.queue.backend import QueueBackend
from app.queue.models import QueueMessage
from app.queue.rpc import RpcError
from app.tracing import OFF, open_tracing, wanted
from tests.conftest import Service, ServiceFactory
from tests.support.backends import open_backend
from tests.support.pg_net import PgNetSender
from tests.support.postgres import OWNER_ROLE, Database, bootstrap, fresh_database
from tests.support.rpc_gateway import RpcGateway, running_gateway
from tests.support.servers import serve_in_thread
from tests.support.settings import settings_for
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_e2e import enqueue, queue_rows
from tests.test_pgmq_144 import ATTACH, PGMQ_144_SHAPE
from tests.test_pgmq_144 import QUEUE as LEGACY_QUEUE

TOKEN = "tracing-test-token-0123456789"
OTEL_VARIABLES = (
    "OTEL_SERVICE_NAME",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
)


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own OTEL_* variables stay out of these tests."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracing sends nowhere by itself: the tests add an in-memory exporter."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")


def traced(start_service: ServiceFactory, **overrides: Any) -> tuple[Service, InMemorySpanExporter]:
    """A service with tracing on and the in-memory exporter added (see `no_exporter`)."""
    service = start_service(tracing=True, **overrides)
    tracing = service.services.tracing
    assert isinstance(tracing, OtelTracing)
    exporter = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    return service, exporter


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    spans = named(exporter, name)
    assert len(spans) == 1, (name, [s.name for s in exporter.get_finished_spans()])
    return spans[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


# -- the enable rule -------------------------------------------------------------------


def base_settings(**values: Any) -> Settings:
    return settings_for(
        supabase_url="http://127.0.0.1:9",
        supabase_service_role_key="sb_secret_" + "x" * 40,
        webhook_secret="s" * 8 + "t" * 24,
        smtp_host="127.0.0.1",
        mail_from="tracing@example.com",
        **values,
    )


def test_the_enable_rule() -> None:
    unset = base_settings()
    assert not wanted(unset, {})
    assert wanted(unset, {"OTEL_SERVICE_NAME": "queue-worker"})
    assert wanted(unset, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert wanted(unset, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not wanted(unset, {"OTEL_SERVICE_NAME": "x", "OTEL_SDK_DISABLED": "true"})
    assert not wanted(unset, {"OTEL_SERVICE_NAME": " "})
    # TRACING, when set, decides.
    assert wanted(base_settings(tracing=True), {})
    assert not wanted(base_settings(tracing=False), {"OTEL_SERVICE_NAME": "x"})
    assert open_tracing(unset, {}) is OFF


def test_a_bad_exporter_setting_is_one_line() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER: 'zipkin' is not one of"):
        open_tracing(base_settings(tracing=True), {"OTEL_TRACES_EXPORTER": "zipkin"})


MISSING_PROBE = textwrap.dedent(
    """
    import json, logging, sys
    sys.modules["opentelemetry.sdk"] = None  # as without the otel extra: import fails
    from app.config import ConfigError
    from app.tracing import OFF, open_tracing
    from tests.support.settings import settings_for
    values = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    auto = open_tracing(settings_for(**values), {"OTEL_SERVICE_NAME": "x"})
    try:
        open_tracing(settings_for(**values, tracing=True), {})
    except ConfigError as error:
        explicit = str(error)
    print(json.dumps({"auto_off": auto is OFF, "explicit": explicit}))
    """
)


def test_without_the_otel_extra_tracing_true_stops_start_up() -> None:
    result = subprocess.run(
        [sys.executable, "-c", MISSING_PROBE, json.dumps(plain(base_settings()))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    # Asked for by an OTEL_* variable alone: a warning, and off.
    assert outcome["auto_off"] is True
    assert "tracing is off: OpenTelemetry is not installed" in result.stderr
    assert re.fullmatch(
        r"TRACING: OpenTelemetry is not installed \(opentelemetry\.sdk[.\w]*\); "
        r"install the otel extra: pip install 'queue-worker\[otel\]'",
        outcome["explicit"],
    ), outcome["explicit"]


# -- nothing imported when off ------------------------------------------------------------

OFF_PROBE = textwrap.dedent(
    """
    import json, sys, time
    # FastAPI (0.16x) imports OpenTelemetry's API itself, for its own native telemetry
    # (off while no global provider is set, and this service sets none): the baseline.
    import fastapi, fastapi.applications, fastapi.routing
    def otel():
        return {m for m in sys.modules if m.split(".")[0] == "opentelemetry" or m == "app.otel"}
    baseline = otel()
    import httpx
    from app import metrics
    from app.main import create_app
    from tests.support.servers import serve_in_thread
    from tests.support.settings import settings_for

    values, msg_id = json.loads(sys.argv[1]), int(sys.argv[2])
    app = create_app(settings_for(**values))
    succeeded = metrics.JOBS.labels("email_queue", "succeeded")
    with serve_in_thread(app) as url:
        body = {"type": "INSERT", "table": "q_email_queue", "schema": "pgmq",
                "record": {"msg_id": msg_id}, "old_record": None}
        secret = values["webhook_secret"]
        answer = httpx.post(f"{url}/webhooks/email_queue", json=body,
                            headers={"Authorization": f"Bearer {secret}"})
        assert answer.status_code == 202, answer.text
        deadline = time.monotonic() + 30
        while succeeded._value.get() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert succeeded._value.get() == 1, "the job did not succeed"
    print(json.dumps({"added": sorted(otel() - baseline), "baseline": sorted(baseline)}))
    """
)


def plain(settings: Settings) -> dict[str, Any]:
    """Settings as JSON values, secrets revealed, for a child process."""
    values = {}
    for name, value in settings:
        if name in settings.model_fields_set or value is not None:
            values[name] = value.get_secret_value() if isinstance(value, SecretStr) else value
    return json.loads(json.dumps(values, default=str))


def test_nothing_of_opentelemetry_is_imported_when_tracing_is_off(
    db: Database, service_settings: Settings, smtp: SmtpServer
) -> None:
    # Installed here (the dev group has it), so only the code can keep it out.
    msg_id = enqueue(db, {"to": "off@example.com", "subject": "Off", "text": "x"})
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", OFF_PROBE, json.dumps(plain(service_settings)), str(msg_id)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.splitlines()[-1])
    assert modules["added"] == []
    # Not the SDK, an exporter or app/otel.py: only the API that FastAPI brings.
    assert not [
        m
        for m in modules["baseline"]
        if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.proto"))
        or m == "app.otel"
    ]
    [mail] = smtp.wait_for(1)
    assert mail["Subject"] == "Off"


# -- spans across the queue ---------------------------------------------------------------


def test_a_trace_crosses_the_queue_from_enqueue_to_ack(
    db: Database,
    start_service: ServiceFactory,
    sender: PgNetSender,
    smtp: SmtpServer,
    no_exporter: None,
) -> None:
    service, exporter = traced(start_service, api_token=TOKEN)
    answer = httpx.post(
        f"{service.url}/queues/email_queue/messages",
        json={"to": "traced@example.com", "subject": "Traced", "text": "x"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert answer.status_code == 201, answer.text
    msg_id = answer.json()["msg_id"]
    smtp.wait_for(1)
    wait_until(lambda: named(exporter, "ack email_queue"), what="the ack span")
    wait_until(lambda: queue_rows(db) == [], what="the message deleted")

    send = one(exporter, "send email_queue")
    webhook = one(exporter, "POST /webhooks/{queue}")
    claim = one(exporter, "claim email_queue")
    process = one(exporter, "process email_queue")
    smtp_send = one(exporter, "smtp send")
    ack = one(exporter, "ack email_queue")

    # The enqueue span's context went into the message's headers and came back out.
    assert send.kind is SpanKind.PRODUCER
    assert send.attributes is not None and send.attributes["messaging.message.id"] == str(msg_id)
    assert ids(process)[0] == ids(send)[0]
    assert parent_of(process) == ids(send)[1]
    assert process.kind is SpanKind.CONSUMER
    assert process.attributes is not None
    assert process.attributes["queue_worker.outcome"] == "succeeded"
    assert process.attributes["messaging.message.id"] == str(msg_id)
    # pg_net's webhook starts a trace of its own; the claim is its child, and the
    # processing links to it.
    assert webhook.kind is SpanKind.SERVER and webhook.parent is None
    assert webhook.attributes is not None
    assert webhook.attributes["http.response.status_code"] == 202
    assert ids(claim)[0] == ids(webhook)[0] and parent_of(claim) == ids(webhook)[1]
    assert [ids_of_link(link) for link in process.links] == [ids(webhook)]
    # The SMTP session and the ack are the processing's children.
    assert parent_of(smtp_send) == ids(process)[1] and smtp_send.kind is SpanKind.CLIENT
    assert smtp_send.attributes is not None
    assert smtp_send.attributes["server.port"] == smtp.port
    assert parent_of(ack) == ids(process)[1]
    assert all(span.status.status_code is not StatusCode.ERROR for span in (send, process, ack))


def ids_of_link(link: Any) -> tuple[int, int]:
    return link.context.trace_id, link.context.span_id


def test_a_job_enqueued_in_sql_is_traced_from_the_sweepers_read(
    db: Database, start_service: ServiceFactory, smtp: SmtpServer, no_exporter: None
) -> None:
    # No sender: no webhook, the sweeper finds it; no traceparent in the headers.
    service, exporter = traced(start_service, sweep_interval_seconds=0.2)
    enqueue(db, {"to": "swept@example.com", "subject": "Swept", "text": "x"})
    smtp.wait_for(1)
    wait_until(lambda: named(exporter, "ack email_queue"), what="the ack span")
    read = one(exporter, "read email_queue")
    process = one(exporter, "process email_queue")
    assert read.attributes is not None and read.attributes["messaging.batch.message_count"] == 1
    assert ids(process)[0] == ids(read)[0] and parent_of(process) == ids(read)[1]
    assert process.links == ()
    assert parent_of(one(exporter, "smtp send")) == ids(process)[1]
    # An idle sweep makes no span.
    assert len(named(exporter, "read email_queue")) == 1


def test_a_failed_attempt_marks_its_span(
    db: Database,
    start_service: ServiceFactory,
    sender: PgNetSender,
    smtp: SmtpServer,
    no_exporter: None,
) -> None:
    service, exporter = traced(start_service)
    smtp.fail_temporarily("mail", times=1)
    enqueue(db, {"to": "retry@example.com", "subject": "Retry", "text": "x"})
    wait_until(lambda: named(exporter, "process email_queue"), what="the processing span")
    [process] = named(exporter, "process email_queue")
    assert process.attributes is not None
    assert process.attributes["queue_worker.outcome"] == "retried"
    assert process.status.status_code is StatusCode.ERROR
    # The SMTP span carries the error that failed it.
    [smtp_send] = named(exporter, "smtp send")
    assert smtp_send.status.status_code is StatusCode.ERROR


# -- the forward call ---------------------------------------------------------------------


@dataclass
class Receiver:
    requests: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        self.requests.append(dict(request.headers))
        return Response(status_code=204)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    receiver = Receiver()
    app = Starlette(routes=[Route("/hook", receiver.handle, methods=["POST"])])
    with serve_in_thread(app) as url:
        yield receiver, f"{url}/hook"


@pytest.mark.anyio
async def test_a_forward_call_is_a_client_span_and_carries_the_context(
    receiver: tuple[Receiver, str], no_exporter: None
) -> None:
    got, url = receiver
    tracing = open_tracing(base_settings(tracing=True))
    assert isinstance(tracing, OtelTracing)
    exporter = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = httpx.AsyncClient(transport=tracing.http_transport(httpx.AsyncHTTPTransport()))
    async with client:
        forward = ForwardProcessor("sms_queue", ForwardOptions(url=f"{url}?key=k"), client)
        message = QueueMessage.model_validate(
            {
                "msg_id": 7,
                "read_ct": 1,
                "enqueued_at": "2026-12-02T00:00:00Z",
                "vt": "2026-12-02T00:00:30Z",
                "message": {"n": 1},
            }
        )
        with tracing.span("process sms_queue", kind="consumer"):
            await forward(message)
    tracing.shutdown()
    process = one(exporter, "process sms_queue")
    post = one(exporter, "POST")
    assert post.kind is SpanKind.CLIENT and parent_of(post) == ids(process)[1]
    assert post.attributes is not None
    assert post.attributes["http.response.status_code"] == 204
    assert post.attributes["url.full"] == url  # without the query string
    [headers] = got.requests
    trace_id, span_id = ids(post)
    version, sent_trace, sent_span, flags = headers["traceparent"].split("-")
    assert (version, sent_trace, sent_span) == ("00", f"{trace_id:032x}", f"{span_id:016x}")
    assert int(flags, 16) & 1  # sampled


# -- OTLP over HTTP, as configured by OTEL_* alone -------------------------------------------


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver: POST /v1/traces, protobuf bodies, decoded and kept."""

    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle(self, request: Request) -> Response:
        assert request.headers["content-type"] == "application/x-protobuf"
        decoded = ExportTraceServiceRequest()
        decoded.ParseFromString(await request.body())
        with self.lock:
            self.requests.append(decoded)
        return Response(b"", media_type="application/x-protobuf")

    def spans(self) -> list[tuple[str, str]]:
        """(service.name, span name) of every span received."""
        found = []
        with self.lock:
            for request in self.requests:
                for resource_spans in request.resource_spans:
                    attributes = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    for scope in resource_spans.scope_spans:
                        found += [(attributes["service.name"], s.name) for s in scope.spans]
        return found


def test_spans_reach_an_otlp_collector_configured_by_otel_variables(
    db: Database,
    start_service: ServiceFactory,
    sender: PgNetSender,
    smtp: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collector = Collector()
    app = Starlette(routes=[Route("/v1/traces", collector.handle, methods=["POST"])])
    with serve_in_thread(app) as url:
        # TRACING unset: the endpoint alone turns tracing on.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "queue-worker-test")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        service = start_service()
        assert isinstance(service.services.tracing, OtelTracing)
        enqueue(db, {"to": "otlp@example.com", "subject": "OTLP", "text": "x"})
        smtp.wait_for(1)
        wait_until(
            lambda: ("queue-worker-test", "ack email_queue") in collector.spans(),
            timeout=15,
            what="the spans at the collector",
        )
    names = {name for _, name in collector.spans()}
    assert {"POST /webhooks/{queue}", "claim email_queue", "process email_queue"} <= names


# -- pgmq 1.4.4: no headers, so no context across the queue, but the enqueue works ----------

PGMQ_144_SEND = "drop function pgmq.send(text, jsonb, jsonb, integer)"


@pytest.fixture(scope="module")
def headerless_db(pg_server: str) -> Iterator[Database]:
    """pgmq as 1.4.4 has it: no headers column, and no pgmq.send that takes headers."""
    with fresh_database(pg_server, prefix="qw_trace144") as db:
        bootstrap(db)
        with db.connect(role=OWNER_ROLE) as conn:
            conn.execute(PGMQ_144_SHAPE)  # type: ignore[arg-type]
            conn.execute(ATTACH)  # type: ignore[arg-type]
            conn.execute(PGMQ_144_SEND)
        yield db


@pytest.fixture(scope="module")
def headerless_gateway(headerless_db: Database) -> Iterator[RpcGateway]:
    with running_gateway(headerless_db) as gateway:
        yield gateway


@pytest.fixture(params=["rpc", "sql"])
async def headerless(
    request: pytest.FixtureRequest, headerless_db: Database, headerless_gateway: RpcGateway
) -> AsyncIterator[QueueBackend]:
    async with open_backend(request.param, headerless_db, headerless_gateway) as (queue, _):
        yield queue


@pytest.mark.anyio
async def test_an_enqueue_on_pgmq_144_drops_the_context_and_succeeds(
    headerless: QueueBackend, no_exporter: None
) -> None:
    tracing = open_tracing(base_settings(tracing=True))
    assert isinstance(tracing, OtelTracing)
    exporter = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = {LEGACY_QUEUE: AnyJob()}
    # Without tracing, headers are refused as they always were (an idempotency key).
    with pytest.raises(RpcError) as refused:
        await headerless.send(LEGACY_QUEUE, {"n": 0}, 0, {"idempotency_key": "k"})
    assert refused.value.code == "42883"

    msg_id = await operations.enqueue(headerless, registry, LEGACY_QUEUE, {"n": 1}, tracing=tracing)

    [claimed] = await headerless.claim(LEGACY_QUEUE, [msg_id], 30)
    assert (claimed.message, claimed.headers) == ({"n": 1}, None)
    send = one(exporter, f"send {LEGACY_QUEUE}")
    assert send.attributes is not None
    assert send.attributes["queue_worker.trace_context_dropped"] is True
    assert send.attributes["messaging.message.id"] == str(msg_id)
    tracing.shutdown()


class AnyJob:
    """A processor that takes any job (only `validate` is called here)."""

    def validate(self, body: Any) -> None:
        pass

    async def __call__(self, message: Any) -> None:
        pass
