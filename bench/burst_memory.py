"""Peak memory of the service during a burst of webhooks, next to a bare FastAPI endpoint.

Both run as real `uvicorn` processes on loopback; the bench posts N webhooks (default
10,000) at concurrency C for messages that really are in the queue (with the lean load
generator of bench/loadgen.py, in a process of its own), and reads each
process's peak RSS (VmHWM) from /proc. The service runs with its default
MAX_CONCURRENCY, so webhooks beyond it are deferred to the sweeper instead of held
in memory.

    uv run python -m bench.burst_memory [--webhooks 10000] [--concurrency 200]

Uses TEST_DATABASE_URL when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
from collections import Counter
from pathlib import Path

from bench.testbed import Server, bare_process, loadgen
from tests.support.postgres import bootstrap, fresh_database, server_url
from tests.support.process import ServiceProcess
from tests.support.rpc_gateway import running_gateway
from tests.support.settings import settings_against
from tests.support.smtp import running_smtp


def burst(url: str, secret: str, ids: list[int], concurrency: int) -> tuple[float, Counter[str]]:
    """The webhooks, from the lean load generator in a process of its own."""
    result = loadgen(
        {
            "mode": "burst",
            "url": url,
            "authorization": secret,
            "ids": ids,
            "concurrency": concurrency,
        }
    )
    return result["seconds"], Counter(result["statuses"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webhooks", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()

    rows: list[tuple[str, int, float, float, float, str]] = []
    with server_url() as server, fresh_database(server, prefix="qw_bench") as db:
        bootstrap(db)
        with db.connect() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    "select pgmq.send('email_queue', jsonb_build_object("
                    "'to', 'u' || i || '@example.com', 'subject', 's' || i, 'text', 'x')) "
                    "from generate_series(1, %s) i",
                    [args.webhooks],
                ).fetchall()
            ]
        with bare_process() as bare:
            idle = bare.peak_rss_mb()
            seconds, statuses = burst(bare.url, "unused", ids, args.concurrency)
            rows.append(
                (
                    "bare FastAPI endpoint",
                    len(ids),
                    seconds,
                    idle,
                    bare.peak_rss_mb(),
                    ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
                )
            )
        with (
            running_gateway(db) as gateway,
            running_smtp(username="bench", password=secrets.token_urlsafe(16)) as smtp,
            tempfile.TemporaryDirectory() as tmp,
        ):
            settings = settings_against(
                gateway, smtp, mail_from="bench@example.com", log_level="WARNING"
            )
            service = ServiceProcess(settings, Path(tmp))
            service.start()
            process = Server(service.url, service.pid)
            try:
                idle = process.peak_rss_mb()
                secret = settings.webhook_secret.get_secret_value()
                seconds, statuses = burst(service.url, secret, ids, args.concurrency)
                rows.append(
                    (
                        "queue-worker",
                        len(ids),
                        seconds,
                        idle,
                        process.peak_rss_mb(),
                        ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
                    )
                )
            finally:
                service.stop()

    print(f"burst of {args.webhooks} webhooks at concurrency {args.concurrency}")  # noqa: T201
    columns = ("app", "requests", "seconds", "req/s", "RSS idle MB", "peak RSS MB", "answers")
    print("{:<24}{:>10}{:>9}{:>9}{:>13}{:>13}  {}".format(*columns))  # noqa: T201
    for name, count, seconds, idle_mb, peak_mb, answers in rows:
        cells = (
            name,
            count,
            f"{seconds:.1f}",
            f"{count / seconds:.0f}",
            f"{idle_mb:.1f}",
            f"{peak_mb:.1f}",
            answers,
        )
        print("{:<24}{:>10}{:>9}{:>9}{:>13}{:>13}  {}".format(*cells))  # noqa: T201


if __name__ == "__main__":
    main()
