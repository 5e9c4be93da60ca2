"""The Supabase RPC client: PostgREST functions in the worker's schema over HTTP.

One `httpx.AsyncClient` per process, created in the lifespan. Every call is one
database transaction on the server, so callers pass arrays of ids.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import httpx
from pydantic import TypeAdapter

from app import __version__, metrics
from app.queue.backend import ArchivedMessage, DeadAction, DeadBatch, DeadFilter, QueueMetrics
from app.queue.models import QueueMessage
from app.queue.rows import parse_archived, parse_reply

T = TypeVar("T")


class RpcError(Exception):
    """An RPC that failed: an HTTP error answer, or no answer at all.

    `status` is None when the request never got an answer (connection refused,
    timeout). `code`, `message`, `details` and `hint` come from PostgREST's error
    body when there is one.
    """

    def __init__(
        self,
        function: str,
        status: int | None,
        message: str,
        *,
        code: str | None = None,
        details: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.function = function
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.hint = hint
        where = f"HTTP {status}" if status is not None else "no response"
        label = f"{code}: " if code else ""
        super().__init__(f"rpc {function} failed ({where}): {label}{message}")

    @property
    def transient(self) -> bool:
        """True when trying again later may succeed (network, 5xx, 408, 429)."""
        return self.status is None or self.status >= 500 or self.status in (408, 429)


class SupabaseRpc:
    """Calls `POST {SUPABASE_URL}/rest/v1/rpc/<function>` in one schema."""

    def __init__(self, client: httpx.AsyncClient, *, schema: str) -> None:
        self._client = client
        self._schema = schema

    @staticmethod
    def create_client(
        base_url: str, headers: dict[str, str], *, timeout: float, max_connections: int = 100
    ) -> httpx.AsyncClient:
        """The process's one HTTP client for Supabase, with keep-alive pooling."""
        _record_missing_sniffio()
        return httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/rest/v1/rpc/",
            headers={
                **headers,
                "User-Agent": f"queue-worker/{__version__}",
                "Accept": "application/json",
            },
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def call(self, function: str, args: dict[str, Any]) -> Any:
        """Calls `function` with named arguments; returns the decoded JSON (None for 204)."""
        return await self._timed(function, args, json.loads)

    async def call_as(self, function: str, args: dict[str, Any], shape: TypeAdapter[T]) -> T | None:
        """Like `call`, validated into `shape` straight from the response's bytes (None for 204).

        For the queue's hot calls: one pass over the bytes instead of decoding to
        dicts and then building models from them.
        """
        return await self._timed(function, args, shape.validate_json)

    async def call_with(
        self, function: str, args: dict[str, Any], parse: Callable[[bytes], T]
    ) -> T | None:
        """Like `call`, the response's bytes read by `parse` (None for 204).

        `parse` raises ValueError for a body it cannot read.
        """
        return await self._timed(function, args, parse)

    async def _timed(
        self, function: str, args: dict[str, Any], parse: Callable[[bytes], T]
    ) -> T | None:
        started = time.perf_counter()
        result = "error"
        try:
            value = await self._call(function, args, parse)
            result = "ok"
            return value
        finally:
            metrics.RPC_CALLS.labels(function, result).inc()
            metrics.RPC_DURATION.labels(function).observe(time.perf_counter() - started)

    async def _call(
        self, function: str, args: dict[str, Any], parse: Callable[[bytes], T]
    ) -> T | None:
        try:
            response = await self._client.post(
                function, json=args, headers={"Content-Profile": self._schema}
            )
        except httpx.HTTPError as error:
            raise RpcError(function, None, f"{type(error).__name__}: {error}") from error
        if response.status_code == 204:
            return None
        if response.is_success:
            try:
                return parse(response.content)
            except ValueError as error:  # pydantic's ValidationError is one too
                raise RpcError(
                    function, response.status_code, "response is not the expected JSON"
                ) from error
        raise _error_from(function, response)


