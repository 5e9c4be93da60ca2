"""The direct SQL backend: the worker's functions called over a PostgreSQL connection pool.

The same functions as the RPC path (`queue_worker.claim`, `ack`, ... in
supabase/migrations), called with psycopg instead of through PostgREST: no HTTP
and no API gateway in between, one round trip per call. Used with `DATABASE_URL`
(a Supabase direct or pooler connection string) and in local mode (the embedded
PostgreSQL). One pool per process, created in the lifespan.

Failures raise `RpcError` with the status PostgREST would have answered for the
same SQLSTATE, so the runner, the settler and the processors treat both backends
alike (`transient` means the same thing). A connection that cannot be had or is
lost has no status, like a request that got no response.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, LiteralString

import psycopg
from psycopg import sql
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.rows import RowFactory, dict_row, tuple_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app import metrics
from app.queue.backend import ArchivedMessage, DeadAction, DeadBatch, DeadFilter, QueueMetrics
from app.queue.models import QueueMessage
from app.queue.rows import archived_from_columns, parse_reply
from app.queue.rpc import RpcError

# Function names callers may pass to `call()`; anything else never reaches SQL.
FUNCTION_NAME: Final = re.compile(r"[a-z_][a-z0-9_]*")

# What `call()` needs to know about a function, read from the catalog like
# PostgREST's schema cache: its input parameters and the shape of its result.
CATALOG_QUERY: Final = """
select p.pronargdefaults::int as n_defaults,
       p.proretset as returns_set,
       p.prorettype = 'pg_catalog.void'::pg_catalog.regtype as returns_void,
       (rt.typtype = 'c' or p.prorettype = 'pg_catalog.record'::pg_catalog.regtype)
         as returns_composite,
       coalesce((
         select pg_catalog.json_agg(pg_catalog.json_build_object(
                  'name', coalesce(a.name, ''),
                  'type', pg_catalog.format_type(a.type, null),
                  'mode', coalesce(a.mode::text, 'i')) order by a.ord)
         from rows from (
                pg_catalog.unnest(coalesce(p.proallargtypes, p.proargtypes::pg_catalog.oid[])),
                pg_catalog.unnest(p.proargnames),
                pg_catalog.unnest(p.proargmodes)
              ) with ordinality as a(type, name, mode, ord)
       ), '[]') as args
from pg_catalog.pg_proc p
join pg_catalog.pg_namespace n on n.oid = p.pronamespace
join pg_catalog.pg_type rt on rt.oid = p.prorettype
where n.nspname = %s and p.proname = %s and p.prokind = 'f'
"""

# PostgREST's SQLSTATE-to-HTTP table (PostgREST.Error), for a caller that is
# authenticated (the worker always is). Exact codes first, then classes.
_EXACT_STATUS: Final = {
    "23503": 409,
    "23505": 409,
    "25006": 405,
    "42501": 403,
    "42883": 404,
    "42P01": 404,
    "42P17": 500,
    "53400": 500,
    "57P01": 503,
    "P0001": 400,
}
_CLASS_STATUS: Final = {
    "08": 503,
    "09": 500,
    "0L": 403,
    "0P": 403,
    "25": 500,
    "28": 403,
    "2D": 500,
    "38": 500,
    "39": 500,
    "3B": 500,
    "40": 500,
    "53": 503,
    "54": 500,
    "55": 500,
    "57": 500,
    "58": 500,
    "F0": 500,
    "HV": 500,
    "P0": 500,
    "XX": 500,
}


def status_for_sqlstate(sqlstate: str) -> int:
    """The HTTP status PostgREST answers for an error with this SQLSTATE."""
    if sqlstate in _EXACT_STATUS:
        return _EXACT_STATUS[sqlstate]
    if sqlstate.startswith("PT"):
        # RAISE ... USING ERRCODE = 'PT402' lets a function choose its status.
        digits = sqlstate[2:]
        return int(digits) if digits.isdigit() and 100 <= int(digits) <= 599 else 500
    return _CLASS_STATUS.get(sqlstate[:2], 400)


def _error(function: str, error: BaseException, timeout: float) -> RpcError:
    if isinstance(error, PoolTimeout):
        # Either the database is unreachable or every connection is busy; both pass.
        return RpcError(function, None, f"no database connection within {timeout:g}s")
    if isinstance(error, TimeoutError):
        return RpcError(function, None, f"no answer within {timeout:g}s")
    assert isinstance(error, psycopg.Error)
    sqlstate = error.sqlstate
    if sqlstate is None or sqlstate.startswith("08"):
        # The connection failed or was lost: no answer, as a refused HTTP request.
        return RpcError(function, None, f"{type(error).__name__}: {str(error).strip()}")
    diag = error.diag
    return RpcError(
        function,
        status_for_sqlstate(sqlstate),
        diag.message_primary or str(error),
        code=sqlstate,
        details=diag.message_detail,
        hint=diag.message_hint,
    )


@dataclass(frozen=True)
class _Param:
    name: str
    type: str  # format_type(): schema-qualified unless in pg_catalog
    required: bool
    variadic: bool


@dataclass(frozen=True)
class _Routine:
    params: tuple[_Param, ...]
    returns_set: bool
    returns_void: bool
    returns_composite: bool

    def accepts(self, keys: frozenset[str]) -> bool:
        """PostgREST's rule: every required parameter given, nothing unknown given."""
        if any(p.name == "" for p in self.params):
            return False  # unnamed parameters cannot be bound by name
        required = {p.name for p in self.params if p.required}
        return required <= keys <= {p.name for p in self.params}


