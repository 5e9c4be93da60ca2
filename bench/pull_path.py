"""Pull path throughput: a preloaded queue drained by the sweeper, next to raw pgmq.

1. raw pgmq: `pgmq.read(queue, 30, 100)` and `pgmq.delete(queue, ids[])` in a loop,
   with psycopg on one connection in this process: what the database allows;
2. the service (a `queue-worker` process with a no-op processor, against the RPC
   gateway, or with `--sql` over direct SQL): its sweeper reads in batches that grow
   with the backlog, runs the jobs and acks them in batches.

Each run starts from N messages inserted in one transaction; the service is started
(and its first sweep over the empty queue done) before they are inserted, so the
time counted is the drain, from commit to an empty queue.

    uv run python -m bench.pull_path [--messages 50000] [--max-concurrency 1000]
        [--batch 500] [--raw-batch 100] [--repeat 3] [--sql] [--profile FILE]

Uses TEST_DATABASE_URL when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.testbed import (
    MachineCpu,
    PostgresCpu,
    Probe,
    bench_settings,
    empty_queue,
    enqueue,
    middle,
    noop_service,
    settle_commits,
    wait_empty,
)
from tests.support.postgres import OWNER_ROLE, Database, bootstrap, fresh_database, server_url
from tests.support.rpc_gateway import RpcGateway, running_gateway


@dataclass
class Row:
    name: str
    jobs: int
    seconds: float
    rpc_per_job: float | None
    commits_per_job: float
    cpu_us_per_job: float | None = None  # the service process's own CPU time
    rpcs: str = ""
    machine_busy: float = 0.0  # % of all cores busy meanwhile
    # Where the CPU went, per job (us): this bench's process (the raw loop, or the
    # RPC gateway stand-in's thread while the main thread polls) and PostgreSQL.
    bench_us_per_job: float = 0.0
    postgres_us_per_job: float = 0.0


def raw_pgmq(db: Database, messages: int, batch: int) -> Row:
    empty_queue(db)
    enqueue(db, messages)
    probe = Probe(db)
    try:
        before = probe.commits()
        with db.connect() as conn:
            started = time.perf_counter()
            machine = MachineCpu()
            own_before, postgres = time.process_time(), PostgresCpu()
            done = 0
            while True:
                ids = [
                    row[0]
                    for row in conn.execute(
                        "select msg_id from pgmq.read('email_queue', 30, %s)", [batch]
                    ).fetchall()
                ]
                if not ids:
                    break
                conn.execute("select pgmq.delete('email_queue', %s::bigint[])", [ids])
                done += len(ids)
            seconds = time.perf_counter() - started
            busy = machine.busy()
            own = time.process_time() - own_before
            pg = postgres.seconds()
        commits = settle_commits(probe) - before - (probe.statements - 1)
    finally:
        probe.close()
    assert done == messages, (done, messages)
    name = f"raw pgmq read({batch}) + delete(ids[])"
    return Row(
        name,
        messages,
        seconds,
        None,
        commits / messages,
        machine_busy=busy,
        bench_us_per_job=own / messages * 1e6,
        postgres_us_per_job=pg / messages * 1e6,
    )


def service(db: Database, gateway: RpcGateway, args: argparse.Namespace, **overrides: Any) -> Row:
    empty_queue(db)
    settings = bench_settings(
        gateway,
        max_concurrency=args.max_concurrency,
        sweep_batch_size=args.batch,
        # The empty queue is read every 50 ms: the drain starts at once.
        sweep_interval_seconds=0.05,
        **overrides,
    )
    with noop_service(settings, args.profile) as running:
        time.sleep(1.0)
        probe = Probe(db)
        try:
            before = probe.commits()
            gateway.reset_counters()
            enqueue(db, args.messages)
            if args.profile is not None:
                os.kill(running.pid, signal.SIGUSR1)
            started = time.perf_counter()
            cpu_before = running.cpu_seconds()
            machine = MachineCpu()
            own_before, postgres = time.process_time(), PostgresCpu()
            wait_empty(probe)
            seconds = time.perf_counter() - started
            if args.profile is not None:
                os.kill(running.pid, signal.SIGUSR2)
            cpu = running.cpu_seconds() - cpu_before
            busy = machine.busy()
            own = time.process_time() - own_before
            pg = postgres.seconds()
            calls = {name.split(".", 1)[1]: n for name, n in gateway.calls.items()}
            rpcs = gateway.total_calls
            after = settle_commits(probe)
            # The insert, and the probe's own statements before the last reading.
            commits = after - before - 1 - (probe.statements - 1)
        finally:
            probe.close()
    return Row(
        "queue-worker sweeper",
        args.messages,
        seconds,
        rpcs / args.messages,
        commits / args.messages,
        cpu / args.messages * 1e6,
        ", ".join(f"{k} {v}" for k, v in sorted(calls.items())),
        busy,
        own / args.messages * 1e6,
        pg / args.messages * 1e6,
    )


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def rate(row: Row) -> float:
    return row.jobs / row.seconds


def _mid(rows: list[Row], field: str) -> float:
    return float(middle(getattr(row, field) for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--max-concurrency", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500, help="SWEEP_BATCH_SIZE")
    parser.add_argument("--raw-batch", type=int, default=100)
    parser.add_argument(
        "--sql",
        action="store_true",
        help="the service over direct SQL (DATABASE_URL) instead of the RPC gateway stand-in",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="raw and sweeper runs alternate this often: the machine is shared",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="file for cProfile statistics (CPU time) of the service during its drains "
        "(a profiled run is slower: its figures are not comparable)",
    )
    args = parser.parse_args()

    raws: list[Row] = []
    swept: list[Row] = []
    with server_url() as server, fresh_database(server, prefix="qw_bench") as db:
        bootstrap(db)
        with running_gateway(db) as gateway:
            for _ in range(args.repeat):
                raws.append(raw_pgmq(db, args.messages, args.raw_batch))
                overrides = {"database_url": db.url_as(OWNER_ROLE)} if args.sql else {}
                swept.append(service(db, gateway, args, **overrides))

    print(  # noqa: T201
        f"drain of {args.messages} messages; service MAX_CONCURRENCY={args.max_concurrency}, "
        f"SWEEP_BATCH_SIZE={args.batch}; median of {args.repeat} alternating runs"
    )
    header = ("run", "jobs", "seconds", "jobs/s", "RPC/job", "xact/job", "CPU us/job")
    line = "{:<38}{:>8}{:>9}{:>9}{:>9}{:>10}{:>12}"
    print(line.format(*header))  # noqa: T201
    raw, sweeper = middle(raws, key=rate), middle(swept, key=rate)
    for row in (raw, sweeper):
        cells = (
            row.name,
            row.jobs,
            f"{row.seconds:.2f}",
            f"{rate(row):.0f}",
            _cell(row.rpc_per_job, ".3f"),
            f"{row.commits_per_job:.3f}",
            _cell(row.cpu_us_per_job, ".0f"),
        )
        print(line.format(*cells))  # noqa: T201
    print(f"  RPCs: {sweeper.rpcs}")  # noqa: T201
    print(  # noqa: T201
        "  all runs, jobs/s: raw "
        + ", ".join(f"{rate(r):.0f}" for r in raws)
        + "; sweeper "
        + ", ".join(f"{rate(r):.0f}" for r in swept)
    )
    print(  # noqa: T201
        "  machine CPU busy (2 cores, all processes, this bench's and others'): raw "
        + ", ".join(f"{r.machine_busy:.0f}%" for r in raws)
        + "; sweeper "
        + ", ".join(f"{r.machine_busy:.0f}%" for r in swept)
    )
    print(  # noqa: T201
        f"  CPU per job (us), medians: raw loop: bench process (psycopg) "
        f"{_mid(raws, 'bench_us_per_job'):.0f}, PostgreSQL {_mid(raws, 'postgres_us_per_job'):.0f}"
        f"; sweeper: service {_mid(swept, 'cpu_us_per_job'):.0f}, bench process (the RPC "
        f"gateway stand-in) {_mid(swept, 'bench_us_per_job'):.0f}, PostgreSQL "
        f"{_mid(swept, 'postgres_us_per_job'):.0f}"
    )
    ratios = [rate(s) / rate(r) for r, s in zip(raws, swept, strict=True)]
    print(  # noqa: T201
        f"sweeper vs raw pgmq loop: {middle(ratios):.2f}x "
        f"(median of the back-to-back pairs: {', '.join(f'{x:.2f}' for x in ratios)})"
    )


if __name__ == "__main__":
    main()
