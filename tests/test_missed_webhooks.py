"""Missed webhooks are visible: `queue_worker_missed_webhooks_total{queue}`.

Against the real test bed (PostgreSQL with pgmq, the webhook trigger, the pg_net
sender, the RPC gateway, SMTP): webhooks the sender drops are counted once the
sweeper has run their messages, exactly that many; webhooks that were delivered,
answered "deferred" (the sweeper ran their messages) or that arrive after the
sweeper took their message are not. Then the rule itself (app/worker/doorbell.py)
with a clock the test moves.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from app import metrics
from app.queue.models import QueueMessage
from app.worker.doorbell import MAX_REMEMBERED, RETENTION_SECONDS, Doorbell
from tests.conftest import Service, ServiceFactory
from tests.support.pg_net import running_sender
from tests.support.postgres import Database
from tests.support.scrape import sample
from tests.support.smtp import SmtpServer
from tests.support.waiting import wait_until
from tests.test_reliability import FAST, all_done, enqueue_many

# Long enough for a delivered webhook to arrive after the sweeper took its message, on a
# loaded machine too (the pg_net sender pauses between passes); short enough to wait for.
GRACE = 4.0
MISSED = "queue_worker_missed_webhooks_total"


def missed(service: Service, queue: str = "email_queue") -> float:
    return sample(service.url, MISSED, queue=queue)


def judging(start_service: ServiceFactory, **overrides: object) -> Service:
    """A service that sweeps often, judges after GRACE, and is past its start-up margin."""
    service = start_service(**{**FAST, "missed_webhook_grace_seconds": GRACE, **overrides})
    # Messages enqueued within the grace period after start are not judged.
    time.sleep(GRACE + 0.1)
    return service


def test_dropped_webhooks_are_counted_exactly(
    db: Database, start_service: ServiceFactory, smtp: SmtpServer
) -> None:
    with running_sender(db, drop_rate=0.3, seed=17) as sender:
        service = judging(start_service)
        before = missed(service)
        expected = enqueue_many(db, 60, prefix="missed")
        wait_until(lambda: all_done(db, smtp, expected), timeout=30, what="every job")
        sender.wait_idle()
    assert sender.dropped >= 10  # about 30% of 60
    wait_until(
        lambda: missed(service) == before + sender.dropped,
        timeout=GRACE + 10,
        what=f"{sender.dropped} missed webhooks counted",
    )
    # Nothing else is counted later on.
    time.sleep(GRACE + 1)
    assert missed(service) == before + sender.dropped


def test_no_webhook_sent_counts_every_message(
    db: Database, start_service: ServiceFactory, smtp: SmtpServer
) -> None:
    # No sender at all: the doorbell of every message fails.
    service = judging(start_service)
    before = missed(service)
    expected = enqueue_many(db, 12, prefix="silent")
    wait_until(lambda: all_done(db, smtp, expected), timeout=30, what="every job")
    wait_until(
        lambda: missed(service) == before + 12, timeout=GRACE + 10, what="12 missed webhooks"
    )


def test_delivered_webhooks_count_none_even_when_the_sweeper_comes_first(
    db: Database, start_service: ServiceFactory, smtp: SmtpServer
) -> None:
    # The sweeper reads every 50 ms while the sender pauses up to 0.5 s between passes:
    # it takes many messages before their webhook arrives, and must not count them.
    with running_sender(db, pause=0.5) as sender:
        service = judging(start_service, sweep_interval_seconds=0.05)
        before = missed(service)
        expected = enqueue_many(db, 40, prefix="rung")
        wait_until(lambda: all_done(db, smtp, expected), timeout=30, what="every job")
        sender.wait_idle()
        assert sender.dropped == 0 and sender.sent == 40
    time.sleep(GRACE + 1)
    assert missed(service) == before


def test_deferred_webhooks_are_not_missed(
    db: Database, start_service: ServiceFactory, smtp: SmtpServer
) -> None:
    # One slot, no prefetch and slow mail: most webhooks are answered "deferred" and
    # the sweeper, woken for them, runs their messages.
    smtp.mail_delay = 0.05
    deferred = 'queue_worker_webhooks_total{queue="email_queue",result="deferred"}'
    with running_sender(db) as sender:
        service = judging(start_service, max_concurrency=1, prefetch=0, sweep_interval_seconds=0.2)
        before = (
            missed(service),
            sample(
                service.url, "queue_worker_webhooks_total", queue="email_queue", result="deferred"
            ),
        )
        expected = enqueue_many(db, 20, prefix="deferred")
        wait_until(lambda: all_done(db, smtp, expected), timeout=60, what="every job")
        sender.wait_idle()
    deferred_now = sample(
        service.url, "queue_worker_webhooks_total", queue="email_queue", result="deferred"
    )
    assert deferred_now - before[1] >= 5, deferred
    time.sleep(GRACE + 1)
    assert missed(service) == before[0]


# -- the rule, with a clock the test moves ---------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def message(msg_id: int, *, read_ct: int = 1, age: float = 0.0) -> QueueMessage:
    now = datetime.now(UTC)
    return QueueMessage(
        msg_id=msg_id,
        read_ct=read_ct,
        enqueued_at=now - timedelta(seconds=age),
        vt=now + timedelta(seconds=30),
        message={},
    )


def counted(queue: str) -> float:
    value: float = metrics.MISSED_WEBHOOKS.labels(queue)._value.get()  # type: ignore[attr-defined]
    return value


@pytest.mark.anyio
async def test_the_rule_judges_only_what_it_can_know() -> None:
    queue = "doorbell_rule_queue"
    clock = Clock()
    bell = Doorbell([queue], grace=0.05, clock=clock)
    # Before open(): nothing is judged (no webhook could have rung here).
    bell.swept(queue, [message(1)])
    assert bell.pending(queue) == 0
    bell.open()
    # Enqueued before start plus the grace: its webhook may have rung elsewhere.
    bell.swept(queue, [message(2, age=0.0)])
    assert bell.pending(queue) == 0
    await asyncio.sleep(0.06)  # past the start-up margin (wall clock)
    bell.rang(queue, [10])  # a webhook (accepted or deferred) for 10
    bell.swept(
        queue,
        [
            message(10),  # rang before the read
            message(11, read_ct=2),  # claimed before: a webhook's claim, here or elsewhere
            message(12),  # unrung
            message(13),  # unrung, but its webhook arrives within the grace period
        ],
    )
    assert bell.pending(queue) == 2
    bell.rang(queue, [13])
    assert bell.pending(queue) == 1
    clock.now += 1
    await asyncio.sleep(0.1)
    assert counted(queue) == 1  # 12 alone
    assert bell.pending(queue) == 0
    bell.close()


@pytest.mark.anyio
async def test_forgotten_ids_are_never_counted() -> None:
    queue = "doorbell_forget_queue"
    clock = Clock()
    bell = Doorbell([queue], grace=0.01, clock=clock, wall_clock=lambda: 0.0)
    bell.open()
    bell.rang(queue, [100])  # a delayed job's webhook, say
    clock.now += RETENTION_SECONDS + 1
    bell.rang(queue, [200])  # 100 is forgotten now
    bell.swept(queue, [message(99), message(100), message(150), message(201)])
    # 99 and 100 are at or below a forgotten id (100 did ring, 99 might have); 150 and
    # 201 are above every forgotten id and did not ring.
    assert bell.pending(queue) == 2
    bell.close()
    assert bell.pending(queue) == 0


@pytest.mark.anyio
async def test_past_the_cap_the_oldest_ids_are_forgotten_never_counted() -> None:
    queue = "doorbell_cap_queue"
    bell = Doorbell([queue], grace=0.01, clock=Clock(), wall_clock=lambda: 0.0)
    bell.open()
    for msg_id in range(1, MAX_REMEMBERED + 3):  # two over the cap
        bell.rang(queue, [msg_id])
    bell.swept(queue, [message(1), message(2), message(3), message(MAX_REMEMBERED + 5)])
    # 1 and 2 were forgotten (they did ring), 3 is still remembered: only the new one.
    assert bell.pending(queue) == 1
    bell.close()
