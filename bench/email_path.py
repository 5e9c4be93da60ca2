"""The email path end to end: one transaction of mails, webhooks, SMTP, acks.

N email jobs are enqueued in one transaction (`pgmq.send` as the queue's owner, so the
webhook trigger runs for each row); the pg_net stand-in's sender (tests/support/pg_net.py:
passes of 200, up to a second apart) rings the service's doorbell for each; the service
runs as `queue-worker` does (app.cli: uvloop, httptools) with **default settings** and
the real email processor, against the RPC gateway stand-in and the test bed's STARTTLS +
AUTH SMTP server (SMTP_MAX_CONNECTIONS=4, the default).

Reported per run: mails/s (first enqueue to last ack, both timed in the database), RPC
calls per job in all and by function (counted at the gateway until the sender is idle,
so the claims of late webhooks count), p50/p99 enqueue-to-ack (the ack recorder of
bench/testbed.py), duplicates (mails received more than once) and the service
process's CPU per mail (until the sender is idle). Next to it, the
ceiling of the SMTP side alone: the service's `Mailer` (as bench/email_send.py runs it)
sending the same number of mails at concurrency MAX_CONCURRENCY through the same server.

    uv run python -m bench.email_path [--mails 2000] [--repeat 3] [--rpc-latency-ms 40]
        [--compare-latency]

With `--rpc-latency-ms N` the gateway adds N ms to every RPC (half each way); with
`--compare-latency` each round runs at 0 ms and at N ms, alternating, and prints the
ratio. Uses TEST_DATABASE_URL when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

from app.mail import Address, Mail, Mailer
from bench.email_send import settings as mail_settings
from bench.testbed import (
    QUEUE,
    Probe,
    cpu_ticks,
    install_ack_recorder,
    middle,
    percentile,
    wait_empty,
)
from tests.support.pg_net import PgNetSender, running_sender
from tests.support.postgres import Database, bootstrap, fresh_database, server_url
from tests.support.process import service_process
from tests.support.rpc_gateway import RpcGateway, running_gateway
from tests.support.settings import settings_against
from tests.support.smtp import SmtpServer, running_smtp


@dataclass
class Row:
    name: str
    mails: int
    seconds: float
    p50_ms: float
    p99_ms: float
    calls: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    webhooks: int = 0
    load: str = ""
    cpu_ms_per_mail: float = 0.0  # the service process's own CPU

    @property
    def rate(self) -> float:
        return self.mails / self.seconds

    @property
    def rpc_per_job(self) -> float:
        return sum(self.calls.values()) / self.mails


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def enqueue_mails(db: Database, count: int, run: int) -> None:
    with db.connect(role="qw_postgres") as conn:
        conn.execute(
            """
            select pgmq.send('email_queue', jsonb_build_object(
                     'to', 'user' || i || '@example.com',
                     'subject', %s || '-' || i,
                     'text', 'message ' || i))
            from generate_series(1, %s) as i
            """,
            [f"run{run}", count],
        )


def reset(db: Database) -> None:
    with db.connect() as conn:
        conn.execute(f"truncate pgmq.q_{QUEUE}, pgmq.a_{QUEUE}, public.bench_acks")
        conn.execute("truncate net._http_response")
        conn.execute(f"vacuum analyze pgmq.q_{QUEUE}")


def register(db: Database, url: str, secret: str) -> None:
    with db.connect() as conn:
        conn.execute("delete from vault.secrets where name like 'queue_worker_%'")
        conn.execute("select vault.create_secret(%s, 'queue_worker_url')", [url])
        conn.execute("select vault.create_secret(%s, 'queue_worker_webhook_secret')", [secret])


def one_run(
    db: Database,
    gateway: RpcGateway,
    sender: PgNetSender,
    smtp: SmtpServer,
    mails: int,
    latency_ms: float,
    run: int,
) -> Row:
    reset(db)
    smtp.clear()
    gateway.set_latency(0.0)
    settings = settings_against(
        gateway, smtp, queues=[QUEUE], log_level="WARNING", mail_from="bench@example.com"
    )
    with service_process(settings, console_script=True) as service:
        register(db, service.url, settings.webhook_secret.get_secret_value())
        time.sleep(1.0)  # the first sweep (of the empty queue) is over
        gateway.set_latency(latency_ms / 1000)
        gateway.reset_counters()
        sent_before = sender.sent
        load = loadavg()
        cpu_before = cpu_ticks(service.pid)
        enqueue_mails(db, mails, run)
        probe = Probe(db)
        try:
            wait_empty(probe, interval=0.05)
            sender.wait_idle(timeout=60)
            time.sleep(0.5)  # the claims of the last webhooks
            calls = {name.split(".", 1)[1]: n for name, n in gateway.calls.items()}
            cpu = (cpu_ticks(service.pid) - cpu_before) / os.sysconf("SC_CLK_TCK")
            rows = probe.rows(
                "select extract(epoch from enqueued_at)::float8, "
                "extract(epoch from acked_at)::float8 from public.bench_acks"
            )
        finally:
            probe.close()
        gateway.set_latency(0.0)
    if len(rows) != mails:
        raise RuntimeError(f"{len(rows)} acks recorded for {mails} mails")
    subjects = Counter(str(m["Subject"]) for m in smtp.messages)
    if len(subjects) != mails:
        raise RuntimeError(f"{len(subjects)} distinct mails received for {mails}")
    latencies = [(acked - enqueued) * 1000 for enqueued, acked in rows]
    seconds = max(a for _, a in rows) - min(e for e, _ in rows)
    return Row(
        f"{latency_ms:g} ms added per RPC",
        mails,
        seconds,
        percentile(latencies, 50),
        percentile(latencies, 99),
        calls,
        sum(n - 1 for n in subjects.values()),
        sender.sent - sent_before,
        load,
        cpu / mails * 1000,
    )


async def ceiling(smtp: SmtpServer, mails: int, concurrency: int) -> float:
    """Mails/s of the service's Mailer alone (default settings) at `concurrency`."""
    mailer = Mailer(mail_settings(smtp))
    limit = asyncio.Semaphore(concurrency)

    async def one(n: int) -> None:
        async with limit:
            await mailer.send(
                Mail(to=[Address("a@example.com")], subject=f"Ceiling {n}", text="message")
            )

    await one(-1)  # first session, TLS context
    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(mails)))
    seconds = time.perf_counter() - started
    await mailer.close()
    return mails / seconds


