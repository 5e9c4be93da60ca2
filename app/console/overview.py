"""What a console page shows, gathered from the same calls the manual API makes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from app import operations
from app.api.deps import Services
from app.queue.backend import ArchivedMessage

# Dead letters listed on the page (newest first, every queue together).
LATEST = 20


@dataclass(frozen=True)
class QueueRow:
    queue: str
    length: int | None
    visible: int | None
    in_flight: int
    oldest_age_seconds: int | None
    jobs_per_second: float
    failure_ratio: float | None
    dead_letters: int | None
    paused: bool


@dataclass(frozen=True)
class DeadRow:
    queue: str
    message: ArchivedMessage

    @property
    def reason(self) -> str:
        return self.message.reason


@dataclass(frozen=True)
class Overview:
    queues: list[QueueRow]
    dead: list[DeadRow]
    at: datetime


async def overview(services: Services, dead_queue: str | None = None) -> Overview:
    runner = services.runner
    depths = await operations.depths(services.backend, services.processors)
    # Dead-letter counts read the archives whole: cached like /metrics' (METRICS_CACHE_SECONDS).
    await services.queue_stats.refresh()
    counts = services.queue_stats.dead_letters
    rows = []
    for depth in depths:
        rate = runner.rates.rate(depth.queue)
        rows.append(
            QueueRow(
                queue=depth.queue,
                length=depth.length,
                visible=depth.visible,
                in_flight=runner.in_flight(depth.queue),
                oldest_age_seconds=depth.oldest_age_seconds,
                jobs_per_second=rate.jobs_per_second,
                failure_ratio=rate.failure_ratio,
                dead_letters=counts.get(depth.queue),
                paused=depth.paused,
            )
        )
    if dead_queue is not None and dead_queue in services.processors:
        page = await operations.dead_letters(
            services.backend, services.processors, dead_queue, LATEST
        )
        dead = [DeadRow(dead_queue, m) for m in page.messages]
    else:
        latest = await operations.latest_dead_letters(services.backend, services.processors, LATEST)
        dead = [DeadRow(queue, m) for queue, m in latest]
    return Overview(rows, dead, datetime.now().astimezone())
