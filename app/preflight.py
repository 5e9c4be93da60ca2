"""The preflight behind `queue-worker check`: is this service ready to run here?

Each check gives one `Result`: OK with what it found, or FAIL with what is wrong and
the fix, in the words of the dashboard setting, the SQL or the variable to change.
A check that needs an earlier one (the database facts need the RPC) is SKIP when
that one failed, and one that does not apply to the mode (webhooks in local mode)
is N/A. The checks reuse the service's own calls: the RPC caller it opens, the
migration ledger against the SQL this release ships (app/schema.py), the Mailer's
own connection code, and `queue_worker.preflight()` for what only the database
knows (supabase/migrations/20261201004000_preflight.sql).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import aiosmtplib

from app import __version__, schema
from app.config import Settings
from app.errors import JobError
from app.mail import Mailer
from app.outbox import Outbox
from app.queue.backend import RpcCaller
from app.queue.rpc import RpcError

Status = Literal["ok", "fail", "skip", "n/a"]
PREFLIGHT: Final = "20261201004000_preflight"
URL_SECRET: Final = "queue_worker_url"
BEARER_SECRET: Final = "queue_worker_webhook_secret"
SIGNING_SECRET: Final = "queue_worker_signing_secret"
EXPOSE_SCHEMA_FIX: Final = (
    "Dashboard > the Data API settings (Project Settings > Data API, or Integrations > Data "
    "API > Settings; Settings > API in older dashboards) > Exposed schemas: add {schema}; "
    'with the Supabase CLI, supabase/config.toml: [api] schemas = ["public", '
    '"graphql_public", "{schema}"], then `supabase stop && supabase start`'
)
KEY_FIX: Final = (
    "set SUPABASE_SERVICE_ROLE_KEY to the project's secret key: Dashboard > Project Settings "
    "> API Keys > Secret keys (sb_secret_...); the legacy service_role JWT (deprecated) works "
    "until legacy keys are turned off"
)


@dataclass(frozen=True)
class Result:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    @property
    def passed(self) -> bool:
        return self.status in ("ok", "n/a")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ok(name: str, detail: str) -> Result:
    return Result(name, "ok", detail)


def failed(name: str, detail: str, fix: str | None = None) -> Result:
    return Result(name, "fail", detail, fix)


def skipped(name: str, detail: str) -> Result:
    return Result(name, "skip", detail)


def not_applicable(name: str, detail: str) -> Result:
    return Result(name, "n/a", detail)


def _direct(settings: Settings) -> bool:
    return settings.local_mode or settings.database_url is not None


def apply_fix(settings: Settings) -> str:
    """How this project applies the SQL this release ships."""
    if _direct(settings) and not settings.local_mode:
        return "run `queue-worker migrate --apply` (as the role that owns pgmq, postgres)"
    return (
        "queue-worker migrate --print > supabase/migrations/<YYYYMMDDHHMMSS>_queue_worker.sql "
        "then `supabase db push`; or `queue-worker migrate --apply` with DATABASE_URL set"
    )


def database_failure(settings: Settings, error: RpcError) -> Result:
    """What a failed RPC says about the connection, and the fix."""
    schema_name = settings.rpc_schema
    if _direct(settings):
        name = "database"
        if error.status is None:
            return failed(
                name,
                f"no connection: {error.message}",
                "check DATABASE_URL (host, port, user, password); on Supabase take the "
                "session pooler or direct connection string (Dashboard > Connect)",
            )
        if error.code == "42501":
            return failed(
                name,
                f"permission denied: {error.message}",
                "connect as the role that applied the migrations (postgres) or service_role",
            )
        return failed(name, f"{error.code or error.status}: {error.message}")
    name = "rpc"
    if error.status is None:
        return failed(
            name,
            f"no answer from SUPABASE_URL: {error.message}",
            "check SUPABASE_URL (https://<project-ref>.supabase.co) and the network; "
            "a paused project does not answer",
        )
    if error.code == "PGRST106":
        return failed(
            name,
            f"schema {schema_name} is not exposed by the Data API (PGRST106)",
            EXPOSE_SCHEMA_FIX.format(schema=schema_name),
        )
    if error.status == 401:
        return failed(name, f"the key was refused: {error.code or error.message}", KEY_FIX)
    if error.status == 403:
        return failed(
            name,
            f"service_role may not call {schema_name}: {error.message}",
            "apply the migrations (they grant service_role its rights): " + apply_fix(settings),
        )
    if error.code == "PGRST125":
        return failed(
            name,
            "SUPABASE_URL answers, but not as a Supabase project (PGRST125: invalid path)",
            "set SUPABASE_URL to the project URL without a path: https://<project-ref>.supabase.co",
        )
    if error.status >= 500:
        return failed(
            name,
            f"the database behind the API did not answer (HTTP {error.status} {error.code or ''})",
            "is the project paused or restarting? Dashboard > Project overview",
        )
    return failed(name, f"HTTP {error.status} {error.code or ''}: {error.message}")


async def check_database(
    settings: Settings, rpc: RpcCaller
) -> tuple[Result, list[str] | None, bool]:
    """The RPC (or database) answers; returns the ledger (None when it is missing)."""
    name = "database" if _direct(settings) else "rpc"
    try:
        rows = await rpc.call("applied_migrations", {})
    except RpcError as error:
        if error.code == "PGRST202":
            # Reachable and exposed; the ledger itself is what is missing.
            return ok(name, _reached(settings)), None, True
        return database_failure(settings, error), None, False
    applied = [str(row) for row in rows or []]
    return ok(name, _reached(settings)), applied, True


def _reached(settings: Settings) -> str:
    if settings.local_mode:
        return "the embedded PostgreSQL answers"
    if settings.database_url is not None:
        return "DATABASE_URL connects"
    return f"{settings.supabase_url} answers with the key; schema {settings.rpc_schema} is exposed"


def check_migrations(settings: Settings, applied: list[str] | None) -> Result:
    shipped = schema.migrations()
    name = "migrations"
    if applied is None:
        return failed(
            name,
            f"none of queue-worker {__version__}'s SQL is recorded here "
            f"(no {settings.rpc_schema}.applied_migrations: the SQL is not applied, or predates "
            f"{schema.LEDGER})",
            apply_fix(settings),
        )
    missing = schema.missing(applied, shipped)
    if missing:
        names = ", ".join(m.name for m in missing)
        return failed(
            name, f"{len(missing)} of {len(shipped)} missing: {names}", apply_fix(settings)
        )
    detail = f"all {len(shipped)} of queue-worker {__version__} applied"
    newer = sorted(set(applied) - {m.name for m in shipped})
    if newer:
        detail += f"; the database also has newer ones ({', '.join(newer)})"
    return ok(name, detail)


def _digests(settings: Settings) -> list[str]:
    return [hashlib.sha256(s.encode()).hexdigest() for s in settings.webhook_secrets]


async def database_facts(
    settings: Settings, rpc: RpcCaller, queues: Sequence[str], reachable: bool
) -> list[Result]:
    """pg_net, the Vault secrets, the webhook secret and the triggers, from preflight()."""
    names = ("pg_net", "vault secrets", "webhook secret", "webhook triggers")
    if settings.local_mode:
        reason = "local mode has no webhooks (LISTEN/NOTIFY wakes the worker)"
        return [not_applicable(name, reason) for name in names]
    if not reachable:
        return [skipped(name, "not checked: the database did not answer") for name in names]
    try:
        facts = await rpc.call(
            "preflight", {"queue_names": sorted(queues), "secret_digests": _digests(settings)}
        )
    except RpcError as error:
        why = (
            f"not checked: needs migration {PREFLIGHT}"
            if error.code == "PGRST202"
            else f"not checked: preflight() failed ({error})"
        )
        return [skipped(name, why) for name in names]
    if not isinstance(facts, dict):
        return [skipped(name, "not checked: preflight() answered no object") for name in names]
    return [
        _pg_net(facts),
        _vault(facts),
        _secret(settings, facts),
        _triggers(settings, facts, queues),
    ]


def _pg_net(facts: dict[str, Any]) -> Result:
    if facts.get("pg_net"):
        return ok("pg_net", "installed (net.http_post)")
    return failed(
        "pg_net",
        "not installed: the triggers cannot ring the worker (only the sweeper runs jobs)",
        "Dashboard > Database > Extensions: enable pg_net (or `create extension pg_net;`), "
        "then apply the queue-worker migrations again",
    )


def _vault(facts: dict[str, Any]) -> Result:
    name = "vault secrets"
    if not facts.get("vault"):
        return failed(
            name,
            "Vault is not installed",
            "Dashboard > Database > Extensions: enable supabase_vault",
        )
    present = set(facts.get("secrets") or [])
    missing = []
    if URL_SECRET not in present:
        missing.append(
            f"{URL_SECRET} (the service's public base URL; without it no webhook is sent): "
            f"select vault.create_secret('https://<your-worker-host>', '{URL_SECRET}');"
        )
    if BEARER_SECRET not in present and SIGNING_SECRET not in present:
        missing.append(
            f"{BEARER_SECRET} or {SIGNING_SECRET} (WEBHOOK_SECRET's value): "
            f"select vault.create_secret('<WEBHOOK_SECRET>', '{BEARER_SECRET}');"
        )
    if missing:
        return failed(
            name, "missing " + " and ".join(m.split(" ", 1)[0] for m in missing), " ".join(missing)
        )
    return ok(name, ", ".join(sorted(present)) + " set (values not read)")


def _secret(settings: Settings, facts: dict[str, Any]) -> Result:
    name = "webhook secret"
    sent = SIGNING_SECRET if facts.get("signs") else BEARER_SECRET
    matches = facts.get("secret_matches")
    if matches is None:
        return skipped(name, "not checked: no webhook secret in Vault")
    if matches:
        how = "signs with" if facts.get("signs") else "sends"
        return ok(name, f"the trigger {how} {sent}, which is this service's WEBHOOK_SECRET")
    return failed(
        name,
        f"Vault's {sent} is not WEBHOOK_SECRET (nor WEBHOOK_SECRET_PREVIOUS): every webhook "
        "is refused with 401 and jobs wait for the sweeper",
        f"select vault.update_secret((select id from vault.secrets where name = '{sent}'), "
        "'<WEBHOOK_SECRET>'); or set WEBHOOK_SECRET to the value in Vault",
    )


def _triggers(settings: Settings, facts: dict[str, Any], queues: Sequence[str]) -> Result:
    name = "webhook triggers"
    found = facts.get("queues") or {}

    def fact(queue: str, key: str) -> bool:
        return bool((found.get(queue) or {}).get(key))

    absent = [q for q in sorted(queues) if not fact(q, "exists")]
    detached = [q for q in sorted(queues) if q not in absent and not fact(q, "attached")]
    untriggered = [
        q for q in sorted(queues) if q not in absent + detached and not fact(q, "trigger")
    ]
    if not absent and not detached and not untriggered:
        return ok(name, "on " + ", ".join(sorted(queues)))
    problems = []
    if absent:
        problems.append("no such queue: " + ", ".join(absent))
    if detached:
        problems.append("not attached: " + ", ".join(detached))
    if untriggered:
        problems.append("no webhook trigger on " + ", ".join(untriggered))
    attach = " ".join(f"select queue_worker.attach_queue('{q}');" for q in absent + detached)
    fix = (
        "in a migration of your project, "
        + (attach or "select queue_worker.attach_queue('<queue>');")
        + " (it creates the queue if missing, its trigger and its grants)"
    )
    if untriggered and not attach:
        fix = (
            " ".join(f"select queue_worker.attach_queue('{q}');" for q in untriggered)
            + " in a migration puts the trigger back"
        )
    return failed(name, "; ".join(problems), fix)


# -- mail ---------------------------------------------------------------------


def _stage(error: BaseException | None) -> tuple[str, str]:
    """Which SMTP stage failed (connect, tls, login) and why, from Mailer.check()'s cause."""
    if isinstance(error, aiosmtplib.SMTPAuthenticationError):
        return "login", f"{error.code} {error.message}"
    context = error.__context__ if error is not None else None
    tls_error = error if isinstance(error, ssl.SSLError) else context
    if isinstance(tls_error, ssl.SSLError):
        reason = str(tls_error.reason or tls_error)
        verify = getattr(tls_error, "verify_message", None)
        return "tls", f"{reason}: {verify}" if verify else reason
    if isinstance(error, aiosmtplib.SMTPException) and "STARTTLS" in str(error):
        return "tls", str(error)
    if isinstance(error, aiosmtplib.SMTPConnectTimeoutError):
        return "connect", "no greeting in time (an implicit-TLS port with STARTTLS settings?)"
    return "connect", f"{type(error).__name__}: {error}" if error is not None else "failed"


