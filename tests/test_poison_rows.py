"""One row the worker cannot read never holds up the others.

PostgreSQL's jsonb keeps JSON that the worker's parser refuses (nesting deeper than
200 levels, numbers of more than 4,300 digits). Such a row, claimed together with
good ones, used to fail the whole claim or read reply after the database had
claimed every row of it: the batch waited out its visibility timeout, came back
with the same row, and failed again. Here each such row is enqueued straight into
pgmq (as any app can), next to good ones, and read through both backends (the RPC
client over the gateway, the SQL backend over a connection) and through a running
service on the webhook path (claims) and the sweeper path (reads): the good rows
run, the bad one is archived at once with a reason that names the problem.
"""

from __future__ import annotations

import asyncio
import secrets

import httpx
import pytest

from app.queue.coalesce import CoalescingQueue
from tests.conftest import ServiceFactory
from tests.support.pg_net import PgNetSender
from tests.support.postgres import OWNER_ROLE, Database
from tests.support.settings import FAST_RETRIES
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_backends import Backend, backend  # noqa: F401 - the fixture
from tests.test_e2e import archived_rows, queue_rows

QUEUE = "email_queue"
DEPTH = "the JSON nests deeper than 200 levels"
DIGITS = "a number has more than 4300 digits"


def job(context: str, subject: str = "poison") -> str:
    """An email job as JSON text, `context` spliced in as written (never parsed here)."""
    return (
        f'{{"to": "someone@example.com", "subject": "{subject}", "text": "x",'
        f' "context": {context}}}'
    )


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


# JSON that jsonb stores and the worker cannot parse, and the reason it must give.
POISON = {
    "list-300-deep": (job(f'{{"items": {nested(300)}}}'), DEPTH),
    "list-1000-deep": (job(nested(1000)), DEPTH),
    "objects-5000-deep": (job('{"a": ' * 5000 + "1" + "}" * 5000), DEPTH),
    "1e131071": (job('{"amount": 1e131071}'), DIGITS),
    "4301-digit-decimal": (job('{"amount": ' + "7" * 4301 + ".5}"), DIGITS),
}
# Odd numbers that jsonb stores and the worker reads: (jsonb text, value read).
READABLE = {
    "1e400": ("1e400", 10**400),
    "-0": ("-0", 0),
    "30-digit-integer": ("123456789012345678901234567890", 123456789012345678901234567890),
    "-1e-400": ("-1e-400", 0.0),
    "1e-16383": ("1e-16383", 0.0),
}


def send_raw(db: Database, texts: list[str]) -> list[int]:
    """Enqueues JSON texts as jsonb, in order, as an app would (no Python parsing)."""
    with db.connect(role=OWNER_ROLE) as conn:
        return [
            int(conn.execute("select pgmq.send('email_queue', %s::jsonb)", [text]).fetchall()[0][0])
            for text in texts
        ]


def good_and_bad(db: Database, poison: str, good: int = 9) -> tuple[list[int], int]:
    """`good` valid mails with the poison in their midst; returns (good ids, poison id)."""
    half = good // 2
    texts = [job("{}", f"good {i}") for i in range(good)]
    ids = send_raw(db, [*texts[:half], poison, *texts[half:]])
    return [*ids[:half], *ids[half + 1 :]], ids[half]


def visible_ids(db: Database) -> list[int]:
    with db.connect() as conn:
        rows = conn.execute(f"select msg_id from pgmq.q_{QUEUE} where vt <= now()").fetchall()
    return sorted(int(row[0]) for row in rows)


# -- the backends: one call, every row accounted for ----------------------------------

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("how", ["read", "claim"])
@pytest.mark.parametrize("kind", list(POISON))
async def test_a_row_that_cannot_be_parsed_comes_back_marked_and_the_rest_intact(
    backend: Backend,  # noqa: F811 - the fixture
    db: Database,
    kind: str,
    how: str,
) -> None:
    poison, reason = POISON[kind]
    good, bad = good_and_bad(db, poison)
    if how == "read":
        messages = await backend.queue.read(QUEUE, 30, 20)
    else:
        messages = await backend.queue.claim(QUEUE, [*good, bad], 30)

    by_id = {m.msg_id: m for m in messages}
    assert sorted(by_id) == sorted([*good, bad])
    assert by_id[bad].unreadable == f"message: {reason}"
    assert (by_id[bad].message, by_id[bad].read_ct) == (None, 1)
    for msg_id in good:
        assert by_id[msg_id].unreadable is None
        assert by_id[msg_id].message["subject"].startswith("good ")