def _routine(row: Mapping[str, Any]) -> _Routine:
    # Input parameters are modes i, b (inout) and v (variadic); the defaults
    # belong to the last `pronargdefaults` of them.
    inputs = [a for a in row["args"] if a["mode"] in ("i", "b", "v")]
    first_optional = len(inputs) - int(row["n_defaults"])
    return _Routine(
        params=tuple(
            _Param(a["name"], a["type"], index < first_optional, a["mode"] == "v")
            for index, a in enumerate(inputs)
        ),
        returns_set=bool(row["returns_set"]),
        returns_void=bool(row["returns_void"]),
        returns_composite=bool(row["returns_composite"]),
    )


def _call_query(
    schema: str, function: str, routine: _Routine, keys: frozenset[str]
) -> sql.Composed:
    """The statement for `call()`: PostgREST's, so the JSON result has the same shape.

    The arguments travel as one JSON object (`%s`) and `json_to_record` turns each
    into its parameter's type; named notation passes only those given, so defaults
    apply. Parameter types come from the catalog, never from the caller.
    """
    given = [p for p in routine.params if p.name in keys]
    source: sql.Composable = sql.SQL("(select %s::json as data) payload")
    if given:
        source = sql.SQL(
            "{source}, lateral (select {columns} from pg_catalog.json_to_record(payload.data)"
            " as _({typed}) limit 1) body"
        ).format(
            source=source,
            columns=sql.SQL(", ").join(sql.Identifier(p.name) for p in given),
            typed=sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(p.name), sql.SQL(p.type)) for p in given
            ),
        )
    arguments = sql.SQL(", ").join(
        sql.SQL("{variadic}{name} => body.{name}").format(
            variadic=sql.SQL("variadic " if p.variadic else ""), name=sql.Identifier(p.name)
        )
        for p in given
    )
    fn = sql.Identifier(schema, function)
    if routine.returns_composite:
        value: LiteralString = "pg_catalog.to_jsonb(call_result)"
        call = sql.SQL("lateral {fn}({arguments}) call_result").format(fn=fn, arguments=arguments)
    else:
        value = "pg_catalog.to_jsonb(call_result.call_value)"
        call = sql.SQL("lateral (select {fn}({arguments}) as call_value) call_result").format(
            fn=fn, arguments=arguments
        )
    if routine.returns_void:
        value = "null::jsonb"
    if routine.returns_set:
        shape = sql.SQL("coalesce(pg_catalog.jsonb_agg({value}), '[]'::jsonb)")
    else:
        shape = sql.SQL("(pg_catalog.jsonb_agg({value}) -> 0)")
    return sql.SQL("select {shape} from {source}, {call}").format(
        shape=shape.format(value=sql.SQL(value)), source=source, call=call
    )


