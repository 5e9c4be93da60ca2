"""The two queue backends side by side: Supabase RPC (PostgREST) and direct SQL.

The same N messages are sent, claimed one by one and acked one by one (the runner's
per-message path, without claim/ack batching) at concurrency C, once through
`RpcQueue` (HTTP to the PostgREST-compatible gateway, which runs in this process on
its own thread) and once through `SqlQueue` (psycopg pool, as the role owning pgmq).
Both call the same `queue_worker.*` functions in the same database.

    uv run python -m bench.backends [--messages 2000] [--concurrency 16]

The gateway stand-in shares this process's CPU with the client, so the RPC figures
include its cost, as the real PostgREST's cost would be paid on Supabase's side.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from app.queue.backend import QueueBackend
from app.queue.rpc import RpcQueue, SupabaseRpc
from app.queue.sql import SqlQueue
from tests.support.postgres import OWNER_ROLE, Database, bootstrap, fresh_database, server_url
from tests.support.rpc_gateway import running_gateway

QUEUE = "email_queue"


@asynccontextmanager
async def rpc_backend(url: str, key: str, connections: int) -> AsyncIterator[QueueBackend]:
    client = SupabaseRpc.create_client(
        url,
        {"apikey": key, "Authorization": f"Bearer {key}"},
        timeout=30,
        max_connections=connections,
    )
    async with client:
        yield RpcQueue(SupabaseRpc(client, schema="queue_worker"))


@asynccontextmanager
async def sql_backend(db: Database, connections: int) -> AsyncIterator[QueueBackend]:
    pool = SqlQueue.create_pool(db.url_as(OWNER_ROLE), max_size=connections, timeout=30)
    await pool.open(wait=True)
    try:
        yield SqlQueue(pool, timeout=30)
    finally:
        await pool.close()


async def run(backend: QueueBackend, messages: int, concurrency: int) -> dict[str, float]:
    send: list[float] = []
    claim: list[float] = []
    ack: list[float] = []
    ids: asyncio.Queue[int] = asyncio.Queue()

    async def sender(count: int) -> None:
        for n in range(count):
            started = time.perf_counter()
            ids.put_nowait(await backend.send(QUEUE, {"n": n}))
            send.append(time.perf_counter() - started)

    async def worker() -> None:
        while not ids.empty():
            msg_id = ids.get_nowait()
            started = time.perf_counter()
            claimed = await backend.claim(QUEUE, [msg_id], 30)
            claim.append(time.perf_counter() - started)
            assert claimed, f"message {msg_id} not claimed"
            started = time.perf_counter()
            await backend.ack(QUEUE, [msg_id])
            ack.append(time.perf_counter() - started)

    share = messages // concurrency
    started = time.perf_counter()
    await asyncio.gather(*(sender(share) for _ in range(concurrency)))
    sent = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    done = time.perf_counter()
    total = share * concurrency

    def ms(samples: list[float], q: int) -> float:
        return statistics.quantiles(samples, n=100)[q - 1] * 1000

    return {
        "sends/s": total / (sent - started),
        "claim+ack/s": total / (done - sent),
        "claim p50 ms": ms(claim, 50),
        "claim p95 ms": ms(claim, 95),
        "ack p50 ms": ms(ack, 50),
    }


async def main(messages: int, concurrency: int) -> None:
    with server_url() as server, fresh_database(server, prefix="qw_bench") as db:
        bootstrap(db)
        with running_gateway(db, pool_max_size=concurrency) as gateway:
            results = {}
            for name in ("rpc", "sql", "rpc ", "sql "):  # twice each, interleaved
                if name.strip() == "rpc":
                    context = rpc_backend(gateway.url, gateway.service_role_key, concurrency)
                else:
                    context = sql_backend(db, concurrency)
                async with context as backend:
                    results[name] = await run(backend, messages, concurrency)
    columns = list(next(iter(results.values())))
    print(  # noqa: T201
        f"{messages} messages at concurrency {concurrency}: send, then claim + ack one by one"
    )
    print(f"{'backend':8}" + "".join(f"{c:>14}" for c in columns))  # noqa: T201
    for name, row in results.items():
        print(f"{name:8}" + "".join(f"{row[c]:>14.1f}" for c in columns))  # noqa: T201


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.messages, arguments.concurrency))
