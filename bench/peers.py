"""The pull path next to its peers: the same preloaded backlog drained five ways.

Each round drains N no-op jobs, inserted in one transaction, with:

1. a raw pgmq loop: `pgmq.read(q, 30, 100)` + `pgmq.delete(q, ids[])`, psycopg, one
   connection in this process (what the database allows);
2. the service over direct SQL (`DATABASE_URL`), a `queue-worker` process with a
   no-op processor (bench/noop_service.py), its sweeper reading the backlog;
3. the same service over the RPC API (the gateway stand-in, in this process);
4. the official `pgmq` Python client's batch loop (`read_batch(100)` + `delete_batch`);
5. pgqueuer, tuned (`batch_size=100`, drain mode), on its own table, in this process.

The rounds alternate (the machine is shared); the table shows medians, jobs/s,
each runner's ratio to the raw loop of the same round, and database transactions
per job (`pg_stat_database.xact_commit`, read 11 s after each drain, the bench's own
statements subtracted). Peers come from the `bench` dependency group:

    uv sync --group bench
    uv run python -m bench.peers [--messages 20000] [--repeat 3] [--max-concurrency 1000]
        [--batch 500] [--only raw,sql,rpc,pgmq,pgqueuer]

Uses TEST_DATABASE_URL when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import pull_path
from bench.testbed import Probe, empty_queue, enqueue, middle, settle_commits
from tests.support.postgres import OWNER_ROLE, Database, bootstrap, fresh_database, server_url
from tests.support.rpc_gateway import RpcGateway, running_gateway

QUEUE = "email_queue"


@dataclass
class Run:
    name: str
    jobs: int
    seconds: float
    commits_per_job: float
    rpc_per_job: float | None = None
    cpu_us_per_job: float | None = None

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


def counted(db: Database, drain: Callable[[], tuple[float, int]], name: str, jobs: int) -> Run:
    """Runs `drain` (seconds, extra bench statements) between two commit readings."""
    probe = Probe(db)
    try:
        before = probe.commits()
        seconds, extra = drain()
        after = settle_commits(probe)
        commits = after - before - extra - (probe.statements - 1)
    finally:
        probe.close()
    return Run(name, jobs, seconds, commits / jobs)


def raw(db: Database, args: argparse.Namespace) -> Run:
    row = pull_path.raw_pgmq(db, args.messages, 100)
    return Run("raw pgmq read(100) + delete(ids[])", row.jobs, row.seconds, row.commits_per_job)


def service(db: Database, gateway: RpcGateway, args: argparse.Namespace, *, sql: bool) -> Run:
    options = argparse.Namespace(
        messages=args.messages,
        max_concurrency=args.max_concurrency,
        batch=args.batch,
        profile=None,
    )
    overrides = {"database_url": db.url_as(OWNER_ROLE)} if sql else {}
    row = pull_path.service(db, gateway, options, **overrides)
    name = "queue-worker, direct SQL" if sql else "queue-worker, RPC"
    return Run(
        name,
        row.jobs,
        row.seconds,
        row.commits_per_job,
        None if sql else row.rpc_per_job,
        row.cpu_us_per_job,
    )


def pgmq_client(db: Database, args: argparse.Namespace) -> Run:
    from pgmq import PGMQueue  # the bench group's

    empty_queue(db)
    enqueue(db, args.messages)
    client = PGMQueue(conn_string=db.url, init_extension=False, pool_size=1)

    def drain() -> tuple[float, int]:
        started = time.perf_counter()
        done = 0
        while messages := client.read_batch(QUEUE, vt=30, batch_size=100):
            client.delete_batch(QUEUE, [m.msg_id for m in messages])
            done += len(messages)
        seconds = time.perf_counter() - started
        assert done == args.messages, (done, args.messages)
        return seconds, 0

    try:
        return counted(db, drain, "pgmq client read_batch(100) + delete_batch", args.messages)
    finally:
        client.pool.close()


async def _pgqueuer_setup(url: str, jobs: int) -> None:
    import psycopg
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.queries import Queries

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        queries = Queries(PsycopgDriver(conn))
        if not await queries.has_table("pgqueuer"):
            await queries.install()
        await conn.execute("truncate pgqueuer, pgqueuer_log, pgqueuer_statistics")
        await queries.enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)


async def _pgqueuer_drain(url: str, jobs: int) -> float:
    import psycopg
    from pgqueuer import QueueManager
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.models import Job
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        manager = QueueManager(Queries(PsycopgDriver(conn)))
        done = 0

        @manager.entrypoint("noop")
        async def noop(job: Job) -> None:
            nonlocal done
            done += 1

        started = time.perf_counter()
        await manager.run(batch_size=100, mode=QueueExecutionMode.drain)
        seconds = time.perf_counter() - started
    assert done == jobs, (done, jobs)
    return seconds


def pgqueuer(db: Database, args: argparse.Namespace) -> Run:
    asyncio.run(_pgqueuer_setup(db.url, args.messages))

    def drain() -> tuple[float, int]:
        return asyncio.run(_pgqueuer_drain(db.url, args.messages)), 0

    return counted(db, drain, "pgqueuer 1.6, batch_size=100", args.messages)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-concurrency", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500, help="SWEEP_BATCH_SIZE")
    parser.add_argument("--only", default="raw,sql,rpc,pgmq,pgqueuer")
    args = parser.parse_args()
    chosen = args.only.split(",")
    if "raw" not in chosen:
        chosen.insert(0, "raw")  # every ratio is to the raw loop of the same round

    rounds: list[dict[str, Run]] = []
    with server_url() as server, fresh_database(server, prefix="qw_bench") as db:
        bootstrap(db)
        with running_gateway(db) as gateway:
            runners: dict[str, Callable[[], Run]] = {
                "raw": lambda: raw(db, args),
                "sql": lambda: service(db, gateway, args, sql=True),
                "rpc": lambda: service(db, gateway, args, sql=False),
                "pgmq": lambda: pgmq_client(db, args),
                "pgqueuer": lambda: pgqueuer(db, args),
            }
            for _ in range(args.repeat):
                rounds.append({key: runners[key]() for key in chosen})

    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(  # noqa: T201
        f"drain of {args.messages} no-op jobs, {args.repeat} alternating rounds; service "
        f"MAX_CONCURRENCY={args.max_concurrency}, SWEEP_BATCH_SIZE={args.batch}; load at end {load}"
    )
    line = "{:<44}{:>9}{:>9}{:>10}{:>10}{:>9}{:>12}  {}"
    print(line.format("run", "jobs/s", "vs raw", "xact/job", "RPC/job", "CPU us", "", "all runs"))  # noqa: T201
    for key in chosen:
        runs = [r[key] for r in rounds]
        ratios = [r[key].rate / r["raw"].rate for r in rounds]
        med = middle(runs, key=lambda r: r.rate)
        print(  # noqa: T201
            line.format(
                med.name,
                f"{med.rate:.0f}",
                f"{middle(ratios):.2f}x",
                f"{med.commits_per_job:.4f}",
                "-" if med.rpc_per_job is None else f"{med.rpc_per_job:.4f}",
                "-" if med.cpu_us_per_job is None else f"{med.cpu_us_per_job:.0f}",
                "",
                ", ".join(f"{r.rate:.0f}" for r in runs)
                + "; ratios "
                + ", ".join(f"{x:.2f}" for x in ratios),
            )
        )


if __name__ == "__main__":
    main()