def _id_array(msg_ids: Sequence[int]) -> str:
    """Message ids as a PostgreSQL array literal (`{1,2,3}`), for a `%s::bigint[]`.

    Only ints reach the text (`int.__str__` of an int, never a caller's str), so
    nothing but digits, signs and commas can; PostgreSQL range-checks each as bigint.
    """
    return "{" + ",".join(map(int.__str__, map(int, msg_ids))) + "}"


def _ids(reply: bytes) -> list[int]:
    """The ids of a `json_agg(id)` reply (an array of integers, `[]` for none)."""
    return [int(value) for value in json.loads(reply)]


class _JsonText(Loader):
    """json and jsonb columns as the text PostgreSQL sent (bytes), not parsed."""

    def load(self, data: Buffer) -> bytes:
        return bytes(data)


class SqlQueue:
    """`QueueBackend` and `RpcCaller` over a psycopg connection pool.

    `schema` is the worker's schema (`RPC_SCHEMA`); every call is one statement
    in its own transaction (autocommit), exactly one commit like one RPC.
    """

    def __init__(
        self, pool: AsyncConnectionPool, *, schema: str = "queue_worker", timeout: float = 10.0
    ) -> None:
        if not FUNCTION_NAME.fullmatch(schema):
            raise ValueError(f"invalid schema name {schema!r}")
        self._pool = pool
        self._schema = schema
        self._timeout = timeout
        self._routines: dict[tuple[str, frozenset[str]], sql.Composed] = {}

    @staticmethod
    def create_pool(url: str, *, max_size: int, timeout: float) -> AsyncConnectionPool:
        """The process's pool (not yet open): autocommit, no server-side prepared statements.

        Transaction-mode poolers (Supavisor or PgBouncer on port 6543) hand each
        transaction to any server connection, where a statement prepared on
        another one does not exist; so psycopg never prepares.
        """
        return AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            timeout=timeout,
            kwargs={"autocommit": True, "prepare_threshold": None, "connect_timeout": 5},
            name="queue-worker",
            open=False,
        )

    @property
    def conninfo(self) -> str:
        """The pool's connection string (for a LISTEN connection of its own)."""
        conninfo = self._pool.conninfo
        assert isinstance(conninfo, str)  # create_pool() is given a string
        return conninfo

    # -- QueueBackend ---------------------------------------------------------

    # Claimed rows come as one JSON array, as PostgREST sends them, and are parsed
    # as the RPC client parses its replies (app/queue/rows.py): in one pass, or row by
    # row when one of them cannot be read, so one bad row never fails its batch.
    # One text value instead of a row of Python objects each: a read of 500 costs
    # the service a fifth of the CPU it did through psycopg's row loaders.

    async def claim(self, queue: str, msg_ids: Sequence[int], vt: int) -> list[QueueMessage]:
        return parse_reply(
            await self._reply(
                "claim",
                "select pg_catalog.json_agg(t) from {fn}(%s::text, %s::bigint[], %s::integer) t",
                (queue, _id_array(msg_ids), vt),
            )
        )

    async def read(self, queue: str, vt: int, qty: int) -> list[QueueMessage]:
        return parse_reply(
            await self._reply(
                "read",
                "select pg_catalog.json_agg(t) from {fn}(%s::text, %s::integer, %s::integer) t",
                (queue, vt, qty),
            )
        )

    # Ids go out as one array literal and come back as one JSON array: a batch of 500
    # through psycopg's list dumper and a row per id cost more than the call itself.

    async def ack(self, queue: str, msg_ids: Sequence[int]) -> list[int]:
        return _ids(
            await self._reply(
                "ack",
                "select pg_catalog.json_agg(t.id) from {fn}(%s::text, %s::bigint[]) as t(id)",
                (queue, _id_array(msg_ids)),
            )
        )

    async def set_vt(self, queue: str, msg_ids: Sequence[int], vt: int) -> list[int]:
        return _ids(
            await self._reply(
                "set_vt",
                "select pg_catalog.json_agg(t.id)"
                " from {fn}(%s::text, %s::bigint[], %s::integer) as t(id)",
                (queue, _id_array(msg_ids), vt),
            )
        )

    async def archive(
        self, queue: str, msg_ids: Sequence[int], errors: Mapping[int, dict[str, Any]]
    ) -> list[int]:
        return _ids(
            await self._reply(
                "archive",
                "select pg_catalog.json_agg(t.id)"
                " from {fn}(%s::text, %s::bigint[], %s::jsonb) as t(id)",
                (queue, _id_array(msg_ids), Jsonb({str(k): v for k, v in errors.items()})),
            )
        )

    async def send(
        self,
        queue: str,
        message: dict[str, Any],
        delay_seconds: int = 0,
        headers: dict[str, Any] | None = None,
    ) -> int:
        if headers is None:
            rows = await self._rows(
                "send",
                "select {fn}(%s::text, %s::jsonb, %s::integer) as id",
                (queue, Jsonb(message), delay_seconds),
            )
        else:
            rows = await self._rows(
                "send",
                "select {fn}(%s::text, %s::jsonb, %s::integer, %s::jsonb) as id",
                (queue, Jsonb(message), delay_seconds, Jsonb(headers)),
            )
        return int(rows[0]["id"])

    async def metrics(self) -> list[QueueMetrics]:
        rows = await self._rows("metrics", "select * from {fn}()", ())
        return [QueueMetrics.model_validate(row) for row in rows]

    async def archived(
        self, queue: str, limit: int, before_id: int | None = None
    ) -> list[ArchivedMessage]:
        rows = await self._rows(
            "archived",
            "select * from {fn}(%s::text, %s::integer, %s::bigint)",
            (queue, limit, before_id),
            raw_json=True,
        )
        return [archived_from_columns(row) for row in rows]

    async def replay(self, queue: str, msg_id: int) -> int | None:
        rows = await self._rows(
            "replay", "select {fn}(%s::text, %s::bigint) as id", (queue, msg_id)
        )
        new_id = rows[0]["id"]
        return None if new_id is None else int(new_id)

    async def set_paused(self, queue: str, paused: bool) -> bool:
        rows = await self._rows(
            "pause" if paused else "resume", "select {fn}(%s::text) as changed", (queue,)
        )
        return bool(rows[0]["changed"])

    async def paused(self) -> dict[str, datetime]:
        rows = await self._rows("paused_queues", "select * from {fn}()", ())
        return {row["queue_name"]: row["paused_at"] for row in rows}

    async def dead_letter_counts(self) -> dict[str, int]:
        rows = await self._rows("dead_letter_counts", "select * from {fn}()", ())
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
        function = "replay_dead" if action == "replay" else "purge_dead"
        [row] = await self._rows(
            function,
            "select * from {fn}(%s::text, %s::bigint, %s::integer, %s::text,"
            " %s::timestamptz, %s::timestamptz, %s::bigint)",
            (
                queue,
                after_id,
                max_rows,
                where.error_text,
                where.archived_from,
                where.archived_to,
                up_to_id,
            ),
        )
        last = row["last_id"]
        return DeadBatch(
            int(row["scanned"]), int(row["affected"]), None if last is None else int(last)
        )

    async def expire_dead(self, queue: str, older_than: datetime, max_rows: int) -> int:
        rows = await self._rows(
            "expire_dead",
            "select {fn}(%s::text, %s::timestamptz, %s::integer) as n",
            (queue, older_than, max_rows),
        )
        return int(rows[0]["n"])

    # -- RpcCaller --------------------------------------------------------------

    async def call(self, function: str, args: dict[str, Any]) -> Any:
        """Calls `<schema>.<function>` with named arguments; returns what the RPC would.

        The result has PostgREST's shape: a scalar as itself, a set as a list, a
        composite as an object, void as None. An unknown function or a mismatch of
        argument names fails with PostgREST's 404 `PGRST202`.
        """
        if not FUNCTION_NAME.fullmatch(function):
            raise RpcError(function, 404, "not a function name", code="PGRST202")
        keys = frozenset(args)
        started = time.perf_counter()
        result = "error"
        try:
            async with asyncio.timeout(self._timeout), self._pool.connection() as conn:
                query = await self._call_query(conn, function, keys)
                cursor = await conn.execute(query, (Jsonb(args),))
                row = await cursor.fetchone()
            result = "ok"
            return None if row is None else row[0]
        except (psycopg.Error, PoolTimeout, TimeoutError) as error:
            # A function replaced or dropped meanwhile is looked up again next time.
            self._routines.pop((function, keys), None)
            raise _error(function, error, self._timeout) from error
        finally:
            metrics.RPC_CALLS.labels(function, result).inc()
            metrics.RPC_DURATION.labels(function).observe(time.perf_counter() - started)

    async def _call_query(
        self, conn: psycopg.AsyncConnection[Any], function: str, keys: frozenset[str]
    ) -> sql.Composed:
        cached = self._routines.get((function, keys))
        if cached is not None:
            return cached
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(CATALOG_QUERY, (self._schema, function))
        candidates = [_routine(row) for row in await cursor.fetchall()]
        matching = [routine for routine in candidates if routine.accepts(keys)]
        if len(matching) != 1:
            names = ", ".join(sorted(keys))
            if len(matching) > 1:
                raise RpcError(
                    function,
                    300,
                    f"Could not choose the best candidate function between several "
                    f"{self._schema}.{function} overloads",
                    code="PGRST203",
                )
            raise RpcError(
                function,
                404,
                f"Could not find the function {self._schema}.{function}({names}) "
                "in the schema cache",
                code="PGRST202",
            )
        query = _call_query(self._schema, function, matching[0], keys)
        self._routines[(function, keys)] = query
        return query

    # -- plumbing ---------------------------------------------------------------

    async def _reply(self, function: str, template: LiteralString, params: Sequence[Any]) -> bytes:
        """The one json value of a statement on `<schema>.<function>`, as its text
        (`[]` for SQL null: json_agg of no rows); errors as RpcError."""
        rows = await self._execute(function, template, params, raw_json=True, rows=tuple_row)
        value = rows[0][0] if rows else None
        return b"[]" if value is None else bytes(value)

    async def _rows(
        self,
        function: str,
        template: LiteralString,
        params: Sequence[Any],
        *,
        raw_json: bool = False,
    ) -> list[dict[str, Any]]:
        """Runs one statement on `<schema>.<function>`; rows as dicts; errors as RpcError.

        With `raw_json`, json and jsonb columns come as their text (bytes), unparsed.
        """
        return await self._execute(function, template, params, raw_json=raw_json, rows=dict_row)

    async def _execute(
        self,
        function: str,
        template: LiteralString,
        params: Sequence[Any],
        *,
        raw_json: bool,
        rows: RowFactory[Any],
    ) -> list[Any]:
        query = sql.SQL(template).format(fn=sql.Identifier(self._schema, function))
        started = time.perf_counter()
        result = "error"
        try:
            async with asyncio.timeout(self._timeout), self._pool.connection() as conn:
                cursor = conn.cursor(row_factory=rows)
                if raw_json:
                    for name in ("json", "jsonb"):
                        cursor.adapters.register_loader(name, _JsonText)
                await cursor.execute(query, params)
                fetched = await cursor.fetchall()
            result = "ok"
            return fetched
        except (psycopg.Error, PoolTimeout, TimeoutError) as error:
            raise _error(function, error, self._timeout) from error
        finally:
            metrics.RPC_CALLS.labels(function, result).inc()
            metrics.RPC_DURATION.labels(function).observe(time.perf_counter() - started)
