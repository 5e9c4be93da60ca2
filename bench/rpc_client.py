"""CPU the service spends per RPC in its HTTP client (httpx), apart from any server.

The service's RPC client is one pooled `httpx.AsyncClient` (app/queue/rpc.py). This
measures its CPU time per request against a trivial JSON endpoint served by uvicorn
in another process, for a few concurrencies and pool sizes, with the pool warmed to
its size first. It shows why the number of calls matters on a small machine even
when the database is fast: each call costs the client this much, and more the more
connections sit in its pool (httpcore checks every pooled connection on each request).

    uv run python -m bench.rpc_client [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import uvloop

from app.queue.rpc import SupabaseRpc
from bench.testbed import wait_healthy
from tests.support.postgres import ROOT
from tests.support.servers import bound_socket

SERVER = """
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
import uvicorn, sys

async def rpc(request):
    await request.body()
    return Response(b"[1]", media_type="application/json")

async def health(request):
    return Response(b"{}", media_type="application/json")

app = Starlette(routes=[Route("/rest/v1/rpc/ack", rpc, methods=["POST"]),
                        Route("/health", health)])
uvicorn.run(app, port=int(sys.argv[1]), log_level="warning", loop="uvloop", http="httptools")
"""

CASES = ((1, 1), (1, 100), (16, 16), (16, 200), (200, 200))


@contextlib.contextmanager
def endpoint() -> Iterator[str]:
    with contextlib.closing(bound_socket()) as sock:
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, "the endpoint")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


async def measure(url: str, concurrency: int, pool: int, requests: int) -> tuple[float, float]:
    client = SupabaseRpc.create_client(url, {"apikey": "x"}, timeout=10, max_connections=pool)
    async with client:
        rpc = SupabaseRpc(client, schema="queue_worker")
        # Every pooled connection opened once, as after a busy moment.
        await asyncio.gather(*(rpc.call("ack", {"msg_ids": [1]}) for _ in range(pool)))
        limit = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with limit:
                await rpc.call("ack", {"msg_ids": [1]})

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / requests * 1e6, requests / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    rows = []
    with endpoint() as url:
        for concurrency, pool in CASES:
            rows.append(
                (concurrency, pool, *uvloop.run(measure(url, concurrency, pool, args.requests)))
            )
    print(f"{args.requests} RPCs per case; CPU of the client process only")  # noqa: T201
    print("{:>12}{:>10}{:>16}{:>12}".format("concurrency", "pool", "client CPU us", "calls/s"))  # noqa: T201
    for concurrency, pool, cpu_us, rate in rows:
        print(f"{concurrency:>12}{pool:>10}{cpu_us:>16.0f}{rate:>12.0f}")  # noqa: T201


if __name__ == "__main__":
    main()
