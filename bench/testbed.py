"""What the throughput benchmarks share.

The test bed's real components on loopback: PostgreSQL with pgmq
(`TEST_DATABASE_URL` or an embedded server), the PostgREST-compatible RPC gateway
(in this process, on its own thread and event loop, counting calls), the service
as a separate `queue-worker` process with a no-op processor (bench/noop_service.py),
and the load generator as a third process (bench/loadgen.py).

Two probes in the database:
- an ack recorder: a statement-level trigger that notes, for every message deleted
  from `pgmq.q_email_queue`, when (`clock_timestamp()`, inside the deleting
  transaction); it adds no transaction of its own;
- `pg_stat_database.xact_commit` of the bench database, read before and after, with
  the bench's own statements subtracted. Idle backends report their counts up to
  `PGSTAT_IDLE_INTERVAL` (10 s) late, so the second reading waits that long.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from app.config import Settings
from tests.support.postgres import ROOT, Database
from tests.support.process import settings_env
from tests.support.rpc_gateway import RpcGateway
from tests.support.servers import bound_socket
from tests.support.settings import new_webhook_secret, settings_for
from tests.support.waiting import wait_until

QUEUE = "email_queue"
T = TypeVar("T")
STATS_DELAY_SECONDS = 11.0

ACK_RECORDER_SQL = """
create table if not exists public.bench_acks (
  msg_id bigint, enqueued_at timestamptz, acked_at timestamptz
);
create or replace function public.bench_record_acks() returns trigger
language plpgsql security definer set search_path = '' as $$
begin
  insert into public.bench_acks select g.msg_id, g.enqueued_at, pg_catalog.clock_timestamp()
  from gone g;
  return null;
end
$$;
create or replace trigger bench_acks after delete on pgmq.q_email_queue
  referencing old table as gone for each statement
  execute function public.bench_record_acks();
