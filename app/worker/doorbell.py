"""Missed webhooks: messages the sweeper found before any webhook rang for them.

pg_net delivers at most once (no retries, unlogged tables emptied by a crash), so
some doorbells never ring; the sweeper still runs those messages. This counts them
(`queue_worker_missed_webhooks_total{queue}`), so that an operator sees pg_net
losing requests instead of only noticing jobs that start up to a sweep interval late.

A message read by the sweeper counts as missed when all of these hold:

- `read_ct` is 1: this read is the first claim of it anywhere (a webhook's claim,
  here or on another replica, would have made it 2);
- it was enqueued at least `grace` seconds after this process began taking webhooks
  (before that, its webhook had nobody here to ring);
- no webhook for its msg_id reached the runner here, accepted, deferred (at capacity:
  the sweeper was woken for it) or refused while draining, before the read or within
  `grace` seconds after it (the webhook may still be on its way: pg_net pauses up to
  a second between passes and takes seconds for a burst);
- its msg_id is above every id this process has stopped remembering: rung ids are
  kept `RETENTION_SECONDS` and at most `MAX_REMEMBERED` per queue, and a forgotten id
  (a job delayed for days, say) might have been this one. msg_ids only grow.

With one replica that has no false positives: a message counted had its webhook
lost, refused before it reached the route (a wrong secret, a body over the cap), or
never sent (no Vault secret, no trigger). With several replicas behind one URL a
webhook may ring on another replica; if that replica deferred it and this one's
sweeper took it first, it counts here: compare with `webhooks_total{result="deferred"}`
(docs/guides/operations.md). Messages are judged only by the sweeper, so local mode
(no webhooks: LISTEN/NOTIFY wakes the worker) has no doorbell.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from app import metrics
from app.queue.models import QueueMessage

# How long a rung msg_id is remembered, and how many per queue at most.
RETENTION_SECONDS = 900.0
MAX_REMEMBERED = 100_000
# Messages waiting for their grace period to end, per queue at most; beyond, a
# read's unrung messages are not judged (a count too low, never too high).
MAX_SUSPECTS = 100_000


class Doorbell:
    """Which webhooks rang here, and which swept messages no webhook announced."""

    def __init__(
        self,
        queues: Iterable[str],
        *,
        grace: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.grace = grace
        self._clock = clock
        self._wall_clock = wall_clock
        names = sorted(queues)
        # Per queue: rung msg_id -> when (monotonic), oldest first.
        self._rang: dict[str, OrderedDict[int, float]] = {q: OrderedDict() for q in names}
        # Per queue: the highest msg_id forgotten so far.
        self._forgotten: dict[str, int] = dict.fromkeys(names, 0)
        # Per queue: when the oldest remembered id runs out (monotonic).
        self._forget_at: dict[str, float] = dict.fromkeys(names, float("inf"))
        # Per queue: swept msg_id that no webhook announced -> when it counts (monotonic).
        self._suspects: dict[str, dict[int, float]] = {q: {} for q in names}
        # Messages enqueued before this (unix time) are not judged; set by open().
        self._judged_from = float("inf")
        self._timer: asyncio.TimerHandle | None = None
        # Created at start, so every served queue has its series (at 0) from the first scrape.
        self._counters: dict[str, Any] = {q: metrics.MISSED_WEBHOOKS.labels(q) for q in names}

    def open(self) -> None:
        """This process takes webhooks from now on."""
        self._judged_from = self._wall_clock() + self.grace

    def close(self) -> None:
        """Stops judging; messages still in their grace period are not counted."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._judged_from = float("inf")
        for suspects in self._suspects.values():
            suspects.clear()

    def rang(self, queue: str, msg_ids: Sequence[int]) -> None:
        """A webhook for `msg_ids` reached the runner (whatever its answer).

        On every webhook's path: a dict insert, and the forgetting only when it is due.
        """
        rang = self._rang[queue]
        now = self._clock()
        if not rang:
            self._forget_at[queue] = now + RETENTION_SECONDS
        for msg_id in msg_ids:
            rang[msg_id] = now
        suspects = self._suspects[queue]
        if suspects:
            for msg_id in msg_ids:
                suspects.pop(msg_id, None)
        if len(rang) > MAX_REMEMBERED or now >= self._forget_at[queue]:
            self._forget(queue, now)

    def _forget(self, queue: str, now: float) -> None:
        """Drops the ids rung longer ago than the retention, and the excess over the cap."""
        rang = self._rang[queue]
        forgotten = self._forgotten[queue]
        oldest = now - RETENTION_SECONDS
        while rang:
            msg_id, when = next(iter(rang.items()))
            if len(rang) <= MAX_REMEMBERED and when >= oldest:
                break
            del rang[msg_id]
            forgotten = max(forgotten, msg_id)
        self._forgotten[queue] = forgotten
        # When the oldest id left runs out (rang() sets it again once one is added).
        self._forget_at[queue] = (
            next(iter(rang.values())) + RETENTION_SECONDS if rang else float("inf")
        )

    def swept(self, queue: str, messages: Sequence[QueueMessage]) -> None:
        """The sweeper claimed `messages`: those no webhook announced become suspects."""
        if not messages:
            return
        rang = self._rang[queue]
        suspects = self._suspects[queue]
        forgotten = self._forgotten[queue]
        due = self._clock() + self.grace
        for message in messages:
            msg_id = message.msg_id
            if (
                message.read_ct == 1
                and msg_id > forgotten
                and msg_id not in rang
                and message.enqueued_at.timestamp() >= self._judged_from
                and len(suspects) < MAX_SUSPECTS
            ):
                suspects[msg_id] = due
        if self._timer is None and any(self._suspects.values()):
            self._timer = asyncio.get_running_loop().call_later(self.grace, self._judge)

    def pending(self, queue: str) -> int:
        """Messages of `queue` in their grace period: missed unless a webhook still rings."""
        return len(self._suspects[queue])

    def _judge(self) -> None:
        """Counts the suspects whose grace period is over; runs while any are left."""
        self._timer = None
        now = self._clock()
        soonest: float | None = None
        for queue, suspects in self._suspects.items():
            # Suspects are added in time order with one grace period: the due ones lead.
            expired = 0
            for msg_id, due in list(suspects.items()):
                if due > now:
                    soonest = due if soonest is None else min(soonest, due)
                    break
                del suspects[msg_id]
                expired += 1
            if expired:
                self._counters[queue].inc(expired)
        if soonest is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(soonest - now, 0.01), self._judge)
