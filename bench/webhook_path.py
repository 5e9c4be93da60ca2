"""Webhook path throughput: webhooks in, claims and acks out, next to a bare endpoint.

N messages are enqueued, then their webhooks are POSTed at concurrency C by the lean
load generator (bench/loadgen.py, its own process) to:

1. a bare FastAPI endpoint that only answers 202 (bench/bare_app.py): the ceiling;
2. the service with claim/ack coalescing (COALESCE_* at their defaults): what ships;
3. the service with COALESCE_MAX_BATCH=1: one claim RPC and one ack RPC per message,
   the floor the coalescer is meant to beat.

Both services run with MAX_CONCURRENCY=1000 and SWEEP_BATCH_SIZE=500 (--max-concurrency,
--batch), other settings at their defaults: webhooks beyond the free slots are answered
"deferred", and the sweeper, woken by the deferral, reads those messages in batches.

The service runs as `queue-worker` does (app.server.serve: uvloop, httptools) with a
no-op processor (bench/noop_service.py), against the RPC gateway and PostgreSQL.
Reported per run: jobs/s until the last ack, p50/p99 webhook->ack latency, RPC calls
and database transactions per job. Then the enqueue->ack latency when messages
arrive at a steady 200 a second, each webhook sent as soon as its insert commits.

    uv run python -m bench.webhook_path [--messages 20000] [--floor-messages 5000]
        [--concurrency 64] [--max-concurrency 1000] [--batch 500] [--repeat 3]
        [--rate 200] [--paced-seconds 10] [--profile DIR] [--only burst|paced]
        [--cpu-hogs N]

Uses TEST_DATABASE_URL when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.testbed import (
    MachineCpu,
    Probe,
    bare_process,
    bench_settings,
    empty_queue,
    enqueue,
    install_ack_recorder,
    loadgen,
    middle,
    noop_service,
    percentile,
    run_queue_seconds,
    settle_commits,
    wait_drained,
)
from tests.support.postgres import Database, bootstrap, fresh_database, server_url
from tests.support.rpc_gateway import RpcGateway, running_gateway


@dataclass
class Row:
    name: str
    jobs: int
    seconds: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    rpc_per_job: float | None = None
    commits_per_job: float | None = None
    answers: Counter[str] = field(default_factory=Counter)
    rpcs: dict[str, int] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    cpu_us_per_job: float | None = None  # the measured server process's own CPU time
    machine_busy: float | None = None  # % of all cores busy meanwhile
    rpc_buckets: Counter[float] | None = None  # the service's claim+ack RPC latency histogram
    # ms per second of run spent waiting for a CPU: the service, and this process (the
    # RPC gateway stand-in's thread).
    run_queue: tuple[float, float] | None = None
    latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


def bare(messages: int, concurrency: int) -> Row:
    with bare_process() as server:
        cpu_before = server.cpu_seconds()
        machine = MachineCpu()
        result = loadgen(
            {
                "mode": "burst",
                "url": server.url,
                "authorization": "unused",
                "ids": list(range(1, messages + 1)),
                "concurrency": concurrency,
            }
        )
        cpu = server.cpu_seconds() - cpu_before
        busy = machine.busy()
        peak_rss = server.peak_rss_mb()
    return Row(
        "bare FastAPI endpoint",
        messages,
        result["seconds"],
        answers=result["statuses"],
        peak_rss_mb=peak_rss,
        cpu_us_per_job=cpu / messages * 1e6,
        machine_busy=busy,
    )


def _rpc_counts(gateway: RpcGateway, total: int) -> tuple[float, dict[str, int]]:
    calls = {name.split(".", 1)[1]: n for name, n in gateway.calls.items()}
    return gateway.total_calls / total, calls


def burst(
    db: Database,
    gateway: RpcGateway,
    name: str,
    args: argparse.Namespace,
    messages: int,
    **settings: Any,
) -> Row:
    empty_queue(db)
    config = bench_settings(
        gateway, max_concurrency=args.max_concurrency, sweep_batch_size=args.batch, **settings
    )
    profile = None
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        profile = args.profile / (name.split(",")[-1].strip().replace("=", "-") + ".prof")
    with noop_service(config, profile) as service:
        time.sleep(1.0)  # the sweeper's first pass (on the empty queue) is over
        ids = enqueue(db, messages)
        probe = Probe(db)
        try:
            gateway.reset_counters()
            before = probe.commits()
            cpu_before = service.cpu_seconds()
            machine = MachineCpu()
            if profile is not None:
                os.kill(service.pid, signal.SIGUSR1)
            result = loadgen(
                {
                    "mode": "burst",
                    "url": service.url,
                    "authorization": service.secret,
                    "ids": ids,
                    "concurrency": args.concurrency,
                }
            )
            wait_drained(probe, len(ids))
            if profile is not None:
                os.kill(service.pid, signal.SIGUSR2)
            cpu = service.cpu_seconds() - cpu_before
            busy = machine.busy()
            rpc_per_job, calls = _rpc_counts(gateway, len(ids))
            acks = probe.rows(
                "select msg_id, extract(epoch from acked_at)::float8 from public.bench_acks"
            )
            after = settle_commits(probe)
            # The probe's own statements, up to and including the last reading.
            commits = after - before - (probe.statements - 1)
            peak_rss = service.peak_rss_mb()
        finally:
            probe.close()
    sent: dict[int, float] = result["sent"]
    latencies = [(acked - sent[msg_id]) * 1000 for msg_id, acked in acks]
    last_ack = max(acked for _, acked in acks)
    return Row(
        name,
        len(ids),
        last_ack - result["started"],
        percentile(latencies, 50),
        percentile(latencies, 99),
        rpc_per_job,
        commits / len(ids),
        result["statuses"],
        calls,
        peak_rss,
        cpu / len(ids) * 1e6,
        busy,
    )


def paced(
    db: Database, gateway: RpcGateway, name: str, args: argparse.Namespace, **settings: Any
) -> Row:
    empty_queue(db)
    count = int(args.rate * args.paced_seconds)
    config = bench_settings(
        gateway, max_concurrency=args.max_concurrency, sweep_batch_size=args.batch, **settings
    )
    with noop_service(config) as service:
        time.sleep(1.0)
        probe = Probe(db)
        spec = {
            "mode": "paced",
            "url": service.url,
            "authorization": service.secret,
            "database_url": db.url,
            "rate": args.rate,
            "concurrency": 16,
        }
        try:
            # One second of the same traffic first, not counted: connections to the
            # gateway and the database are opened on first use.
            warmup = int(args.rate)
            loadgen({**spec, "count": warmup})
            wait_drained(probe, warmup)
            probe.run("truncate public.bench_acks")
            buckets_before = rpc_buckets(service.url)
            gateway.reset_counters()
            waited = service.run_queue_seconds(), run_queue_seconds(os.getpid())
            result = loadgen({**spec, "count": count})
            wait_drained(probe, count)
            run_queue = (
                (service.run_queue_seconds() - waited[0]) / result["seconds"] * 1000,
                (run_queue_seconds(os.getpid()) - waited[1]) / result["seconds"] * 1000,
            )
            rpc_per_job, calls = _rpc_counts(gateway, count)
            buckets = Counter(rpc_buckets(service.url))
            buckets.subtract(buckets_before)
            rows = probe.rows(
                "select extract(epoch from acked_at - enqueued_at)::float8 * 1000 "
                "from public.bench_acks"
            )
        finally:
            probe.close()
    latencies = [value for (value,) in rows]
    return Row(
        name,
        count,
        result["seconds"],
        percentile(latencies, 50),
        percentile(latencies, 99),
        rpc_per_job,
        None,
        result["statuses"],
        calls,
        rpc_buckets=buckets,
        latencies=latencies,
        run_queue=run_queue,
    )


def rpc_buckets(url: str) -> dict[float, float]:
    """The service's claim and ack latency histogram (cumulative counts per bucket)."""
    text = httpx.get(f"{url}/metrics").text
    counts: Counter[float] = Counter()
    pattern = (
        r"^queue_worker_rpc_duration_seconds_bucket"
        r'\{function="(?:claim|ack)",le="([^"]+)"\} (\S+)$'
    )
    for match in re.finditer(pattern, text, re.MULTILINE):
        counts[float(match.group(1))] += float(match.group(2))
    return dict(counts)


