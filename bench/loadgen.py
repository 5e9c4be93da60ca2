"""A lean webhook load generator, run in a process of its own.

The benchmarks' earlier generator (an `httpx.AsyncClient` in the bench's process)
saturated a core before the servers it measured. This one writes raw HTTP/1.1
requests on keep-alive connections with asyncio streams on uvloop, and runs as a
separate process (`python -m bench.loadgen SPEC OUT`), so it costs a fraction of a
core and never shares the measured server's interpreter.

SPEC is a JSON file:

- `{"mode": "burst", "ids": [...], "concurrency": C, ...}` posts one webhook per id
  over C connections, as fast as the server answers;
- `{"mode": "paced", "rate": R, "count": N, "database_url": ..., ...}` enqueues N
  messages at R per second (`pgmq.send`, one transaction each, as an application
  would) and posts each one's webhook as soon as its insert has committed, as
  pg_net would.

Both take `url`, `path` (with `{queue}` filled in), `authorization`, `queue`.
OUT receives `{"started": t, "seconds": s, "statuses": {...}, "sent": {msg_id: t}}`,
times being `time.time()` (the machine's clock, as PostgreSQL's `clock_timestamp()`).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvloop


def webhook_body(queue: str, msg_id: int) -> bytes:
    return json.dumps(
        {
            "type": "INSERT",
            "table": f"q_{queue}",
            "schema": "pgmq",
            "record": {"msg_id": msg_id},
            "old_record": None,
        }
    ).encode()


class Connection:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, host: str, port: int, head: bytes) -> None:
        self._host = host
        self._port = port
        self._head = head  # request line and fixed headers, up to Content-Length
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        self._writer.write(b"%s%d\r\n\r\n%s" % (self._head, len(body), body))
        status_line = await self._reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        close = False
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        payload = await self._reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()
            self._writer = self._reader = None


def _head(spec: dict[str, Any]) -> tuple[str, int, bytes]:
    url = urlsplit(spec["url"])
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = spec["path"].format(queue=spec["queue"])
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Authorization: Bearer {spec['authorization']}\r\n"
        "Content-Type: application/json\r\n"
        "Content-Length: "
    ).encode()
    return host, port, head


def _label(status: int, payload: bytes) -> str:
    try:
        answer = json.loads(payload)
        detail = answer.get("status") or answer.get("error")
    except (ValueError, AttributeError):
        detail = None
    return f"{status} {detail}" if detail else str(status)


async def burst(spec: dict[str, Any]) -> dict[str, Any]:
    host, port, head = _head(spec)
    queue = spec["queue"]
    ids: Iterator[int] = iter(spec["ids"])
    statuses: Counter[str] = Counter()
    sent: dict[int, float] = {}

    async def worker() -> None:
        connection = Connection(host, port, head)
        try:
            for msg_id in ids:  # shared iterator: each id goes to one worker
                body = webhook_body(queue, msg_id)
                sent[msg_id] = time.time()
                status, payload = await connection.post(body)
                statuses[_label(status, payload)] += 1
        finally:
            await connection.close()

    started = time.time()
    await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
    return {
        "started": started,
        "seconds": time.time() - started,
        "statuses": statuses,
        "sent": sent,
    }


async def paced(spec: dict[str, Any]) -> dict[str, Any]:
    import psycopg

    host, port, head = _head(spec)
    queue = spec["queue"]
    statuses: Counter[str] = Counter()
    sent: dict[int, float] = {}
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(spec["concurrency"]):
        idle.put_nowait(Connection(host, port, head))
    async with await psycopg.AsyncConnection.connect(spec["database_url"], autocommit=True) as conn:

        async def one(i: int) -> None:
            cursor = await conn.execute(
                "select pgmq.send(%s, jsonb_build_object('n', %s::int))", [queue, i]
            )
            row = await cursor.fetchone()
            assert row is not None
            msg_id = int(row[0])
            connection = await idle.get()
            try:
                sent[msg_id] = time.time()
                status, payload = await connection.post(webhook_body(queue, msg_id))
                statuses[_label(status, payload)] += 1
            finally:
                idle.put_nowait(connection)

        loop = asyncio.get_running_loop()
        started = loop.time()
        wall = time.time()
        tasks = []
        for i in range(spec["count"]):
            delay = started + i / spec["rate"] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        seconds = loop.time() - started
    while not idle.empty():
        await idle.get_nowait().close()
    return {"started": wall, "seconds": seconds, "statuses": statuses, "sent": sent}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    run = burst if spec["mode"] == "burst" else paced
    result = uvloop.run(run(spec))
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
