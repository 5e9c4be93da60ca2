"""Payment events end to end: applied once, never backwards, one receipt per payment.

An app (or a provider webhook handler) enqueues the event with `pgmq.send`; the
trigger rings the service through pg_net; the service claims it through the RPC
gateway and calls `queue_worker.apply_payment_event`, which records the event,
moves the payment and enqueues the `payment_receipt` email job in one transaction.
The service here serves payments_queue only, so the receipt job stays in
`pgmq.q_email_queue` where the tests read it.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import ValidationError

from app.config import Settings
from app.errors import PermanentError, RetryableError, describe_invalid
from app.processors.payments import (
    CURRENCY_MINOR_UNITS,
    MIGRATION,
    PaymentEvent,
    job_error,
)
from app.queue.rpc import RpcError, SupabaseRpc
from tests.conftest import Service, ServiceFactory
from tests.support.pg_net import PgNetSender
from tests.support.postgres import Database
from tests.support.rpc_gateway import GatewayHandle
from tests.support.scrape import sample
from tests.support.settings import FAST_RETRIES
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_e2e import archived_rows, queue_rows

QUEUE = "payments_queue"
METRIC = "queue_worker_payment_events_total"


def event(**overrides: Any) -> dict[str, Any]:
    base = {
        "provider": "stripe",
        "event_id": "evt_1",
        "payment_id": "pi_1",
        "status": "succeeded",
        "amount": "12.50",
        "currency": "EUR",
        "customer_email": "anna@example.com",
    }
    return {**base, **overrides}


def send(db: Database, message: dict[str, Any], *, role: str = "qw_postgres") -> int:
    with db.connect(role=role) as conn:
        row = conn.execute(
            "select * from pgmq.send('payments_queue', %s)", [Jsonb(message)]
        ).fetchone()
    assert row is not None
    return int(row[0])


def processed(db: Database) -> None:
    """Waits until payments_queue is empty: every event applied (or archived)."""
    wait_until(lambda: queue_rows(db, QUEUE) == [], what="payments_queue to be empty")


def apply(db: Database, *events: dict[str, Any], role: str = "qw_postgres") -> None:
    """Enqueues events one after the other, each processed before the next is sent."""
    for item in events:
        send(db, item, role=role)
        processed(db)


def payments(db: Database) -> list[dict[str, Any]]:
    with db.connect(row_factory=dict_row) as conn:
        return conn.execute(
            "select provider, payment_id, status, amount, currency, customer_email, metadata, "
            "receipt_msg_id, paid_at from queue_worker.payments order by provider, payment_id"
        ).fetchall()


def events(db: Database) -> dict[str, tuple[str, int]]:
    """event_id -> (result, duplicates)."""
    with db.connect() as conn:
        rows = conn.execute(
            "select event_id, result, duplicates from queue_worker.payment_events"
        ).fetchall()
    return {event_id: (result, duplicates) for event_id, result, duplicates in rows}


def receipts(db: Database) -> list[tuple[int, dict[str, Any]]]:
    with db.connect() as conn:
        rows = conn.execute("select msg_id, message from pgmq.q_email_queue order by 1").fetchall()
    return [(int(msg_id), message) for msg_id, message in rows]


def counted(service: Service) -> dict[str, float]:
    return {r: sample(service.url, METRIC, result=r) for r in ("applied", "duplicate", "stale")}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after}


@pytest.fixture
def payments_service(start_service: ServiceFactory) -> Service:
    """The service serving payments_queue only: receipt jobs stay in email_queue."""
    return start_service(queues=[QUEUE])


@pytest.fixture
def authenticated_may_enqueue(db: Database) -> Iterator[None]:
    """What an app grants so signed-in users may enqueue (as pgmq_public would)."""
    with db.connect(role="qw_postgres") as conn:
        conn.execute("grant usage on schema pgmq to authenticated")
        conn.execute("grant select, insert on pgmq.q_payments_queue to authenticated")
    try:
        yield
    finally:
        with db.connect(role="qw_postgres") as conn:
            conn.execute("revoke select, insert on pgmq.q_payments_queue from authenticated")
            conn.execute("revoke usage on schema pgmq from authenticated")


# -- end to end ------------------------------------------------------------------


def test_succeeded_payment_is_recorded_with_one_receipt(
    db: Database,
    payments_service: Service,
    sender: PgNetSender,
    authenticated_may_enqueue: None,
) -> None:
    before = counted(payments_service)
    apply(db, event(metadata={"locale": "en", "order": "A-17"}), role="authenticated")

    [payment] = payments(db)
    assert payment["status"] == "succeeded"
    assert payment["amount"] == Decimal("12.50")
    assert (payment["currency"], payment["customer_email"]) == ("EUR", "anna@example.com")
    assert payment["metadata"] == {"locale": "en", "order": "A-17"}
    [(receipt_id, receipt)] = receipts(db)
    assert payment["receipt_msg_id"] == receipt_id
    assert receipt == {
        "to": "anna@example.com",
        "template": "payment_receipt",
        "locale": "en",
        "context": {
            "payment_id": "pi_1",
            "amount": "12.50",
            "currency": "EUR",
            "provider": "stripe",
            "paid_at": receipt["context"]["paid_at"],
        },
    }
    assert datetime.fromisoformat(receipt["context"]["paid_at"]) == payment["paid_at"]
    assert events(db) == {"evt_1": ("applied", 0)}
    assert archived_rows(db, QUEUE) == []
    assert delta(counted(payments_service), before) == {"applied": 1, "duplicate": 0, "stale": 0}


def test_the_same_event_twice_is_a_counted_duplicate_with_one_receipt(
    db: Database, payments_service: Service, sender: PgNetSender
) -> None:
    before = counted(payments_service)
    apply(db, event(), event())

    assert events(db) == {"evt_1": ("applied", 1)}
    assert len(receipts(db)) == 1
    assert [p["status"] for p in payments(db)] == ["succeeded"]
    assert archived_rows(db, QUEUE) == []
    assert delta(counted(payments_service), before) == {"applied": 1, "duplicate": 1, "stale": 0}


def test_event_sent_again_through_the_manual_api_changes_nothing(
    db: Database, start_service: ServiceFactory, sender: PgNetSender
) -> None:
    token = secrets.token_urlsafe(24)
    service = start_service(queues=[QUEUE], api_token=token)
    apply(db, event())
    [first] = payments(db)

    response = httpx.post(
        f"{service.url}/queues/{QUEUE}/messages",
        json=event(amount="99.00", customer_email="other@example.com"),
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 201
    processed(db)

    assert payments(db) == [first]  # the replayed copy's different body is ignored
    assert events(db) == {"evt_1": ("applied", 1)}
    assert len(receipts(db)) == 1


def test_manual_api_refuses_an_invalid_event_naming_the_field(
    db: Database, start_service: ServiceFactory
) -> None:
    token = secrets.token_urlsafe(24)
    service = start_service(register=False, queues=[QUEUE], api_token=token)
    response = httpx.post(
        f"{service.url}/queues/{QUEUE}/messages",
        json=event(amount=12.5),
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 422
    assert "amount: Value error, must be a decimal string" in response.json()["message"]
    assert queue_rows(db, QUEUE) == []


def test_pending_after_succeeded_is_stale_and_changes_nothing(
    db: Database, payments_service: Service, sender: PgNetSender
) -> None:
    before = counted(payments_service)
    apply(db, event(event_id="evt_paid"), event(event_id="evt_late", status="pending"))

    assert [p["status"] for p in payments(db)] == ["succeeded"]
    assert events(db) == {"evt_paid": ("applied", 0), "evt_late": ("stale", 0)}
    assert len(receipts(db)) == 1
    assert archived_rows(db, QUEUE) == []
    assert delta(counted(payments_service), before) == {"applied": 1, "duplicate": 0, "stale": 1}


def test_payment_moves_pending_succeeded_refunded_with_one_receipt(
    db: Database, payments_service: Service, sender: PgNetSender
) -> None:
    apply(db, event(event_id="evt_a", status="pending"))
    assert [p["status"] for p in payments(db)] == ["pending"]
    assert receipts(db) == []  # nothing paid yet

    apply(db, event(event_id="evt_b", status="succeeded"))
    [paid] = payments(db)
    [(receipt_id, _)] = receipts(db)
    assert (paid["status"], paid["receipt_msg_id"]) == ("succeeded", receipt_id)

    apply(db, event(event_id="evt_c", status="refunded"))
    [refunded] = payments(db)
    assert refunded["status"] == "refunded"
    assert (refunded["receipt_msg_id"], refunded["paid_at"]) == (receipt_id, paid["paid_at"])
    assert [msg_id for msg_id, _ in receipts(db)] == [receipt_id]
    assert events(db) == {
        "evt_a": ("applied", 0),
        "evt_b": ("applied", 0),
        "evt_c": ("applied", 0),
    }


def test_a_partial_refund_applies_in_the_payments_currency_and_to_its_address(
    db: Database, payments_service: Service, sender: PgNetSender
) -> None:
    apply(
        db, event(event_id="evt_paid"), event(event_id="evt_refund", status="refunded", amount="5")
    )
    [refunded] = payments(db)
    assert (refunded["status"], refunded["amount"]) == ("refunded", Decimal("5"))
    assert (refunded["currency"], refunded["customer_email"]) == ("EUR", "anna@example.com")
    assert archived_rows(db, QUEUE) == []


REFUSED_REFUNDS = {
    "currency": (
        {"currency": "USD"},
        "refunded event refused: it changes the payment's currency from EUR to USD",
    ),
    "address": (
        {"customer_email": "mallory@example.com"},
        "refunded event refused: it changes the payment's customer_email",
    ),
    "address-case": (
        {"customer_email": "Anna@example.com"},
        "refunded event refused: it changes the payment's customer_email",
    ),
    "amount": (
        {"amount": "12.51"},
        "refunded event refused: its amount 12.51 is more than the 12.5 EUR captured",
    ),
}


def refused_refunds(db: Database) -> dict[str, tuple[str, str]]:
    """event_id -> (error type, message) of every archived payment event."""
    with db.connect() as conn:
        rows = conn.execute(
            "select message ->> 'event_id', headers -> 'queue_worker_error'"
            " from pgmq.a_payments_queue"
        ).fetchall()
    return {event_id: (error["type"], error["message"]) for event_id, error in rows}


@pytest.mark.parametrize("case", sorted(REFUSED_REFUNDS))
def test_a_refund_that_changes_currency_or_address_or_gives_back_more_is_refused(
    db: Database, payments_service: Service, sender: PgNetSender, case: str
) -> None:
    changes, reason = REFUSED_REFUNDS[case]
    apply(db, event(event_id="evt_paid"))
    [paid] = payments(db)
    apply(db, event(event_id="evt_refund", status="refunded", **changes))

    assert payments(db) == [paid]  # the row is unchanged
    assert events(db) == {"evt_paid": ("applied", 0)}  # the refused event is not on record
    [(error_type, message)] = refused_refunds(db).values()
    assert error_type == "PermanentError"
    assert reason in message
    assert "mallory" not in message and "anna" not in message.lower()  # no address in logs
    assert len(receipts(db)) == 1


def test_a_refund_after_a_refund_is_checked_against_what_was_captured(
    db: Database, payments_service: Service, sender: PgNetSender
) -> None:
    # payments.amount holds the first refund's 5 by now; the captured 12.50 still rules.
    apply(
        db,
        event(event_id="evt_paid"),
        event(event_id="evt_r1", status="refunded", amount="5.00"),
        event(event_id="evt_r2", status="refunded", amount="12.50"),
        event(event_id="evt_r3", status="refunded", amount="12.51"),
    )
    assert events(db) == {
        "evt_paid": ("applied", 0),
        "evt_r1": ("applied", 0),
        "evt_r2": ("stale", 0),
    }
    assert refused_refunds(db)["evt_r3"][1].endswith(
        "its amount 12.51 is more than the 12.5 EUR captured"
    )
    [refunded] = payments(db)
    assert (refunded["status"], refunded["amount"]) == ("refunded", Decimal("5.00"))


def test_racing_refunds_apply_only_the_one_that_gives_back_what_was_paid(
    db: Database, payments_service: Service, sender: PgNetSender
) -> None:
    refunds = {case: changes for case, (changes, _) in REFUSED_REFUNDS.items()}
    refunds |= {"big": {"amount": "1000.00"}, "good": {"amount": "12.50"}}
    for payment in ("pi_a", "pi_b", "pi_c"):  # three rounds, each in another order
        apply(db, event(event_id=f"{payment}_paid", payment_id=payment))
        racing = [
            event(event_id=f"{payment}_{name}", payment_id=payment, status="refunded", **changes)
            for name, changes in refunds.items()
        ]
        random.shuffle(racing)
        # One transaction: the webhooks arrive together and the jobs run concurrently.
        with db.connect(role="qw_postgres") as conn:
            conn.execute(
                "select pgmq.send_batch('payments_queue', %s::jsonb[])",
                [[Jsonb(item) for item in racing]],
            )
        processed(db)

        [refunded] = [p for p in payments(db) if p["payment_id"] == payment]
        assert (refunded["status"], refunded["amount"]) == ("refunded", Decimal("12.50"))
        assert (refunded["currency"], refunded["customer_email"]) == ("EUR", "anna@example.com")
        recorded = {e: result for e, (result, _) in events(db).items() if e.startswith(payment)}
        assert recorded == {f"{payment}_paid": "applied", f"{payment}_good": "applied"}
    refused = refused_refunds(db)
    assert set(refused) == {
        f"{payment}_{name}" for payment in ("pi_a", "pi_b", "pi_c") for name in refunds
    } - {"pi_a_good", "pi_b_good", "pi_c_good"}
    assert {error_type for error_type, _ in refused.values()} == {"PermanentError"}
    assert len(receipts(db)) == 3


def test_canceled_payment_cannot_succeed_later(
    db: Database, payments_service: Service, sender: PgNetSender
) -> None:
    apply(
        db,
        event(event_id="evt_a", status="pending"),
        event(event_id="evt_b", status="canceled"),
        event(event_id="evt_c", status="succeeded"),
    )
    assert [p["status"] for p in payments(db)] == ["canceled"]
    assert events(db)["evt_c"] == ("stale", 0)
    assert receipts(db) == []


def test_two_succeeded_events_of_one_payment_at_once_send_one_receipt(
    db: Database, payments_service: Service, sender: PgNetSender
) -> None:
    # Enqueued together: both webhooks arrive at once and the jobs run concurrently.
    with db.connect(role="qw_postgres") as conn:
        conn.execute(
            "select pgmq.send_batch('payments_queue', %s::jsonb[])",
            [[Jsonb(event(event_id=f"evt_{n}")) for n in range(4)]],
        )
    processed(db)

    results = sorted(result for result, _ in events(db).values())
    assert results == ["applied", "stale", "stale", "stale"]
    [payment] = payments(db)
    [(receipt_id, _)] = receipts(db)
    assert payment["receipt_msg_id"] == receipt_id


@pytest.mark.parametrize(
    ("metadata", "locale"),
    [
        ({"locale": "ru", "customer_name": "Анна Петрова", "comment": "Заказ №17 — оплачен"}, "ru"),
        ({"locale": "de", "customer_name": "Jürgen"}, None),
        ({}, None),
    ],
    ids=["ru", "unsupported-locale", "no-metadata"],
)
def test_receipt_locale_and_unicode_metadata(
    db: Database,
    payments_service: Service,
    sender: PgNetSender,
    metadata: dict[str, Any],
    locale: str | None,
) -> None:
    apply(db, event(metadata=metadata, amount="1500", currency="JPY"))
    [payment] = payments(db)
    assert payment["metadata"] == metadata
    [(_, receipt)] = receipts(db)
    assert receipt.get("locale") == locale
    assert ("locale" in receipt) == (locale is not None)
    assert receipt["context"]["amount"] == "1500"
    # The receipt greets the customer by the name the event gave, when it gave one.
    assert receipt["context"].get("customer_name") == metadata.get("customer_name")


def test_malformed_events_are_archived_naming_the_field(
    db: Database, payments_service: Service, sender: PgNetSender
) -> None:
    missing = event()
    del missing["customer_email"]
    bad = {
        "float": event(event_id="e1", amount=12.5),
        "currency": event(event_id="e2", currency="XXY"),
        "jpy": event(event_id="e3", amount="12.5", currency="JPY"),
        "bhd": event(event_id="e4", amount="1.2345", currency="BHD"),
        "exponent": event(event_id="e5", amount="1e3"),
        "negative": event(event_id="e6", amount="-1.00"),
        "unknown": event(event_id="e7", coupon="FREE"),
        "missing": missing,
        "status": event(event_id="e8", status="paid"),
        "lowercase": event(event_id="e9", currency="eur"),
    }
    ids = {name: send(db, message) for name, message in bad.items()}
    rows = wait_until(
        lambda: len(archived_rows(db, QUEUE)) == len(bad) and archived_rows(db, QUEUE),
        what="every bad event archived",
    )
    errors = {msg_id: error for msg_id, _, error in rows}
    expected = {
        "float": 'amount: Value error, must be a decimal string such as "12.50", not a JSON number',
        "currency": "currency: Value error, is not an active ISO 4217 currency code",
        "jpy": "amount: Value error, has more than 0 decimal places, the minor unit of JPY",
        "bhd": "amount: Value error, has more than 3 decimal places, the minor unit of BHD",
        "exponent": "amount: Value error, must be a non-negative decimal string",
        "negative": "amount: Value error, must be a non-negative decimal string",
        "unknown": "coupon: Extra inputs are not permitted",
        "missing": "customer_email: Field required",
        "status": "status: Input should be 'pending', 'succeeded', 'canceled' or 'refunded'",
        "lowercase": "currency: Value error, must be 3 uppercase letters (ISO 4217)",
    }
    for name, msg_id in ids.items():
        assert errors[msg_id]["type"] == "PermanentError", name
        assert expected[name] in errors[msg_id]["message"], name
        assert errors[msg_id]["attempt"] == 1, name
    assert queue_rows(db, QUEUE) == []
    assert payments(db) == [] and events(db) == {} and receipts(db) == []


def test_rpc_failure_is_retried_then_applied_once(
    db: Database, start_service: ServiceFactory, gateway: GatewayHandle, sender: PgNetSender
) -> None:
    start_service(queues=[QUEUE], **FAST_RETRIES)
    gateway.fail_functions("apply_payment_event")
    try:
        msg_id = send(db, event())
        wait_until(
            lambda: any(r[0] == msg_id and r[1] >= 2 for r in queue_rows(db, QUEUE)),
            timeout=20,
            what="the event to be tried twice",
        )
        assert payments(db) == [] and receipts(db) == []
        assert archived_rows(db, QUEUE) == []
    finally:
        gateway.fail_functions()
    processed(db)
    assert [p["status"] for p in payments(db)] == ["succeeded"]
    assert events(db) == {"evt_1": ("applied", 0)}
    assert len(receipts(db)) == 1
    assert archived_rows(db, QUEUE) == []


def test_missing_function_is_retried_with_a_message_naming_the_migration(
    db: Database, start_service: ServiceFactory, sender: PgNetSender
) -> None:
    start_service(queues=[QUEUE], **{**FAST_RETRIES, "max_attempts": 1})
    with db.connect(role="qw_postgres") as conn:
        conn.execute(
            "alter function queue_worker.apply_payment_event(jsonb) rename to apply_payment_gone"
        )
    try:
        send(db, event())
        [(_, read_ct, error)] = wait_until(lambda: archived_rows(db, QUEUE), what="archive")
    finally:
        with db.connect(role="qw_postgres") as conn:
            conn.execute(
                "alter function queue_worker.apply_payment_gone(jsonb) "
                "rename to apply_payment_event"
            )
    # Retryable (a deploy fixes it); archived here only because MAX_ATTEMPTS is 1.
    assert (read_ct, error["type"]) == (1, "RetryableError")
    assert f"apply {MIGRATION}" in error["message"]
    assert payments(db) == []


# -- the database function on its own ---------------------------------------------


def apply_sql(conn: psycopg.Connection[Any], item: dict[str, Any]) -> dict[str, Any]:
    row = conn.execute("select queue_worker.apply_payment_event(%s)", [Jsonb(item)]).fetchone()
    assert row is not None
    result: dict[str, Any] = row[0]
    return result


@pytest.mark.parametrize(
    ("second", "expected"),
    [(event(), "duplicate"), (event(event_id="evt_2"), "stale")],
    ids=["same-event", "other-event-same-payment"],
)
def test_racing_calls_wait_for_each_other_and_send_one_receipt(
    db: Database, second: dict[str, Any], expected: str
) -> None:
    answers: list[dict[str, Any]] = []
    with db.connect(role="service_role") as first, db.connect(role="service_role") as other:
        with first.transaction():
            assert apply_sql(first, event())["receipt_enqueued"] is True
            racer = threading.Thread(target=lambda: answers.append(apply_sql(other, second)))
            racer.start()
            pid = other.info.backend_pid

            def waiting() -> bool:
                with db.connect() as conn:
                    row = conn.execute(
                        "select wait_event_type from pg_stat_activity where pid = %s", [pid]
                    ).fetchone()
                return row is not None and row[0] == "Lock"

            wait_until(waiting, what="the second call to wait for the first's locks")
        racer.join(timeout=10)
    [answer] = answers
    assert answer["result"] == expected
    assert answer["receipt_enqueued"] is False
    assert len(receipts(db)) == 1
    [payment] = payments(db)
    assert answer["receipt_msg_id"] == payment["receipt_msg_id"]


def test_api_roles_cannot_call_the_function_or_read_the_tables(db: Database) -> None:
    for role in ("anon", "authenticated"):
        with db.connect(role=role) as conn:
            for statement in (
                "select queue_worker.apply_payment_event('{}')",
                "select * from queue_worker.payments",
                "select * from queue_worker.payment_events",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
    with db.connect() as conn:
        rows = conn.execute(
            "select c.relname, c.relrowsecurity, obj_description(c.oid, 'pg_class') is not null "
            "from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = 'queue_worker' and c.relkind = 'r' order by 1"
        ).fetchall()
    # Every table of the worker's schema: row level security on, and a comment.
    assert {"payment_events", "payments"} <= {name for name, _, _ in rows}
    assert [name for name, rls, commented in rows if not (rls and commented)] == []


def test_service_role_bypasses_rls_and_reads_what_it_applied(db: Database) -> None:
    with db.connect(role="service_role") as conn:
        assert apply_sql(conn, event(status="pending"))["result"] == "applied"
        count = conn.execute("select count(*) from queue_worker.payments").fetchone()
    assert count == (1,)


def rpc_error_for(settings: Settings, item: dict[str, Any]) -> RpcError:
    """Calls apply_payment_event through the gateway as the service would; its error."""

    async def call() -> RpcError:
        client = SupabaseRpc.create_client(
            str(settings.supabase_url), settings.supabase_headers, timeout=10
        )
        async with client:
            try:
                await SupabaseRpc(client, schema="queue_worker").call(
                    "apply_payment_event", {"event": item}
                )
            except RpcError as error:
                return error
        raise AssertionError("the call succeeded")

    return asyncio.run(call())


@pytest.mark.parametrize(
    ("item", "code"),
    [
        (event(amount="1e3"), "22023"),
        (event(amount=12.5), "22023"),
        (event(provider="p" * 65), "23514"),
    ],
    ids=["exponent", "number", "too-long-provider"],
)
def test_database_refusal_of_bad_data_is_permanent(
    db: Database, service_settings: Settings, item: dict[str, Any], code: str
) -> None:
    # What the model already refuses, the function refuses too (class 22 or 23,
    # HTTP 400): the processor makes it permanent.
    error = rpc_error_for(service_settings, item)
    assert (error.status, error.code) == (400, code)
    assert isinstance(job_error(error), PermanentError)
    assert payments(db) == [] and events(db) == {}


# -- the model and the error mapping, without the service --------------------------


@pytest.mark.parametrize(
    ("amount", "currency"),
    [("0", "USD"), ("12.5", "USD"), ("12.50", "USD"), ("1500", "JPY"), ("1.234", "BHD"),
     ("99999999999999.99", "EUR"), ("1.2345", "CLF")],
)  # fmt: skip
def test_amounts_within_the_minor_unit_are_accepted_exactly(amount: str, currency: str) -> None:
    parsed = PaymentEvent.model_validate(event(amount=amount, currency=currency))
    assert parsed.amount == Decimal(amount)
    assert parsed.rpc_event()["amount"] == amount  # the text as given, never a float


@pytest.mark.parametrize(
    "amount",
    [12.5, 12, "12,50", "1e3", "1E-2", "NaN", "Infinity", "-0", "+1", " 1", "1.", ".5", "007",
     "１２", "123456789012345", True, None],
)  # fmt: skip
def test_amounts_that_are_not_plain_decimal_strings_are_refused(amount: object) -> None:
    with pytest.raises(ValidationError) as raised:
        PaymentEvent.model_validate(event(amount=amount))
    assert describe_invalid(raised.value).startswith("amount: ")


@pytest.mark.parametrize("currency", ["XXY", "XAU", "XXX", "BGN", "usd", "US", "USDT", "ЕUR"])
def test_currencies_outside_the_active_iso_list_are_refused(currency: str) -> None:
    with pytest.raises(ValidationError) as raised:
        PaymentEvent.model_validate(event(currency=currency))
    assert describe_invalid(raised.value).startswith("currency: ")


def test_currency_list_has_the_known_minor_units() -> None:
    assert {c: CURRENCY_MINOR_UNITS[c] for c in ("JPY", "USD", "EUR", "BHD", "KWD", "CLF")} == {
        "JPY": 0,
        "USD": 2,
        "EUR": 2,
        "BHD": 3,
        "KWD": 3,
        "CLF": 4,
    }
    assert all(len(c) == 3 and c.isupper() for c in CURRENCY_MINOR_UNITS)
    assert len(CURRENCY_MINOR_UNITS) > 150


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event_id", "x" * 256),
        ("payment_id", ""),
        ("payment_id", "pi_1\nBcc: x"),
        ("provider", "stripe webhook"),
        ("customer_email", "not-an-address"),
        ("customer_email", "a@example.com\r\nBcc: b@example.com"),
        ("metadata", {"blob": "я" * 9000}),
        ("metadata", ["not", "an", "object"]),
    ],
)
def test_unbounded_or_malformed_strings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as raised:
        PaymentEvent.model_validate(event(**{field: value}))
    assert describe_invalid(raised.value).startswith(f"{field}")


@pytest.mark.parametrize(
    ("status", "code", "kind", "says"),
    [
        (503, "PGRST000", RetryableError, "not applied yet"),
        (None, None, RetryableError, "not applied yet"),
        (400, "22P02", PermanentError, "refused by the database: 22P02"),
        (400, "23514", PermanentError, "refused by the database: 23514"),
        (409, "23505", PermanentError, "refused by the database: 23505"),
        (404, "PGRST202", RetryableError, f"apply {MIGRATION}"),
        (401, "PGRST301", RetryableError, "SUPABASE_SERVICE_ROLE_KEY"),
        (403, "42501", RetryableError, "SUPABASE_SERVICE_ROLE_KEY"),
        (406, "PGRST106", RetryableError, "exposed schemas"),
        (400, "P0001", RetryableError, MIGRATION),
    ],
)
def test_rpc_errors_map_to_retry_or_archive(
    status: int | None, code: str | None, kind: type[Exception], says: str
) -> None:
    error = job_error(RpcError("apply_payment_event", status, "boom", code=code))
    assert type(error) is kind
    assert says in str(error)


def test_receipt_is_mailed_once_in_the_customers_language(
    db: Database, start_service: ServiceFactory, sender: PgNetSender, smtp: SmtpServer
) -> None:
    # Both queues served: the receipt the payment enqueues is sent by the email processor.
    start_service()
    metadata = {"locale": "ru", "customer_name": "Анна Петрова"}
    send(db, event(metadata=metadata, amount="1500.00", currency="RUB"))
    send(db, event(metadata=metadata, amount="1500.00", currency="RUB"))  # replayed
    [mail] = smtp.wait_for(1)
    assert mail["Subject"] == "Квитанция об оплате на сумму 1\u00a0500,00\u00a0₽"
    assert mail["To"] == "anna@example.com"
    text = mail.get_body(("plain",))
    assert text is not None and "Номер платежа:     pi_1" in text.get_content()
    assert text.get_content().startswith("Здравствуйте, Анна Петрова!")
    wait_until(lambda: queue_rows(db) == [] and queue_rows(db, QUEUE) == [], what="both queues")
    assert len(smtp.received) == 1  # the replayed event sent no second receipt
    assert events(db) == {"evt_1": ("applied", 1)}
