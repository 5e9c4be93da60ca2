"""Bad input at every endpoint: never a 5xx, never a traceback, never a lost message.

Hypothesis throws malformed bodies, headers, query strings and paths at a service
running on loopback: webhooks (no, wrong, valid and signed authentication), the
manual API under API_TOKEN, health, readiness, metrics and paths nobody serves.
Real messages are seeded in the queue first; after every single input they must
all still be there, unclaimed and unchanged. The number of inputs tried is printed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.api.webhooks import QueueRow, WebhookPayload
from tests.conftest import Service, ServiceFactory
from tests.support.postgres import Database
from tests.support.settings import new_webhook_secret
from tests.support.waiting import wait_until
from tests.test_e2e import enqueue, webhook_body

MAX_EXAMPLES = 1500
SEEDED = 6

# Headers that change how HTTP frames the request: sending nonsense there tests
# the client library and uvicorn's parser, not the service.
FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade", "te"}


@dataclass
class Request:
    kind: str
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    params: dict[str, str] = field(default_factory=dict)


# -- strategies ------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.integers(min_value=2**63 - 2, max_value=2**70),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)

# Hand-picked nasties next to the generated ones.
NASTY_BODIES = [
    b"",
    b"null",
    b"[]",
    b"{}",
    b"\xef\xbb\xbf{}",
    b"\xff\xfe\x00",
    b"[" * 5000 + b"]" * 5000,
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b'"\\ud800"',
    b'{"type":"INSERT","table":"q_email_queue","schema":"pgmq","record":{"msg_id":1e400}}',
    b'{"type":"INSERT","table":"q_email_queue","schema":"pgmq","record":{"msg_id":-0}}',
    b'{"type":"INSERT","table":"q_email_queue","schema":"pgmq","record":{"msg_id":'
    + b"9" * 5000
    + b"}}",
    b'{"to":"a@example.com","subject":"\\u0000","text":"x"}',
    b'{"to":"a@example.com","subject":"\\ud800","text":"x"}',
    b'{"to":"a@example.com","subject":"Hi","text":"\\udfff\\u0000"}',
    b'{"to":"a@example.com","subject":"Hi","html":"x","attachments":[{"filename":"\\u0000",'
    b'"content":"eA=="}]}',
    b'{"to":"a@example.com","subject":"Hi","text":"x","cc":["\\u0000@example.com"]}',
    b'{"to":"a@example.com","\\u0000":1,"subject":"Hi","text":"x"}',
]

bodies = st.one_of(
    st.sampled_from(NASTY_BODIES),
    st.binary(max_size=600),
    st.text(max_size=200).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
)


def _mutated_event(path: str, value: Any) -> bytes:
    event: dict[str, Any] = json.loads(json.dumps(webhook_body(1)))
    if path == "drop":
        event.pop("type")
    elif path.startswith("record."):
        event["record"][path.split(".", 1)[1]] = value
    else:
        event[path] = value
    return json.dumps(event, allow_nan=True).encode()


events = st.builds(
    _mutated_event,
    st.sampled_from(["type", "table", "schema", "record", "old_record", "record.msg_id", "drop"]),
    json_values,
)

emails = st.fixed_dictionaries(
    {
        "to": st.one_of(st.emails(), st.text(max_size=40), json_values),
        "subject": st.text(max_size=40),
        "text": st.text(max_size=80),
    },
    optional={
        "html": st.text(max_size=40),
        "cc": st.lists(st.one_of(st.emails(), st.text(max_size=20)), max_size=3),
        "attachments": st.lists(
            st.fixed_dictionaries(
                {"filename": st.text(max_size=20), "content": st.text(max_size=20)},
                optional={"content_type": st.text(max_size=20)},
            ),
            max_size=2,
        ),
        "extra": json_values,
    },
).map(lambda job: json.dumps(job).encode())

header_names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20
).filter(lambda name: name not in FRAMING)
# h11, the client's HTTP layer, refuses values with surrounding whitespace.
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60
).map(str.strip)
extra_headers = st.dictionaries(header_names, header_values, max_size=4)
# Mostly JSON, so that most bodies get past the content-type check to the routes.
_json_types = st.sampled_from(["application/json", "application/json; charset=utf-8", None])
content_types = st.sampled_from([_json_types] * 3 + [header_values]).flatmap(lambda s: s)
params = st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3)
path_text = st.text(min_size=1, max_size=40).map(lambda text: quote(text, safe=""))
methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])


# -- requests -------------------------------------------------------------------


def _headers(content_type: str | None, extra: dict[str, str], **auth: str) -> dict[str, str]:
    headers = dict(extra)
    if content_type is not None:
        headers["Content-Type"] = content_type
    headers.update(auth)
    return headers


@st.composite
def webhook_requests(draw: st.DrawFn, secret: str) -> Request:
    queue = draw(st.sampled_from(["email_queue", "email_queue", "reports_queue"]) | path_text)
    body = draw(st.one_of(bodies, events))
    auth_kind = draw(
        st.sampled_from(
            ["none", "bearer", "bearer", "bearer", "wrong", "garbage", "signed", "signed", "forged"]
        )
    )
    auth: dict[str, str] = {}
    if auth_kind == "bearer":
        auth["Authorization"] = f"Bearer {secret}"
    elif auth_kind == "wrong":
        auth["Authorization"] = f"Bearer {new_webhook_secret()}"
    elif auth_kind == "garbage":
        auth["Authorization"] = draw(header_values)
    elif auth_kind in ("signed", "forged"):
        webhook_id = draw(header_values)
        now = st.builds(lambda: str(int(time.time())))
        stamp = draw(
            st.one_of(
                now,
                now,
                st.integers(-(2**40), 2**40).map(str),
                header_values,
            )
        )
        digest = hmac.new(
            secret.encode() if auth_kind == "signed" else draw(st.binary(min_size=1)),
            f"{webhook_id}.{stamp}.".encode() + body,
            hashlib.sha256,
        ).digest()
        signature = "v1," + base64.b64encode(digest).decode()
        auth["webhook-id"] = webhook_id
        auth["webhook-timestamp"] = stamp
        auth["webhook-signature"] = draw(
            st.sampled_from([signature, f"{signature} v1,xyz", "v1a,abc " + signature])
            | header_values
        )
    headers = _headers(draw(content_types), draw(extra_headers), **auth)
    return Request(f"webhook/{auth_kind}", "POST", f"/webhooks/{queue}", headers, body)


@st.composite
def api_requests(draw: st.DrawFn, token: str) -> Request:
    valid = draw(st.sampled_from([True, True, True, False]))
    auth = {"Authorization": f"Bearer {token if valid else new_webhook_secret()}"}
    if not valid and draw(st.booleans()):
        auth = {"Authorization": draw(header_values)} if draw(st.booleans()) else {}
        valid = False
    queue = draw(st.sampled_from(["email_queue", "payments_queue", "nope"]) | path_text)
    # A drain with the right token is a real sweep, which would take the seeded
    # messages: it is sent only with a wrong token.
    action = draw(st.sampled_from(["enqueue", "archive", "replay", "list", "drain"]))
    if action == "drain" and valid:
        auth = {"Authorization": f"Bearer {new_webhook_secret()}"}
    headers = _headers(draw(content_types), draw(extra_headers), **auth)
    query = draw(params)
    if action == "enqueue":
        body = draw(st.one_of(bodies, emails))
        if draw(st.booleans()):
            query["delay_seconds"] = draw(st.integers().map(str) | st.text(max_size=8))
        return Request("api/enqueue", "POST", f"/queues/{queue}/messages", headers, body, query)
    if action == "archive":
        for name in ("limit", "before"):
            if draw(st.booleans()):
                query[name] = draw(st.integers().map(str) | st.text(max_size=8))
        return Request("api/archive", "GET", f"/queues/{queue}/archive", headers, None, query)
    if action == "replay":
        msg_id = draw(st.integers().map(str) | path_text)
        path = f"/queues/{queue}/archive/{msg_id}/replay"
        return Request("api/replay", "POST", path, headers, draw(st.none() | bodies), query)
    if action == "list":
        return Request("api/list", draw(methods), "/queues", headers, None, query)
    return Request("api/drain", "POST", f"/queues/{queue}/drain", headers, None, query)


@st.composite
def other_requests(draw: st.DrawFn) -> Request:
    path = draw(
        st.sampled_from(["/health", "/health/ready", "/metrics", "/docs", "/openapi.json"])
        | st.lists(path_text, max_size=4).map(lambda parts: "/" + "/".join(parts))
    )
    method = draw(methods)
    content = draw(st.none() | bodies) if method not in ("GET", "HEAD") else None
    headers = _headers(draw(content_types), draw(extra_headers))
    if path == "/metrics" and draw(st.booleans()):
        headers["Accept"] = draw(
            st.sampled_from(
                ["application/openmetrics-text; version=1.0.0", "text/plain;version=9", "*/*"]
            )
            | header_values
        )
    kind = path if path in ("/health", "/health/ready", "/metrics") else "other"
    return Request(kind, method, path, headers, content, draw(params))


# -- the test --------------------------------------------------------------------


def _offers_a_seeded_message(request: Request, seeded: set[int]) -> bool:
    """Whether the service would rightly claim a seeded message for this request."""
    if not request.kind.startswith("webhook/") or request.content is None:
        return False
    try:
        payload = WebhookPayload.model_validate_json(request.content)
        row = QueueRow.model_validate(payload.record)
    except ValidationError:
        return False
    return row.msg_id in seeded


@pytest.fixture
def target(db: Database, start_service: ServiceFactory) -> tuple[Service, str, list[int]]:
    token = new_webhook_secret()
    service = start_service(register=False, api_token=token)
    # The sweeper's first pass runs at start; seed after it, and it sleeps an hour.
    wait_until(lambda: service.services.sweeper.last_sweep is not None, what="the first sweep")
    ids = [
        enqueue(db, {"to": f"seed{i}@example.com", "subject": f"Seed {i}", "text": "keep me"})
        for i in range(SEEDED)
    ]
    return service, token, ids


def test_bad_input_never_fails_the_service_or_loses_a_message(
    db: Database, target: tuple[Service, str, list[int]], figures: Any
) -> None:
    service, token, ids = target
    seeded = set(ids)
    with db.connect() as conn:
        before = conn.execute(
            "select msg_id, read_ct, vt, enqueued_at, message from pgmq.q_email_queue "
            "order by msg_id"
        ).fetchall()
    assert [row[0] for row in before] == ids
    tried: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    started = time.monotonic()

    with httpx.Client(base_url=service.url, timeout=30) as client, db.connect() as conn:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(
            st.one_of(
                webhook_requests(service.webhook_secret),
                webhook_requests(service.webhook_secret),
                api_requests(token),
                api_requests(token),
                other_requests(),
            )
        )
        def attempt(request: Request) -> None:
            assume(not _offers_a_seeded_message(request, seeded))
            tried[request.kind] += 1
            response = client.request(
                request.method,
                request.path,
                headers=request.headers,
                content=request.content,
                params=request.params,
            )
            statuses[response.status_code] += 1
            described = f"{request} -> {response.status_code} {response.text[:300]!r}"
            if request.kind == "/health/ready" and request.method == "GET":
                assert response.status_code in (200, 503), described
            else:
                assert response.status_code < 500, described
            assert "Traceback" not in response.text, described
            assert 'File "' not in response.text, described
            now = conn.execute(
                "select msg_id, read_ct, vt, enqueued_at, message from pgmq.q_email_queue "
                "where msg_id = any(%s) order by msg_id",
                [ids],
            ).fetchall()
            assert now == before, described

        attempt()

    elapsed = time.monotonic() - started
    figures(
        inputs=sum(tried.values()),
        seconds=round(elapsed, 1),
        seeded_intact=f"{len(before)}/{SEEDED}",
        **{kind.replace("/", "_").strip("_"): n for kind, n in sorted(tried.items())},
        statuses=dict(sorted(statuses.items())),
    )
    print(f"bad input: tried {sum(tried.values())} inputs in {elapsed:.1f} s")  # noqa: T201
    assert sum(tried.values()) >= MAX_EXAMPLES // 2


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("text", "nul \u0000 inside"),
        ("subject", "nul \u0000 inside"),
        ("text", "lone \ud800 surrogate"),
        ("subject", "lone \udfff surrogate"),
    ],
    ids=["nul-text", "nul-subject", "surrogate-text", "surrogate-subject"],
)
def test_enqueue_refuses_text_the_database_cannot_store(
    db: Database, target: tuple[Service, str, list[int]], field: str, text: str
) -> None:
    service, token, ids = target
    body = json.dumps({"to": "a@example.com", "subject": "Hi", "text": "x", field: text}).encode()
    response = httpx.post(
        f"{service.url}/queues/email_queue/messages",
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_message"
    with db.connect() as conn:
        assert conn.execute("select count(*) from pgmq.q_email_queue").fetchone() == (len(ids),)


# -- jobs beyond what the worker can read back ------------------------------------------

CHECKUP = {
    "patient_name": "Anna",
    "checkup_date": "27.11.2026",
    "doctor_name": "Dr. Smith",
    "results_url": "https://example.com/r/1",
}


def _job_with(extra: str) -> bytes:
    """A valid template job with `extra` (JSON text, never parsed here) in its context."""
    context = json.dumps(CHECKUP)[:-1]
    return (
        '{"to": "a@example.com", "template": "checkup_completed", "context": '
        f'{context}, "extra": {extra}}}}}'
    ).encode()


def _nested(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # The job is level 1 and its context level 2: a list at level 33 is one too deep.
        (_nested(31), "message: nests deeper than 32 levels"),
        (_nested(300), "message: nests deeper than 32 levels"),
        (_nested(1000), "message: nests deeper than 32 levels"),
        (_nested(5000), "message: nests deeper than 32 levels"),
        ('{"a": ' * 5000 + "1" + "}" * 5000, "message: nests deeper than 32 levels"),
        ("1e400", "message: the number 1e400 is out of range (not a finite double)"),
        ("1E+30000000", "message: the number 1E+30000000 is out of range"),
        ("-1e400", "message: the number -1e400 is out of range"),
        ("NaN", "message: NaN is not a number JSON or PostgreSQL can store"),
        ("[Infinity]", "message: Infinity is not a number JSON or PostgreSQL can store"),
        ("1" * 101, "message: a number of 101 characters; at most 100"),
        ("7" * 4301 + ".5", "message: a number of 4303 characters; at most 100"),
        ("1" * 5000, "message: a number of 5000 characters; at most 100"),
    ],
    ids=[
        "depth-33",
        "depth-300",
        "depth-1000",
        "depth-5000",
        "objects-5000",
        "1e400",
        "1E+30000000",
        "-1e400",
        "NaN",
        "Infinity",
        "101-digits",
        "4303-char-decimal",
        "5000-digits",
    ],
)
def test_enqueue_refuses_jobs_beyond_the_documented_bounds(
    db: Database, target: tuple[Service, str, list[int]], extra: str, expected: str
) -> None:
    service, token, ids = target
    response = httpx.post(
        f"{service.url}/queues/email_queue/messages",
        content=_job_with(extra),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_message"
    assert response.json()["message"].startswith(expected), response.text
    with db.connect() as conn:
        assert conn.execute("select count(*) from pgmq.q_email_queue").fetchone() == (len(ids),)


@pytest.mark.parametrize(
    ("extra", "stored"),
    [
        (_nested(30), _nested(30)),
        ("123456789012345678901234567890", "123456789012345678901234567890"),
        ("-0", "0"),
        ("-0.0", "0.0"),  # numeric has no negative zero
        ("1e-400", "0.0"),
        ("1" * 100, "1" * 100),
    ],
    ids=["depth-32", "30-digits", "-0", "-0.0", "1e-400", "100-digits"],
)
def test_enqueue_takes_jobs_within_the_bounds(
    db: Database, target: tuple[Service, str, list[int]], extra: str, stored: str
) -> None:
    service, token, _ = target
    response = httpx.post(
        f"{service.url}/queues/email_queue/messages",
        content=_job_with(extra),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert response.status_code == 201, response.text
    with db.connect() as conn:
        row = conn.execute(
            "select message -> 'context' ->> 'extra' from pgmq.q_email_queue where msg_id = %s",
            [response.json()["msg_id"]],
        ).fetchone()
    assert row is not None and row[0].replace(" ", "") == stored


def test_a_body_that_is_not_a_json_object_is_an_invalid_request(
    target: tuple[Service, str, list[int]],
) -> None:
    service, token, _ = target
    for body, expected in [
        (b"[1]", "body: Input should be a valid dictionary"),
        (b"{", "body: Invalid JSON: Expecting property name"),
        (b"\xff{}", "body: not UTF-8"),
    ]:
        response = httpx.post(
            f"{service.url}/queues/email_queue/messages",
            content=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "invalid_request"
        assert response.json()["message"].startswith(expected), response.text