def mail_not_needed(settings: Settings) -> Result:
    """The one mail line when no served queue sends mail: nothing to check."""
    detail = "not needed (no served queue sends mail)"
    if settings.smtp_host and not settings.mail_outbox:
        detail += "; SMTP_HOST is set but not checked"
    return not_applicable("outbox" if settings.mail_outbox else "smtp", detail)


async def check_mail(
    settings: Settings, mailer: Mailer, mail_queues: Sequence[str]
) -> list[Result]:
    """SMTP connect, TLS and login with the Mailer's own code; or the local outbox.

    Only when a served queue sends mail (`mail_queues`); otherwise one N/A line.
    """
    if not mail_queues:
        return [mail_not_needed(settings)]
    if isinstance(mailer, Outbox):
        try:
            await mailer.check()
        except JobError as error:
            return [failed("outbox", f"cannot write files: {error.__cause__ or error}")]
        return [ok("outbox", "local mode writes mail as .eml files (no SMTP_HOST set)")]
    where = f"{settings.smtp_host}:{settings.smtp_port}"
    tls = (
        "implicit TLS" if settings.smtp_ssl_tls else "STARTTLS" if settings.smtp_starttls else None
    )
    user = settings.smtp_user
    try:
        await mailer.check()
    except JobError as error:
        stage, reason = _stage(error.__cause__)
    else:
        stage, reason = "", ""
    results: list[Result] = []
    order = ("connect", "tls", "login")
    reached = order.index(stage) if stage else len(order)
    for index, step in enumerate(order):
        name = f"smtp {step}"
        if step == "tls" and tls is None:
            results.append(not_applicable(name, "SMTP_STARTTLS and SMTP_SSL_TLS are off"))
            continue
        if step == "login" and not user:
            results.append(not_applicable(name, "no SMTP_USER: the server takes mail unsigned"))
            continue
        if index < reached:
            results.append(ok(name, _smtp_ok(step, where, tls, user)))
        elif index == reached:
            results.append(failed(name, reason, _smtp_fix(step)))
        else:
            results.append(skipped(name, f"not checked: smtp {stage} failed"))
    return results


