"""A PostgREST-compatible RPC gateway for the tests: `<url>/rest/v1/rpc/<fn>` over real HTTP.

queue-worker talks to its database through Supabase's Data API (PostgREST behind
Supabase's API gateway). This stand-in answers the same requests the same way,
against the test bed's real PostgreSQL, so the service's RPC client is tested
against the behaviour it meets in production rather than against a mock:

- keys as Supabase issues them: legacy HS256 JWTs (`anon`, `service_role`, a user's
  `authenticated` token) and the new opaque `sb_secret_…` / `sb_publishable_…` keys,
  the secret key refused from browsers;
- schemas chosen by `Content-Profile` / `Accept-Profile` among the exposed ones;
- functions found in `pg_catalog` by name and argument names, as PostgREST does;
- one transaction per call, as the request's role, with `request.jwt.claims` set;
- PostgREST's response shapes, error bodies and SQLSTATE-to-HTTP mapping.

Differences from the real thing, on purpose: the catalog is read on every call
(no schema cache to reload, so tests may create functions at any time), legacy
`apikey` JWTs are accepted when their signature verifies (Supabase compares them
with the project's two keys), and only JSON objects are accepted as RPC bodies.

For reliability tests and benchmarks: `set_down()` answers every request with
503 PGRST000 without touching the database, `stop()` / `start()` close and reopen
the listening socket on the same port (clients see "connection refused"), and
`calls` / `transactions` count RPC requests per function and database transactions.

Use it through `running_gateway(db)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support import jwt
from tests.support.postgres import Database
from tests.support.servers import serve_in_thread

DEFAULT_SCHEMAS: Final = ("public", "graphql_public", "queue_worker")
# Supabase configures PostgREST with `db-extra-search-path = public, extensions`.
EXTRA_SEARCH_PATH: Final = ("public", "extensions")
JSON_CONTENT_TYPE: Final = "application/json; charset=utf-8"
# PostgREST tolerates this much clock skew on exp/nbf/iat.
JWT_LEEWAY_SECONDS: Final = 30.0
LEGACY_KEY_LIFETIME_SECONDS: Final = 10 * 365 * 24 * 3600
ANON_ROLE: Final = "anon"
SECRET_KEY_PREFIX: Final = "sb_secret_"
PUBLISHABLE_KEY_PREFIX: Final = "sb_publishable_"
RPC_METHODS: Final = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


class ApiError(Exception):
    """An HTTP error answer; raised anywhere in a request, turned into a response once."""

    def __init__(
        self,
        status: int,
        body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = dict(body)
        self.headers = dict(headers or {})

    def response(self) -> Response:
        return Response(
            json.dumps(self.body),
            status_code=self.status,
            headers=self.headers,
            media_type=JSON_CONTENT_TYPE,
        )


def pgrst_error(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    hint: Any = None,
    headers: Mapping[str, str] | None = None,
) -> ApiError:
    """An error in PostgREST's shape; PostgREST names the code in `Proxy-Status` too."""
    return ApiError(
        status,
        {"code": code, "message": message, "details": details, "hint": hint},
        {"Proxy-Status": f"PostgREST; error={code}", **(headers or {})},
    )


def gateway_error(message: str, hint: str) -> ApiError:
    """A refusal by Supabase's API gateway, in front of PostgREST (its body has no code)."""
    return ApiError(401, {"message": message, "hint": hint})


def database_down_error(details: str | None) -> ApiError:
    return pgrst_error(
        503, "PGRST000", "Database connection error. Retrying the connection.", details
    )