def bucket_quantile(buckets: Counter[float], q: float) -> float:
    """The upper bound (ms) of the histogram bucket holding quantile `q`."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    return next(b for b in bounds if buckets[b] >= q * total) * 1000


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(title: str, rows: list[Row]) -> None:
    print(title)  # noqa: T201
    header = (
        "run",
        "jobs",
        "seconds",
        "jobs/s",
        "p50 ms",
        "p99 ms",
        "RPC/job",
        "xact/job",
        "RSS MB",
        "CPU us/job",
    )
    line = "{:<34}{:>7}{:>9}{:>9}{:>9}{:>9}{:>9}{:>10}{:>8}{:>12}"
    print(line.format(*header))  # noqa: T201
    for row in rows:
        cells = (
            row.name,
            row.jobs,
            f"{row.seconds:.2f}",
            f"{row.rate:.0f}",
            _cell(row.p50_ms, ".1f"),
            _cell(row.p99_ms, ".1f"),
            _cell(row.rpc_per_job, ".3f"),
            _cell(row.commits_per_job, ".3f"),
            _cell(row.peak_rss_mb, ".1f"),
            _cell(row.cpu_us_per_job, ".0f"),
        )
        print(line.format(*cells))  # noqa: T201
    for row in rows:
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(row.answers.items()))
        rpcs = ", ".join(f"{k} {v}" for k, v in sorted(row.rpcs.items()))
        busy = f"; machine CPU busy {row.machine_busy:.0f}%" if row.machine_busy else ""
        if row.rpc_buckets:
            p50, p99 = bucket_quantile(row.rpc_buckets, 0.5), bucket_quantile(row.rpc_buckets, 0.99)
            busy += f"; claim/ack RPC p50 <= {p50:g} ms, p99 <= {p99:g} ms"
        if row.run_queue:
            service_wait, gateway_wait = row.run_queue
            busy += (
                f"; waiting for a CPU, ms per s: service {service_wait:.0f}, "
                f"gateway stand-in's process {gateway_wait:.0f}"
            )
        print(f"  {row.name}: answers {answers}" + (f"; RPCs {rpcs}" if rpcs else "") + busy)  # noqa: T201


def median(rows: list[Row]) -> Row:
    """The run with the median rate."""
    return middle(rows, key=lambda row: row.rate)


def pooled(name: str, rows: list[Row]) -> Row:
    """Several paced runs as one: latency percentiles over all their jobs."""
    latencies = [value for row in rows for value in row.latencies]
    answers: Counter[str] = sum((Counter(row.answers) for row in rows), Counter())
    rpcs: Counter[str] = sum((Counter(row.rpcs) for row in rows), Counter())
    buckets: Counter[float] = sum((row.rpc_buckets or Counter() for row in rows), Counter())
    waits = [row.run_queue for row in rows if row.run_queue]
    jobs = sum(row.jobs for row in rows)
    return Row(
        name,
        jobs,
        sum(row.seconds for row in rows),
        percentile(latencies, 50),
        percentile(latencies, 99),
        sum(rpcs.values()) / jobs,
        None,
        answers,
        dict(rpcs),
        rpc_buckets=buckets,
        run_queue=(
            (sum(w[0] for w in waits) / len(waits), sum(w[1] for w in waits) / len(waits))
            if waits
            else None
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--floor-messages", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500, help="SWEEP_BATCH_SIZE")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="bare and coalescing bursts, and paced runs, are repeated (alternating) "
        "this often: the machine is shared, so single runs vary",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="directory for cProfile statistics of the service during each burst "
        "(CPU time; a profiled run is slower, its figures are not comparable)",
    )
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument(
        "--only",
        choices=["burst", "paced"],
        help="run only the burst table or only the paced one",
    )
    parser.add_argument(
        "--cpu-hogs",
        type=int,
        default=0,
        help="busy-loop processes competing for the CPU during the paced runs (the "
        "machine's other load, made repeatable)",
    )
    args = parser.parse_args()

    with server_url() as server, fresh_database(server, prefix="qw_bench") as db:
        bootstrap(db)
        install_ack_recorder(db)
        with running_gateway(db) as gateway:
            if args.only != "paced":
                bursts(db, gateway, args)
            if args.only != "burst":
                with cpu_hogs(args.cpu_hogs):
                    paced_on = pooled(
                        "paced, coalescing",
                        [paced(db, gateway, "paced, coalescing", args) for _ in range(args.repeat)],
                    )
                    paced_off = paced(
                        db, gateway, "paced, COALESCE_MAX_BATCH=1", args, coalesce_max_batch=1
                    )
                hogs = f"; {args.cpu_hogs} CPU-bound processes competing" if args.cpu_hogs else ""
                print_table(
                    f"paced: {args.rate:g} jobs/s for {args.paced_seconds:g} s, latency from "
                    f"enqueue to ack (coalescing: {args.repeat} runs pooled){hogs}",
                    [paced_on, paced_off],
                )


def bursts(db: Database, gateway: RpcGateway, args: argparse.Namespace) -> None:
    """The burst table: bare endpoint and coalescing alternating, then the floor."""
    ceilings: list[Row] = []
    coalesced: list[Row] = []
    for _ in range(args.repeat):
        ceilings.append(bare(args.messages, args.concurrency))
        coalesced.append(burst(db, gateway, "queue-worker, coalescing", args, args.messages))
    floor = burst(
        db,
        gateway,
        "queue-worker, COALESCE_MAX_BATCH=1",
        args,
        args.floor_messages,
        coalesce_max_batch=1,
    )
    ratios = [c.rate / b.rate for b, c in zip(ceilings, coalesced, strict=True)]
    print_table(  # noqa: T201
        f"burst: {args.messages} webhooks ({args.floor_messages} for the floor) at "
        f"concurrency {args.concurrency}, MAX_CONCURRENCY={args.max_concurrency}; "
        f"median of {args.repeat} alternating runs",
        [median(ceilings), median(coalesced), floor],
    )
    print(  # noqa: T201
        "  all runs, jobs/s: bare "
        + ", ".join(f"{row.rate:.0f}" for row in ceilings)
        + "; coalescing "
        + ", ".join(f"{row.rate:.0f}" for row in coalesced)
    )
    print(  # noqa: T201
        f"coalescing vs bare endpoint: {middle(ratios):.2f}x "
        f"(median of the back-to-back pairs: {', '.join(f'{r:.2f}' for r in ratios)}); "
        f"vs one RPC per message: {median(coalesced).rate / floor.rate:.1f}x"
    )
    print()  # noqa: T201


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """`count` processes spinning on the CPU at normal priority for the duration."""
    spin = "while True: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


if __name__ == "__main__":
    main()