def _smtp_ok(step: str, where: str, tls: str | None, user: str | None) -> str:
    if step == "connect":
        return f"{where} answers"
    if step == "tls":
        return f"{tls}, certificate verified"
    return f"logged in as {user}"


def _smtp_fix(step: str) -> str:
    if step == "connect":
        return (
            "check SMTP_HOST and SMTP_PORT, and that outbound SMTP is open from here; "
            "port 465 needs SMTP_SSL_TLS=true and SMTP_STARTTLS=false"
        )
    if step == "tls":
        return (
            "port 587 takes STARTTLS (SMTP_STARTTLS=true), port 465 implicit TLS "
            "(SMTP_SSL_TLS=true, SMTP_STARTTLS=false); a private CA goes in SMTP_CA_FILE"
        )
    return "check SMTP_USER and SMTP_PASSWORD (many providers want an API key or app password)"


async def at_start(
    settings: Settings, rpc: RpcCaller, queues: Sequence[str], *, timeout: float = 5.0
) -> list[Result]:
    """The database checks of `check` that failed, for the log at start.

    A service that starts against a project missing a migration, a Vault secret or a
    queue's attach_queue would otherwise only show it as jobs that never run. Two
    calls (the ledger and preflight()), bounded by `timeout`; never raises.
    """
    try:
        async with asyncio.timeout(timeout):
            database, applied, reachable = await check_database(settings, rpc)
            if not reachable:
                return [database]
            results = [check_migrations(settings, applied)]
            results.extend(await database_facts(settings, rpc, queues, reachable))
    except TimeoutError:
        return [failed("rpc", f"no answer within {timeout:g}s at start")]
    except Exception as error:  # noqa: BLE001 - a check at start never stops the start
        return [failed("preflight", f"the check at start failed: {error!r}")]
    return [result for result in results if result.status == "fail"]


async def run(
    settings: Settings,
    rpc: RpcCaller,
    mailer: Mailer,
    queues: Sequence[str],
    *,
    mail_queues: Sequence[str],
    timeout: float = 30.0,
) -> list[Result]:
    """Every check after the settings, in order; each bounded by `timeout` seconds.

    `mail_queues`, the served queues that send mail: without any, SMTP is not checked.
    """
    try:
        async with asyncio.timeout(timeout):
            database, applied, reachable = await check_database(settings, rpc)
    except TimeoutError:
        database = failed("rpc", f"no answer within {timeout:g}s")
        applied, reachable = None, False
    results = [database]
    if reachable:
        results.append(check_migrations(settings, applied))
    else:
        results.append(skipped("migrations", "not checked: the database did not answer"))
    try:
        async with asyncio.timeout(timeout):
            results.extend(await database_facts(settings, rpc, queues, reachable))
    except TimeoutError:
        results.append(failed("preflight", f"no answer within {timeout:g}s"))
    try:
        async with asyncio.timeout(timeout):
            results.extend(await check_mail(settings, mailer, mail_queues))
    except TimeoutError:
        results.append(
            failed("smtp connect", f"no answer within {timeout:g}s", _smtp_fix("connect"))
        )
    return results