def _record_missing_sniffio() -> None:
    """Makes httpcore's probe for sniffio cheap when sniffio is not installed.

    httpcore tries `import sniffio` (to tell trio from asyncio) whenever it creates a
    lock or an event, several times per request. A failed import is not remembered:
    each attempt searches sys.path again, about 140 us, which made the search a
    leading cost of every RPC. A None entry in sys.modules makes the import fail at
    once, and httpcore then assumes asyncio, as it does anyway without sniffio.
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def _error_from(function: str, response: httpx.Response) -> RpcError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return RpcError(
            function,
            response.status_code,
            str(body.get("message") or response.reason_phrase),
            code=body.get("code"),
            details=body.get("details"),
            hint=body.get("hint"),
        )
    return RpcError(function, response.status_code, response.reason_phrase or "error")


_IDS = TypeAdapter(list[int])


class RpcQueue:
    """`QueueBackend` over the Supabase RPC functions in supabase/migrations."""

    def __init__(self, rpc: SupabaseRpc) -> None:
        self._rpc = rpc

    async def claim(self, queue: str, msg_ids: Sequence[int], vt: int) -> list[QueueMessage]:
        # parse_reply: one pass over the bytes, or row by row when a row spoils it.
        args = {"queue_name": queue, "msg_ids": list(msg_ids), "vt": vt}
        return await self._rpc.call_with("claim", args, parse_reply) or []

    async def read(self, queue: str, vt: int, qty: int) -> list[QueueMessage]:
        args = {"queue_name": queue, "vt": vt, "qty": qty}
        return await self._rpc.call_with("read", args, parse_reply) or []

    async def ack(self, queue: str, msg_ids: Sequence[int]) -> list[int]:
        args = {"queue_name": queue, "msg_ids": list(msg_ids)}
        return await self._rpc.call_as("ack", args, _IDS) or []

    async def set_vt(self, queue: str, msg_ids: Sequence[int], vt: int) -> list[int]:
        ids = await self._rpc.call(
            "set_vt", {"queue_name": queue, "msg_ids": list(msg_ids), "vt": vt}
        )
        return [int(i) for i in ids]

    async def archive(
        self, queue: str, msg_ids: Sequence[int], errors: Mapping[int, dict[str, Any]]
    ) -> list[int]:
        ids = await self._rpc.call(
            "archive",
            {
                "queue_name": queue,
                "msg_ids": list(msg_ids),
                "errors": {str(msg_id): error for msg_id, error in errors.items()},
            },
        )
        return [int(i) for i in ids]

    async def send(
        self,
        queue: str,
        message: dict[str, Any],
        delay_seconds: int = 0,
        headers: dict[str, Any] | None = None,
    ) -> int:
        args = {"queue_name": queue, "message": message, "delay_seconds": delay_seconds}
        if headers is not None:
            args["headers"] = headers
        msg_id = await self._rpc.call("send", args)
        return int(msg_id)

    async def metrics(self) -> list[QueueMetrics]:
        rows = await self._rpc.call("metrics", {})
        return [QueueMetrics.model_validate(row) for row in rows]

    async def archived(
        self, queue: str, limit: int, before_id: int | None = None
    ) -> list[ArchivedMessage]:
        args = {"queue_name": queue, "max_rows": limit, "before_id": before_id}
        return await self._rpc.call_with("archived", args, parse_archived) or []

    async def replay(self, queue: str, msg_id: int) -> int | None:
        new_id = await self._rpc.call("replay", {"queue_name": queue, "msg_id": msg_id})
        return None if new_id is None else int(new_id)

    async def set_paused(self, queue: str, paused: bool) -> bool:
        changed = await self._rpc.call("pause" if paused else "resume", {"queue_name": queue})
        return bool(changed)

    async def paused(self) -> dict[str, datetime]:
        rows = await self._rpc.call("paused_queues", {})
        return {row["queue_name"]: datetime.fromisoformat(row["paused_at"]) for row in rows}

    async def dead_letter_counts(self) -> dict[str, int]:
        rows = await self._rpc.call("dead_letter_counts", {})
        return {row["queue_name"]: int(row["dead_letters"]) for row in rows}

    async def dead_batch(
        self,
        action: DeadAction,
        queue: str,
        after_id: int,
        max_rows: int,
        where: DeadFilter,
        up_to_id: int | None = None,
    ) -> DeadBatch:
        args = {
            "queue_name": queue,
            "after_id": after_id,
            "max_rows": max_rows,
            "error_text": where.error_text,
            "archived_from": _iso(where.archived_from),
            "archived_to": _iso(where.archived_to),
            "up_to_id": up_to_id,
        }
        [row] = await self._rpc.call(f"{action}_dead", args)
        return _dead_batch(row)

    async def expire_dead(self, queue: str, older_than: datetime, max_rows: int) -> int:
        args = {"queue_name": queue, "older_than": older_than.isoformat(), "max_rows": max_rows}
        return int(await self._rpc.call("expire_dead", args))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _dead_batch(row: Mapping[str, Any]) -> DeadBatch:
    last = row["last_id"]
    return DeadBatch(int(row["scanned"]), int(row["affected"]), None if last is None else int(last))