def print_rows(title: str, rows: list[Row]) -> None:
    print(title)  # noqa: T201
    print(  # noqa: T201
        f"{'run':24} {'mails':>6} {'seconds':>8} {'mails/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'RPC/job':>8} {'dups':>5} {'CPU ms':>7}  load   calls by function"
    )
    for row in rows:
        calls = ", ".join(f"{k} {v}" for k, v in sorted(row.calls.items()))
        print(  # noqa: T201
            f"{row.name:24} {row.mails:6d} {row.seconds:8.2f} {row.rate:8.1f} "
            f"{row.p50_ms:8.0f} {row.p99_ms:8.0f} {row.rpc_per_job:8.3f} {row.duplicates:5d} "
            f"{row.cpu_ms_per_mail:7.2f}  "
            f"{row.load}  {calls}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rpc-latency-ms", type=float, default=0.0)
    parser.add_argument(
        "--compare-latency",
        action="store_true",
        help="each round at 0 ms and at --rpc-latency-ms, alternating",
    )
    parser.add_argument("--ceiling-mails", type=int, default=500)
    args = parser.parse_args()
    latencies = [0.0, args.rpc_latency_ms] if args.compare_latency else [args.rpc_latency_ms]

    with (
        server_url() as server,
        fresh_database(server, prefix="qw_bench") as db,
        running_smtp(mode="starttls", username="bench", password=secrets.token_urlsafe(16)) as smtp,
    ):
        bootstrap(db)
        install_ack_recorder(db)
        runs: dict[float, list[Row]] = {ms: [] for ms in latencies}
        ceilings: list[float] = []
        with running_gateway(db) as gateway, running_sender(db) as sender:
            for run in range(args.repeat):
                for ms in latencies:
                    runs[ms].append(one_run(db, gateway, sender, smtp, args.mails, ms, run))
                smtp.clear()
                ceilings.append(asyncio.run(ceiling(smtp, args.ceiling_mails, 16)))
        title = (
            f"{args.mails} mails enqueued in one transaction, webhooks from the pg_net "
            f"stand-in, STARTTLS SMTP, default settings; {args.repeat} alternating runs"
        )
        in_order = [rows[r] for r in range(args.repeat) for rows in runs.values()]
        print_rows(title, in_order)
        print("medians:")  # noqa: T201
        print_rows("", [middle(rows, key=lambda r: r.rate) for rows in runs.values()])
        print(  # noqa: T201
            f"  SMTP ceiling (Mailer alone, {args.ceiling_mails} mails at concurrency 16, "
            f"4 sessions): {', '.join(f'{c:.0f}' for c in ceilings)} mails/s; "
            f"median {middle(ceilings):.0f}"
        )
        for ms, rows in runs.items():
            med = middle(rows, key=lambda r: r.rate)
            by_fn: Counter[str] = Counter()
            for row in rows:
                by_fn.update(row.calls)
            per_fn = ", ".join(
                f"{k} {v / (len(rows) * args.mails):.4f}" for k, v in sorted(by_fn.items())
            )
            print(  # noqa: T201
                f"  {ms:g} ms: {med.rate:.0f} mails/s median ({med.rate / middle(ceilings):.2f}x "
                f"the ceiling); RPC/job by function (all runs): {per_fn}"
            )
        if args.compare_latency:
            pairs = zip(runs[0.0], runs[latencies[1]], strict=True)
            ratios = [far.rate / near.rate for near, far in pairs]
            print(  # noqa: T201
                f"  {latencies[1]:g} ms vs 0 ms: {middle(ratios):.2f}x "
                f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})"
            )


if __name__ == "__main__":
    main()
