"""The service's two queue backends, opened against the test bed as the service opens them.

`open_backend("rpc", db, gateway)` talks to the RPC gateway stand-in with the
service_role key; `open_backend("sql", ...)` connects to PostgreSQL directly as the
migrations' owner (DATABASE_URL). Both yield the queue backend and its RPC caller
(for SQL, the same object).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from app.queue.backend import QueueBackend, RpcCaller
from app.queue.rpc import RpcQueue, SupabaseRpc
from app.queue.sql import SqlQueue
from tests.support.postgres import OWNER_ROLE, Database
from tests.support.rpc_gateway import RpcGateway

KINDS = ("rpc", "sql")


@contextlib.asynccontextmanager
async def open_backend(
    kind: str, db: Database, gateway: RpcGateway, *, pool_size: int = 2
) -> AsyncIterator[tuple[QueueBackend, RpcCaller]]:
    if kind == "rpc":
        key = gateway.service_role_key
        client = SupabaseRpc.create_client(
            gateway.url, {"apikey": key, "Authorization": f"Bearer {key}"}, timeout=10
        )
        async with client:
            rpc = SupabaseRpc(client, schema="queue_worker")
            yield RpcQueue(rpc), rpc
        return
    if kind != "sql":
        raise ValueError(f"no backend {kind!r}: one of {KINDS}")
    pool = SqlQueue.create_pool(db.url_as(OWNER_ROLE), max_size=pool_size, timeout=10)
    await pool.open(wait=True)
    try:
        queue = SqlQueue(pool, schema="queue_worker", timeout=10)
        yield queue, queue
    finally:
        await pool.close()
