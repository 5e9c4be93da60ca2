"""Per-queue limits from queues.toml: max_concurrency and rate_per_second, on both paths.

A probe processor (a plugin module next to a queues.toml in a temporary directory)
records when each job starts and ends; the service runs in-process, so the test
reads the same module's records.
"""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServiceFactory
from tests.support.pg_net import PgNetSender
from tests.support.postgres import OWNER_ROLE, Database, attach_queue
from tests.support.waiting import wait_until

PROBE = """
import asyncio
import time

RUNS = []  # (queue, started, ended)


def probe(queue, seconds):
    async def run(job: dict) -> None:
        started = time.monotonic()
        await asyncio.sleep(seconds)
        RUNS.append((queue, started, time.monotonic()))

    return run


slow = probe("slow_queue", 0.4)
fast = probe("fast_queue", 0.4)
paced = probe("paced_queue", 0.0)
"""


@pytest.fixture
def probe(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    name = f"limits_probe_{request.node.name.replace('[', '_').replace(']', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PROBE))
    yield name
    sys.modules.pop(name, None)


def queues_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "queues.toml"
    path.write_text(textwrap.dedent(text))
    return path


def send_many(db: Database, queue: str, count: int) -> None:
    with db.connect(role=OWNER_ROLE) as conn:
        conn.execute(
            "select pgmq.send_batch(%s, %s::jsonb[])",
            [queue, [json.dumps({"n": i}) for i in range(count)]],
        )


def overlap(runs: list[tuple[str, float, float]]) -> int:
    """The most jobs of `runs` that were running at one moment."""
    events = sorted([(s, 1) for _, s, _ in runs] + [(e, -1) for _, _, e in runs])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_a_queue_at_max_concurrency_1_runs_one_job_at_a_time_while_another_runs_many(
    db: Database,
    tmp_path: Path,
    probe: str,
    start_service: ServiceFactory,
    sender: PgNetSender,
) -> None:
    attach_queue(db, "slow_queue")
    attach_queue(db, "fast_queue")
    path = queues_toml(
        tmp_path,
        f"""
        [queues.slow_queue]
        processor = "{probe}:slow"
        max_concurrency = 1

        [queues.fast_queue]
        processor = "{probe}:fast"
        max_concurrency = 8
        """,
    )
    # The sweeper too (every 0.3 s) picks up what the webhooks deferred.
    start_service(queues_file=path, max_concurrency=2, sweep_interval_seconds=0.3)
    send_many(db, "slow_queue", 4)
    send_many(db, "fast_queue", 8)
    runs = sys.modules[probe].RUNS
    wait_until(lambda: len(runs) == 12, timeout=30, what="every job")
    slow = [run for run in runs if run[0] == "slow_queue"]
    fast = [run for run in runs if run[0] == "fast_queue"]
    assert overlap(slow) == 1  # one at a time, 4 x 0.4 s
    assert overlap(fast) >= 6  # not held back by the slow queue, nor by MAX_CONCURRENCY=2
    # The fast queue's jobs were all done before the slow queue was half way.
    assert max(end for _, _, end in fast) < sorted(end for _, _, end in slow)[2]


def test_rate_per_second_spreads_jobs_evenly_on_the_sweeper_path(
    db: Database, tmp_path: Path, probe: str, start_service: ServiceFactory
) -> None:
    attach_queue(db, "paced_queue")
    path = queues_toml(
        tmp_path,
        f"""
        [queues.paced_queue]
        processor = "{probe}:paced"
        rate_per_second = 5
        max_concurrency = 20
        """,
    )
    # No webhooks (nothing in Vault): the sweeper reads all 20 at once.
    start_service(register=False, queues_file=path, sweep_interval_seconds=0.2)
    send_many(db, "paced_queue", 20)
    runs = sys.modules[probe].RUNS
    wait_until(lambda: len(runs) == 20, timeout=30, what="every job")
    starts = sorted(started for _, started, _ in runs)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # Evenly spaced at 1/5 s (timers fire late under load, never early by much).
    assert 0.18 <= statistics.median(gaps) <= 0.3, gaps
    # No second holds more than 5 starts (+1 for a timer that fired late).
    assert all(starts[i + 6] - starts[i] >= 1.0 for i in range(len(starts) - 6)), gaps
    assert starts[-1] - starts[0] >= 19 * 0.2 - 0.1


def test_rate_per_second_holds_on_the_webhook_path(
    db: Database,
    tmp_path: Path,
    probe: str,
    start_service: ServiceFactory,
    sender: PgNetSender,
) -> None:
    attach_queue(db, "paced_queue")
    path = queues_toml(
        tmp_path,
        f"""
        [queues.paced_queue]
        processor = "{probe}:paced"
        rate_per_second = 10
        """,
    )
    service = start_service(queues_file=path)
    send_many(db, "paced_queue", 10)
    runs = sys.modules[probe].RUNS
    wait_until(lambda: len(runs) == 10, timeout=30, what="every job")
    starts = sorted(started for _, started, _ in runs)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert 0.09 <= statistics.median(gaps) <= 0.2, gaps
    assert sender.by_status == {202: 10}
    assert service.services.runner.capacity("paced_queue") == 16  # MAX_CONCURRENCY, unset here