"""


class Probe:
    """The bench's own connection; counts its transactions so they can be subtracted."""

    def __init__(self, db: Database) -> None:
        self.conn = db.connect()
        self.statements = 0

    def value(self, query: str, params: Any = None) -> Any:
        self.statements += 1  # autocommit: one transaction per statement
        row = self.conn.execute(query, params).fetchone()
        return None if row is None else row[0]

    def run(self, query: str) -> None:
        self.statements += 1
        self.conn.execute(query)

    def rows(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        self.statements += 1
        return self.conn.execute(query, params).fetchall()

    def commits(self) -> int:
        return int(
            self.value(
                "select xact_commit from pg_stat_database where datname = current_database()"
            )
        )

    def close(self) -> None:
        self.conn.close()


class MachineCpu:
    """How busy all cores were between `start()` and `busy()` (from /proc/stat).

    The test bed's processes (service, gateway, PostgreSQL, load generator) share
    the machine's cores: near 100% means the run was bound by CPU, not by waiting.
    """

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    def busy(self) -> float:
        busy, total = self._read()
        return (busy - self._start[0]) / max(1, total - self._start[1]) * 100


def cpu_ticks(pid: int) -> int:
    """User and system CPU time of process `pid` so far, in clock ticks (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def run_queue_seconds(pid: int) -> float:
    """Time the threads of `pid` have spent runnable but waiting for a CPU, so far.

    The second field of /proc/<pid>/task/<tid>/schedstat (nanoseconds): scheduler
    delay, which grows when other processes compete for the cores.
    """
    waited = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            waited += int((task / "schedstat").read_text().split()[1])
    return waited / 1e9


class PostgresCpu:
    """CPU time (user + system) this machine's PostgreSQL processes used since it was made.

    Read per process from /proc, which lists only live ones: a backend that exits
    meanwhile takes its time with it, so the figure is a lower bound (the measured
    runs keep their connections open). Meaningful when the database server runs on
    this machine (the machine's PostgreSQL, or the embedded one).
    """

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> dict[int, int]:
        ticks: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
                if (entry / "comm").read_text().strip() == "postgres":
                    ticks[int(entry.name)] = cpu_ticks(int(entry.name))
        return ticks

    def seconds(self) -> float:
        now = self._read()
        used = sum(t - self._start.get(pid, 0) for pid, t in now.items())
        return used / os.sysconf("SC_CLK_TCK")


def install_ack_recorder(db: Database) -> None:
    with db.connect() as conn:
        conn.execute(ACK_RECORDER_SQL)


def enqueue(db: Database, count: int) -> list[int]:
    """`count` email messages in one statement; their ids."""
    with db.connect() as conn:
        rows = conn.execute(
            "select pgmq.send('email_queue', jsonb_build_object('n', i)) "
            "from generate_series(1, %s) i",
            [count],
        ).fetchall()
    return [int(row[0]) for row in rows]


def empty_queue(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("truncate pgmq.q_email_queue, pgmq.a_email_queue")
        if conn.execute("select to_regclass('public.bench_acks')").fetchone() != (None,):
            conn.execute("truncate public.bench_acks")
        conn.execute("vacuum analyze pgmq.q_email_queue")


def bench_settings(gateway: RpcGateway, **overrides: Any) -> Settings:
    with contextlib.closing(bound_socket()) as sock:
        port = sock.getsockname()[1]
    values: dict[str, Any] = {
        "supabase_url": gateway.url,
        "supabase_service_role_key": gateway.service_role_key,
        "webhook_secret": new_webhook_secret(),
        "smtp_host": "127.0.0.1",  # never contacted: the processor is a no-op
        "mail_from": "bench@example.com",
        "queues": [QUEUE],
        "host": "127.0.0.1",
        "port": port,
        "log_level": "WARNING",
    }
    return settings_for(**{**values, **overrides})


@dataclass
class Server:
    """A server process of the bench: its URL and what /proc says about it."""

    url: str
    pid: int

    def cpu_seconds(self) -> float:
        """User and system CPU time the process has used so far."""
        return cpu_ticks(self.pid) / os.sysconf("SC_CLK_TCK")

    def run_queue_seconds(self) -> float:
        """Time the process's threads have spent runnable but waiting for a CPU."""
        return run_queue_seconds(self.pid)

    def peak_rss_mb(self) -> float:
        """The process's peak resident memory so far (VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")


@dataclass
class RunningService(Server):
    settings: Settings

    @property
    def secret(self) -> str:
        return self.settings.webhook_secret.get_secret_value()


def wait_healthy(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=30, what=what)


@contextlib.contextmanager
def noop_service(settings: Settings, profile: Path | None = None) -> Iterator[RunningService]:
    """`python -m bench.noop_service` with `settings` in its environment.

    With `profile`, SIGUSR1/SIGUSR2 start and stop cProfile in it (bench/noop_service.py).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "SUPABASE_"))}
    env.update(settings_env(settings))
    if profile is not None:
        env["BENCH_PROFILE"] = str(profile)
    env["QUEUES"] = ",".join(settings.queues or [])
    env["PYTHONPATH"] = str(ROOT)
    process = subprocess.Popen([sys.executable, "-m", "bench.noop_service"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{settings.port}"
    try:
        wait_healthy(url, process, "the service")
        yield RunningService(url, process.pid, settings)
    finally:
        process.terminate()
        process.wait(timeout=60)


@contextlib.contextmanager
def bare_process() -> Iterator[Server]:
    """bench/bare_app.py under uvicorn with the CLI's loop and parser."""
    with contextlib.closing(bound_socket()) as sock:
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bare_app:app",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, "the bare app")
        yield Server(url, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


def loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs bench/loadgen.py in its own process; its result."""
    with tempfile.TemporaryDirectory(prefix="qw-loadgen-") as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps({"queue": QUEUE, "path": "/webhooks/{queue}", **spec}))
        subprocess.run(
            [sys.executable, "-m", "bench.loadgen", str(spec_path), str(out_path)],
            cwd=ROOT,
            check=True,
        )
        result: dict[str, Any] = json.loads(out_path.read_text())
    result["sent"] = {int(k): v for k, v in result["sent"].items()}
    return result


def wait_empty(probe: Probe, *, interval: float = 0.02, timeout: float = 600.0) -> None:
    """Until the queue is empty (every message acked).

    `exists` stops at the first live row: a tenth of a millisecond, where a
    `count(*)` of 50,000 rows took 4 ms, a fifth of a core at this polling rate,
    taken from the system being measured.
    """
    deadline = time.monotonic() + timeout
    while probe.value("select exists (select 1 from pgmq.q_email_queue)"):
        if time.monotonic() > deadline:
            raise RuntimeError("the queue did not drain")
        time.sleep(interval)


def wait_drained(probe: Probe, count: int, timeout: float = 600.0) -> None:
    """Until the queue is empty and the ack recorder has all `count` acks."""
    wait_empty(probe, interval=0.05, timeout=timeout)
    acked = probe.value("select count(*) from public.bench_acks")
    if acked != count:
        raise RuntimeError(f"{acked} acks recorded for {count} messages")


def middle(values: Iterable[T], key: Callable[[T], Any] | None = None) -> T:
    """The middle one of the runs (of an even number, the upper middle), by `key`."""
    ordered = sorted(values, key=key)  # type: ignore[arg-type, type-var]
    return ordered[len(ordered) // 2]


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def settle_commits(probe: Probe) -> int:
    """xact_commit once idle backends have reported (see module docstring)."""
    time.sleep(STATS_DELAY_SECONDS)
    return probe.commits()