@pytest.mark.parametrize("kind", list(READABLE))
async def test_odd_numbers_jsonb_keeps_are_read_as_numbers(
    backend: Backend,  # noqa: F811 - the fixture
    db: Database,
    kind: str,
) -> None:
    text, value = READABLE[kind]
    [msg_id] = send_raw(db, [job(f'{{"amount": {text}}}', kind)])
    [message] = await backend.queue.read(QUEUE, 30, 10)
    assert (message.msg_id, message.unreadable) == (msg_id, None)
    assert message.message["context"]["amount"] == value


async def test_an_unreadable_dead_letter_is_listed_with_its_reason(
    backend: Backend,  # noqa: F811 - the fixture
    db: Database,
) -> None:
    [msg_id] = send_raw(db, [job(nested(5000))])
    [claimed] = await backend.queue.read(QUEUE, 30, 10)
    error = {"type": "UnreadableMessage", "message": claimed.unreadable, "attempt": 1}
    assert await backend.queue.archive(QUEUE, [msg_id], {msg_id: error}) == [msg_id]

    [dead] = await backend.queue.archived(QUEUE, 10)
    assert (dead.msg_id, dead.message, dead.error) == (msg_id, None, error)
    assert dead.unreadable == f"message: {DEPTH}"


async def test_a_coalesced_claim_gives_each_caller_its_rows_when_one_is_unreadable(
    backend: Backend,  # noqa: F811 - the fixture
    db: Database,
) -> None:
    good, bad = good_and_bad(db, POISON["list-300-deep"][0])
    queue = CoalescingQueue(backend.queue, max_batch=10, flush_interval=3600)
    try:
        # Ten callers, one id each: the tenth fills the batch, one claim for all.
        results = await asyncio.gather(*(queue.claim(QUEUE, [i], 30) for i in [*good, bad]))
    finally:
        await queue.close()
    assert [[m.msg_id for m in result] for result in results] == [[i] for i in [*good, bad]]
    assert results[-1][0].unreadable == f"message: {DEPTH}"
    assert visible_ids(db) == []


# -- a running service: the good rows run, the bad one is archived at once --------------


def _served(db: Database, smtp: SmtpServer, poison: str, reason: str) -> None:
    good, bad = good_and_bad(db, poison)
    wait_until(lambda: len(smtp.messages) == len(good), timeout=20, what="the nine good mails")
    rows = wait_until(lambda: archived_rows(db), timeout=20, what="the poison in the archive")
    [(archived_id, read_ct, error)] = rows
    assert (archived_id, read_ct) == (bad, 1), "archived when first claimed"
    assert error["type"] == "UnreadableMessage"
    assert error["message"] == f"message: {reason}"
    wait_until(lambda: queue_rows(db) == [], what="every good message to be acked")
    assert sorted(str(m["Subject"]) for m in smtp.messages) == [f"good {i}" for i in range(9)]


@pytest.mark.parametrize(
    ("backend_kind", "kind"),
    [("rpc", "list-300-deep"), ("sql", "1e131071")],
)
def test_webhooked_batch_with_a_poison_row_delivers_the_rest(
    db: Database,
    start_service: ServiceFactory,
    sender: PgNetSender,
    smtp: SmtpServer,
    backend_kind: str,
    kind: str,
) -> None:
    options = {"database_url": db.url_as(OWNER_ROLE)} if backend_kind == "sql" else {}
    # Batches of claims wait up to 200 ms: the ten webhooks of one burst share one.
    start_service(coalesce_flush_ms=200, **options)
    poison, reason = POISON[kind]
    _served(db, smtp, poison, reason)


@pytest.mark.parametrize(
    ("backend_kind", "kind"),
    [("rpc", "objects-5000-deep"), ("sql", "list-1000-deep")],
)
def test_swept_batch_with_a_poison_row_delivers_the_rest(
    db: Database,
    start_service: ServiceFactory,
    smtp: SmtpServer,
    backend_kind: str,
    kind: str,
) -> None:
    options = {"database_url": db.url_as(OWNER_ROLE)} if backend_kind == "sql" else {}
    # No webhooks: the sweeper reads the ten rows in one batch.
    start_service(register=False, **{**FAST_RETRIES, **options})
    poison, reason = POISON[kind]
    _served(db, smtp, poison, reason)


def test_the_archive_api_lists_an_unreadable_dead_letter(
    db: Database, start_service: ServiceFactory, smtp: SmtpServer
) -> None:
    token = secrets.token_urlsafe(24)
    service = start_service(register=False, api_token=token, **FAST_RETRIES)
    [msg_id] = send_raw(db, [job(nested(5000))])
    wait_until(lambda: archived_rows(db), timeout=20, what="the poison in the archive")
    response = httpx.get(
        f"{service.url}/queues/{QUEUE}/archive", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
    [dead] = response.json()["messages"]
    assert (dead["msg_id"], dead["message"]) == (msg_id, None)
    assert dead["unreadable"] == f"message: {DEPTH}"
    assert dead["error"]["type"] == "UnreadableMessage"