def status_for_sqlstate(sqlstate: str, message: str, *, authed: bool) -> int:
    """PostgREST's SQLSTATE-to-HTTP table (`PostgREST.Error.mapSQLtoHTTP`).

    `authed` is true when the request's role is not the anonymous one: a
    privilege error is then 403 (you may not) rather than 401 (log in first).
    Exact codes are tested before the classes that contain them.
    """
    exact = {
        "23503": 409,
        "23505": 409,
        "25006": 405,
        "53400": 500,
        "57P01": 503,
        "P0001": 400,
        "42P01": 404,
        "42P17": 500,
    }
    if sqlstate in exact:
        return exact[sqlstate]
    if sqlstate == "21000":
        return 400 if message.endswith("requires a WHERE clause") else 500
    if sqlstate == "22023":
        # A JWT naming a role that does not exist is an authentication failure.
        return 401 if message.startswith("role") and message.endswith("does not exist") else 400
    if sqlstate == "42883":
        return 406 if message.startswith("function xmlagg(") else 404
    if sqlstate == "42501":
        return 403 if authed else 401
    if sqlstate.startswith("PT"):
        # RAISE ... USING ERRCODE = 'PT402' lets a function choose its status.
        digits = sqlstate[2:]
        return int(digits) if digits.isdigit() and 100 <= int(digits) <= 599 else 500
    by_class = {
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
    return by_class.get(sqlstate[:2], 400)


@dataclass(frozen=True)
class Param:
    """An input parameter of a function, as the schema cache knows it."""

    name: str
    type: str  # format_type() with an empty search_path: schema-qualified unless pg_catalog
    required: bool
    variadic: bool


@dataclass(frozen=True)
class Routine:
    """A callable function: what PostgREST needs to pick, call and shape it."""

    schema: str
    name: str
    params: tuple[Param, ...]
    returns_set: bool
    returns_void: bool
    returns_composite: bool

    @property
    def single_unnamed_json(self) -> bool:
        """`f(json)` / `f(jsonb)` with no parameter name receives the whole body."""
        return (
            len(self.params) == 1
            and self.params[0].name == ""
            and self.params[0].type in ("json", "jsonb")
        )

    def accepts(self, keys: frozenset[str]) -> bool:
        """PostgREST's rule: every required parameter given, nothing unknown given."""
        if not self.params:
            return not keys
        if any(p.name == "" for p in self.params):
            return False  # unnamed parameters cannot be bound by name
        required = {p.name for p in self.params if p.required}
        known = {p.name for p in self.params}
        return required <= keys <= known

    def describe(self) -> str:
        params = ", ".join(f"{p.name} => {p.type}" for p in self.params)
        return f"{self.schema}.{self.name}({params})"


@dataclass(frozen=True)
class Caller:
    """Who a request runs as, after the keys are checked."""

    role: str
    claims: Mapping[str, Any]

    @property
    def authed(self) -> bool:
        return self.role != ANON_ROLE


def _fuzzy_best(target: str, options: Sequence[str], cutoff: float) -> str | None:
    # PostgREST uses a fuzzy set; difflib gives close enough hints for tests.
    matches = difflib.get_close_matches(target, list(options), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def no_rpc_error(
    schema: str,
    name: str,
    keys: frozenset[str],
    overloads: Sequence[Routine],
    schema_functions: Sequence[str],
    *,
    is_post: bool,
) -> ApiError:
    """PGRST202 with PostgREST's message, details and hint."""
    ordered = sorted(keys)
    qualified = f"{schema}.{name}"
    if ordered:
        in_message = f"({', '.join(ordered)})"
        plural = "s" if len(ordered) > 1 else ""
        in_details = f" with parameter{plural} {', '.join(ordered)}"
    else:
        in_message = " without parameters"
        in_details = " without parameters"
    if is_post:
        in_details += " or with a single unnamed json/jsonb parameter"

    def param_list(names: Sequence[str]) -> str:
        return f"({', '.join(sorted(names))})"

    hint_target: str | None
    if overloads:
        best = _fuzzy_best(
            param_list(ordered), [param_list([p.name for p in r.params]) for r in overloads], 0.33
        )
        hint_target = f"{name}{best}" if best else None
    else:
        hint_target = _fuzzy_best(name, [f for f in schema_functions if f != name], 0.75)
    return pgrst_error(
        404,
        "PGRST202",
        f"Could not find the function {qualified}{in_message} in the schema cache",
        f"Searched for the function {qualified}{in_details}, "
        "but no matches were found in the schema cache.",
        f"Perhaps you meant to call the function {schema}.{hint_target}" if hint_target else None,
    )


def ambiguous_rpc_error(candidates: Sequence[Routine]) -> ApiError:
    return pgrst_error(
        300,
        "PGRST203",
        "Could not choose the best candidate function between: "
        + ", ".join(r.describe() for r in candidates),
        None,
        "Try renaming the parameters or the function itself in the database "
        "so function overloading can be resolved",
    )


def choose_routine(
    candidates: Sequence[Routine], keys: frozenset[str], *, is_post: bool
) -> Routine | None:
    """PostgREST's overload resolution; None when nothing matches.

    Functions bound by argument names win; a single unnamed json/jsonb parameter
    is the fallback that receives the whole body.
    """
    named = [r for r in candidates if r.accepts(keys)]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ambiguous_rpc_error(named)
    unnamed = [r for r in candidates if is_post and r.single_unnamed_json]
    if len(unnamed) == 1:
        return unnamed[0]
    if len(unnamed) > 1:
        raise ambiguous_rpc_error(unnamed)
    return None


# Run with search_path = '' so format_type() qualifies every non-pg_catalog type:
# the call later runs with the exposed schema's search_path, where an unqualified
# name could resolve elsewhere or not at all.
CATALOG_QUERY: Final = """
select p.proname::text as name,
       p.pronargdefaults::int as n_defaults,
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

SCHEMA_FUNCTIONS_QUERY: Final = """
select distinct p.proname::text
from pg_catalog.pg_proc p
join pg_catalog.pg_namespace n on n.oid = p.pronamespace
where n.nspname = %s and p.prokind = 'f'
"""


def routine_from_row(schema: str, row: Mapping[str, Any]) -> Routine:
    # Input parameters are modes i (in), b (inout) and v (variadic); the defaults
    # belong to the last `pronargdefaults` of them.
    inputs = [a for a in row["args"] if a["mode"] in ("i", "b", "v")]
    first_optional = len(inputs) - int(row["n_defaults"])
    params = tuple(
        Param(
            name=a["name"],
            type=a["type"],
            required=index < first_optional,
            variadic=a["mode"] == "v",
        )
        for index, a in enumerate(inputs)
    )
    return Routine(
        schema=schema,
        name=row["name"],
        params=params,
        returns_set=bool(row["returns_set"]),
        returns_void=bool(row["returns_void"]),
        returns_composite=bool(row["returns_composite"]),
    )


def call_query(routine: Routine, keys: frozenset[str]) -> sql.Composed:
    """The statement PostgREST builds for an RPC (`callPlanToQuery` and friends).

    The JSON body is `%s`; `json_to_record` converts each argument to its
    parameter's type (arrays, jsonb, timestamps...) exactly as PostgREST does, and
    named notation passes only the arguments given so defaults apply.
    """
    fn = sql.Identifier(routine.schema, routine.name)
    body_lateral: sql.Composable = sql.SQL("")
    if not routine.accepts(keys) and routine.single_unnamed_json:
        args: sql.Composable = sql.SQL("pgrst_payload.json_data::{}").format(
            sql.SQL(routine.params[0].type)
        )
    else:
        given = [p for p in routine.params if p.name in keys]
        if given:
            body_lateral = sql.SQL(
                "lateral (select {cols} from pg_catalog.json_to_record(pgrst_payload.json_data)"
                " as _({typed}) limit 1) pgrst_body, "
            ).format(
                cols=sql.SQL(", ").join(sql.Identifier(p.name) for p in given),
                typed=sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier(p.name), sql.SQL(p.type)) for p in given
                ),
            )
        args = sql.SQL(", ").join(
            sql.SQL("{variadic}{name} := pgrst_body.{name}").format(
                variadic=sql.SQL("variadic " if p.variadic else ""), name=sql.Identifier(p.name)
            )
            for p in given
        )

    if routine.returns_composite:
        columns = sql.SQL("pgrst_call.*")
        call = sql.SQL("lateral {fn}({args}) pgrst_call").format(fn=fn, args=args)
        aggregate = (
            "coalesce(pg_catalog.json_agg(_postgrest_t)::text, '[]')"
            if routine.returns_set
            else "coalesce((pg_catalog.json_agg(_postgrest_t) -> 0)::text, 'null')"
        )
    else:
        columns = sql.SQL("pgrst_call.pgrst_scalar")
        call = sql.SQL("lateral (select {fn}({args}) pgrst_scalar) pgrst_call").format(
            fn=fn, args=args
        )
        if routine.returns_void:
            aggregate = "null::text"
        elif routine.returns_set:
            aggregate = "coalesce(pg_catalog.json_agg(_postgrest_t.pgrst_scalar)::text, '[]')"
        else:
            aggregate = (
                "coalesce((pg_catalog.json_agg(_postgrest_t.pgrst_scalar) -> 0)::text, 'null')"
            )
    return sql.SQL(
        "with pgrst_source as ("
        "select {columns} from (select %s::json as json_data) pgrst_payload, {body_lateral}{call}"
        ") select {aggregate} as body, pg_catalog.count(*)::bigint as page_total"
        " from pgrst_source _postgrest_t"
    ).format(
        columns=columns,
        body_lateral=body_lateral,
        call=call,
        aggregate=sql.SQL(aggregate),
    )


TX_VARS_QUERY: Final = """
select pg_catalog.set_config('search_path', %s, true),
       pg_catalog.set_config('role', %s, true),
       pg_catalog.set_config('request.jwt.claims', %s, true),
       pg_catalog.set_config('request.method', %s, true),
       pg_catalog.set_config('request.path', %s, true),
       pg_catalog.set_config('request.headers', %s, true),
       pg_catalog.set_config('request.cookies', %s, true)
"""


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _looks_like_browser(user_agent: str) -> bool:
    # Every mainstream browser's User-Agent starts with "Mozilla/5.0".
    return "mozilla" in user_agent.lower()


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


@dataclass
class _Counters:
    calls: Counter[str] = field(default_factory=Counter)
    transactions: int = 0


class RpcGateway:
    """The gateway: an ASGI app, its keys, its fault switch and its counters.

    Construct it with the test database, then serve it with `start()` / `stop()`
    or the `serving()` context manager (what `running_gateway` does).
    """

    def __init__(
        self,
        db: Database,
        *,
        schemas: Sequence[str] = DEFAULT_SCHEMAS,
        database_url: str | None = None,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        pool_timeout: float = 10.0,
        latency: float = 0.0,
    ) -> None:
        if not schemas:
            raise ValueError("at least one schema must be exposed")
        self.db = db
        self.schemas = tuple(schemas)
        self.database_url = database_url or db.url_as("authenticator")
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.pool_timeout = pool_timeout

        # Fresh random secrets per gateway: nothing to leak, nothing to scan.
        self.project_ref = secrets.token_hex(10)
        self.jwt_secret = secrets.token_urlsafe(32)
        self.anon_key = self.mint_jwt(ANON_ROLE, expires_in=LEGACY_KEY_LIFETIME_SECONDS)
        self.service_role_key = self.mint_jwt(
            "service_role", expires_in=LEGACY_KEY_LIFETIME_SECONDS
        )
        # A signed-in user's access token, as Supabase Auth issues it.
        self.authenticated_key = self.mint_jwt(
            "authenticated", sub=str(uuid.uuid4()), aud="authenticated"
        )
        self.secret_key = SECRET_KEY_PREFIX + secrets.token_urlsafe(24)
        self.publishable_key = PUBLISHABLE_KEY_PREFIX + secrets.token_urlsafe(24)
        self._opaque_keys = {self.secret_key: "service_role", self.publishable_key: ANON_ROLE}

        self._lock = threading.Lock()
        self._counters = _Counters()
        self._down = False
        self._failing: frozenset[str] = frozenset()
        self._delays: dict[str, float] = {}
        self.latency = latency
        self._pool: AsyncConnectionPool | None = None
        self._port = 0
        self._url: str | None = None
        self._serving: contextlib.ExitStack | None = None
        self.app = Starlette(
            routes=[
                Route("/rest/v1/rpc/{fn}", self._rpc, methods=RPC_METHODS),
                Route("/{path:path}", self._not_found, methods=RPC_METHODS),
            ],
            lifespan=self._lifespan,
        )

    # -- keys -----------------------------------------------------------------

    def mint_jwt(self, role: str, *, expires_in: float | None = 3600, **claims: Any) -> str:
        """A JWT signed with this project's secret, like Supabase's legacy keys.

        A negative `expires_in` gives an already expired token; None, no `exp`.
        """
        now = int(time.time())
        payload: dict[str, Any] = {"iss": "supabase", "ref": self.project_ref, "role": role}
        payload["iat"] = now
        if expires_in is not None:
            payload["exp"] = now + int(expires_in)
        payload.update(claims)
        return jwt.encode(payload, self.jwt_secret)

    # -- serving --------------------------------------------------------------

    @property
    def url(self) -> str:
        """The project URL (`http://127.0.0.1:PORT`); kept while stopped, so clients get refused."""
        if self._url is None:
            raise RuntimeError("the gateway has never been started")
        return self._url

    def rpc_url(self, fn: str) -> str:
        return f"{self.url}/rest/v1/rpc/{fn}"

    @property
    def running(self) -> bool:
        return self._serving is not None

    def start(self) -> None:
        """Listens on the port it had before (a free one the first time)."""
        if self._serving is not None:
            return
        stack = contextlib.ExitStack()
        url = stack.enter_context(serve_in_thread(self.app, port=self._port))
        self._port = urlsplit(url).port or 0
        self._url = url
        self._serving = stack

    def stop(self) -> None:
        """Closes the listening socket: connections are refused until `start()`."""
        stack, self._serving = self._serving, None
        if stack is not None:
            stack.close()

    @contextlib.contextmanager
    def serving(self) -> Iterator[RpcGateway]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # -- faults and counters ----------------------------------------------------

    def set_down(self, down: bool = True) -> None:
        """While down, every request gets 503 PGRST000 and the database is not touched."""
        self._down = down

    @property
    def down(self) -> bool:
        return self._down

    def fail_functions(self, *functions: str) -> None:
        """Answers 503 PGRST000 for these function names only (none: stop failing).

        Lets a test break one step, say the ack, while claims still work.
        """
        self._failing = frozenset(functions)

    def delay_answers(self, seconds: float, *functions: str) -> None:
        """Holds the answers of these functions for `seconds` after the database has
        committed (none: answer at once), as a slow network on the way back would.

        Lets a test cancel a caller whose call has already taken effect.
        """
        self._delays = dict.fromkeys(functions, seconds)

    def set_latency(self, seconds: float) -> None:
        """Adds `seconds` to every RPC's round trip, half on the way in and half on the
        way out, as a project in another region would (0: none)."""
        self.latency = seconds

    @property
    def calls(self) -> Counter[str]:
        """RPC requests received per `schema.function` (refused ones included)."""
        with self._lock:
            return Counter(self._counters.calls)

    def call_count(self, fn: str, schema: str | None = None) -> int:
        return self.calls[f"{schema or self.schemas[0]}.{fn}"]

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def transactions(self) -> int:
        """Database transactions opened for RPC calls (one per call that reached the database)."""
        with self._lock:
            return self._counters.transactions

    def reset_counters(self) -> None:
        with self._lock:
            self._counters = _Counters()

    # -- the app ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        # Created here so the pool belongs to the server thread's event loop.
        pool: AsyncConnectionPool = AsyncConnectionPool(
            self.database_url,
            min_size=self.pool_min_size,
            max_size=self.pool_max_size,
            timeout=self.pool_timeout,
            kwargs={"autocommit": True},
            name="rpc-gateway",
            open=False,
        )
        # Not waiting lets the gateway start while the database is unreachable;
        # requests then get PostgREST's 503 instead of the server failing to start.
        await pool.open(wait=False)
        self._pool = pool
        try:
            yield
        finally:
            self._pool = None
            await pool.close()

    async def _not_found(self, _request: Request) -> Response:
        return pgrst_error(404, "PGRST125", "Invalid path specified in request URL").response()

    async def _rpc(self, request: Request) -> Response:
        fn = request.path_params["fn"]
        method = request.method
        profile = request.headers.get(
            "accept-profile" if method in ("GET", "HEAD") else "content-profile"
        )
        with self._lock:
            self._counters.calls[f"{profile or self.schemas[0]}.{fn}"] += 1
        latency = self.latency
        if latency:
            await asyncio.sleep(latency / 2)  # the request on its way
        try:
            if self._down or fn in self._failing:
                raise database_down_error(
                    "RpcGateway.set_down(True): the test switched the database off"
                )
            caller = self._authenticate(request)
            if method not in ("GET", "HEAD", "POST"):
                raise pgrst_error(405, "PGRST101", f"Cannot use the {method} method on RPC")
            schema = self._schema(profile)
            body, keys = await self._arguments(request)
            response = await self._call(request, caller, schema, fn, body, keys)
            delay = self._delays.get(fn) or 0.0
            if delay or latency:
                await asyncio.sleep(delay + latency / 2)  # the answer on its way back
            return response
        except ApiError as exc:
            if latency:
                await asyncio.sleep(latency / 2)
            return exc.response()

    def _authenticate(self, request: Request) -> Caller:
        apikey = request.headers.get("apikey")
        if not apikey:
            raise gateway_error(
                "No API key found in request",
                "No `apikey` request header or url param was found.",
            )
        bearer = _bearer(request.headers.get("authorization"))
        if apikey.startswith((SECRET_KEY_PREFIX, PUBLISHABLE_KEY_PREFIX)):
            role = self._opaque_keys.get(apikey)
            if role is None:
                raise gateway_error(
                    "Invalid API key",
                    "Double check your Supabase `anon` or `service_role` API key.",
                )
            if role == "service_role" and _looks_like_browser(
                request.headers.get("user-agent", "")
            ):
                raise gateway_error(
                    "Forbidden use of secret API key in browser",
                    "Secret API keys can only be used in a protected environment and should "
                    "never be used in a browser. Use a publishable key instead.",
                )
            if bearer is None or bearer == apikey:
                # The platform mints a short-lived JWT for the opaque key; its claims are these.
                return Caller(role, {"iss": "supabase", "role": role})
            # A user's access token may ride along with the key; it decides the role.
            claims = self._verify(bearer)
        else:
            claims = self._verify(apikey)
            if bearer is not None and bearer != apikey:
                claims = self._verify(bearer)
        role = claims.get("role")
        return Caller(role if isinstance(role, str) and role else ANON_ROLE, claims)

    def _verify(self, token: str) -> dict[str, Any]:
        try:
            return jwt.decode(token, self.jwt_secret, leeway=JWT_LEEWAY_SECONDS)
        except jwt.JWTError as exc:
            description = exc.message.replace('"', '\\"')
            raise pgrst_error(
                401,
                exc.code,
                exc.message,
                exc.details,
                headers={
                    "WWW-Authenticate": (
                        f'Bearer error="invalid_token", error_description="{description}"'
                    )
                },
            ) from exc

    def _schema(self, profile: str | None) -> str:
        if profile is None:
            return self.schemas[0]
        if profile not in self.schemas:
            raise pgrst_error(
                406,
                "PGRST106",
                f"Invalid schema: {profile}",
                None,
                "Only the following schemas are exposed: " + ", ".join(self.schemas),
            )
        return profile

    async def _arguments(self, request: Request) -> tuple[str, frozenset[str]]:
        """The JSON object of named arguments, as text, and its keys."""
        if request.method in ("GET", "HEAD"):
            args: dict[str, Any] = {}
            for key, value in request.query_params.multi_items():
                # Repeated keys build an array, which is how GET passes array arguments.
                if key in args:
                    previous = args[key]
                    args[key] = (
                        [*previous, value]
                        if isinstance(previous, list)
                        else [
                            previous,
                            value,
                        ]
                    )
                else:
                    args[key] = value
            return json.dumps(args), frozenset(args)
        raw = (await request.body()).decode("utf-8", errors="replace")
        if raw.strip() == "":
            return "{}", frozenset()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise pgrst_error(400, "PGRST102", "Empty or invalid json")
        # The original text goes to the database, as PostgREST sends it.
        return raw, frozenset(parsed)

    async def _call(
        self,
        request: Request,
        caller: Caller,
        schema: str,
        fn: str,
        body: str,
        keys: frozenset[str],
    ) -> Response:
        pool = self._pool
        if pool is None:
            raise database_down_error("the gateway's connection pool is not open")
        is_post = request.method == "POST"
        try:
            async with pool.connection() as conn:
                with self._lock:
                    self._counters.transactions += 1
                async with conn.transaction():
                    if not is_post:
                        # PostgREST runs GET in a read-only transaction: a writing
                        # function fails with 25006, which maps to 405.
                        await conn.execute("set transaction read only")
                    routine = await self._resolve(conn, schema, fn, keys, is_post=is_post)
                    await conn.execute(
                        TX_VARS_QUERY,
                        (
                            ", ".join(_quote_ident(s) for s in (schema, *EXTRA_SEARCH_PATH)),
                            caller.role,
                            json.dumps({**caller.claims, "role": caller.role}),
                            request.method,
                            # PostgREST sees the path after the API gateway strips /rest/v1.
                            request.url.path.removeprefix("/rest/v1"),
                            json.dumps({k.lower(): v for k, v in request.headers.items()}),
                            json.dumps(dict(request.cookies)),
                        ),
                    )
                    cursor = await conn.execute(call_query(routine, keys), (body,))
                    row = await cursor.fetchone()
        except PoolTimeout:
            raise await self._pool_timeout_error() from None
        except psycopg.Error as exc:
            raise self._database_error(exc, caller) from exc

        if routine.returns_void:
            return Response(status_code=204)
        result, count = row if row is not None else ("null", 0)
        return Response(
            result,
            status_code=200,
            headers={"Content-Range": f"0-{count - 1}/*" if count else "*/*"},
            media_type=JSON_CONTENT_TYPE,
        )

    async def _resolve(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        fn: str,
        keys: frozenset[str],
        *,
        is_post: bool,
    ) -> Routine:
        await conn.execute("select pg_catalog.set_config('search_path', '', true)")
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(CATALOG_QUERY, (schema, fn))
        candidates = [routine_from_row(schema, row) for row in await cursor.fetchall()]
        routine = choose_routine(candidates, keys, is_post=is_post)
        if routine is not None:
            return routine
        names: list[str] = []
        if not candidates:
            # Only needed for the "Perhaps you meant" hint.
            listing = await conn.execute(SCHEMA_FUNCTIONS_QUERY, (schema,))
            names = [name for (name,) in await listing.fetchall()]
        raise no_rpc_error(schema, fn, keys, candidates, names, is_post=is_post)

    def _database_error(self, exc: psycopg.Error, caller: Caller) -> ApiError:
        sqlstate = exc.sqlstate
        if sqlstate is None:
            # No SQLSTATE: the connection itself failed (libpq), as hasql's ClientError.
            return pgrst_error(
                503, "PGRST001", "Database client error. Retrying the connection.", str(exc)
            )
        diag = exc.diag
        message = diag.message_primary or str(exc)
        status = status_for_sqlstate(sqlstate, message, authed=caller.authed)
        return pgrst_error(
            status,
            sqlstate,
            message,
            diag.message_detail,
            diag.message_hint,
            # PostgREST invites the client to authenticate on every 401.
            headers={"WWW-Authenticate": "Bearer"} if status == 401 else None,
        )

    async def _pool_timeout_error(self) -> ApiError:
        """Tells "database unreachable" (503 PGRST000) from "pool exhausted" (504 PGRST003)."""
        try:
            probe = await psycopg.AsyncConnection.connect(self.database_url, connect_timeout=2)
        except psycopg.Error as exc:
            return database_down_error(str(exc).strip())
        await probe.close()
        return pgrst_error(504, "PGRST003", "Timed out acquiring connection from connection pool.")


# What `running_gateway` yields; the name the test plan used.
GatewayHandle = RpcGateway


@contextlib.contextmanager
def running_gateway(db: Database, **options: Any) -> Iterator[RpcGateway]:
    """Serves a new `RpcGateway` for `db` on loopback for the duration.

    `options` are `RpcGateway`'s keyword arguments: `schemas`, `database_url`,
    `pool_min_size`, `pool_max_size`, `pool_timeout`.
    """
    gateway = RpcGateway(db, **options)
    with gateway.serving():
        yield gateway
