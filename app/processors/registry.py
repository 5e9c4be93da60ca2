"""The registry: which queues this process serves, with which processor and limits.

Built once at start. Without a queues file the service serves the three built-in
queues exactly as it always has (`email_queue`, `payments_queue`, `reports_queue`,
each with the global settings). With one (QUEUES_FILE, else `./queues.toml` when
present) it serves the queues the file lists, and only those:

    [queues.sms_queue]
    processor = "forward"                      # built-in: email, reports, payments, forward
    url = "https://<ref>.supabase.co/functions/v1/send-sms"
    headers = { Authorization = "Bearer ${SMS_FUNCTION_KEY}" }
    max_concurrency = 8
    rate_per_second = 14

    [queues.push_queue]
    processor = "myjobs.push:send_push"        # module:attribute, see app/jobs.py
    job_timeout_seconds = 120
    options = { endpoint = "${PUSH_URL}" }     # given to a factory as resources.options
    mail = true                                # it sends mail with resources.mailer

`QUEUES` narrows the served queues to some of the file's. `${NAME}` in any string
of a served queue comes from the environment (or `.env`); the file never holds
secrets. Anything wrong (a missing variable, an unknown key, an unknown processor,
an import that fails, a queue named twice) stops start-up with one line naming the
file, the queue and the key (`ConfigError`, exit 2), as bad settings do.

Every limit not set for a queue falls back to the global setting of the same name.

Mail: the built-in `email` and `reports` processors send mail, `payments` and
`forward` do not (payments enqueues its receipts on email_queue), and a processor of
your own does when its table says `mail = true`. SMTP_HOST and MAIL_FROM are required
(`require_mail`) only when a served queue sends mail; without them, a processor of
your own that sends mail anyway gets a PermanentError saying what to set
(app/mail.py `MailNotConfigured`): it cannot be known before it runs whether it will.
`load_queues()` does all the checking that needs no running service; the lifespan
then calls `build_processors()`, which calls the factories with the shared resources.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.config import ConfigError, Settings
from app.jobs import Resources
from app.mail import Mailer, MailNotConfigured
from app.processors import Processor
from app.processors.forward import ForwardOptions
from app.processors.plugins import (
    Factory,
    Handler,
    PluginError,
    as_processor,
    from_factory,
    inspect_target,
    resolve,
)
from app.queue.backend import RpcCaller

DEFAULT_FILE = Path("queues.toml")
MAX_FILE_BYTES = 1024 * 1024
QUEUE_NAME = re.compile(r"[a-z0-9_]{1,47}")  # what pgmq (and attach_queue) accept
VARIABLE = re.compile(r"\$\{([^}]*)\}")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Builtin:
    """A built-in processor: its factory, and the model of its own keys (if any)."""

    factory: str
    options: type[BaseModel] | None = None
    mail: bool = False  # sends mail: the service needs SMTP_HOST and MAIL_FROM


# Built-in processors are factories like a user's own, registered by name here.
BUILTINS: dict[str, Builtin] = {
    "email": Builtin("app.processors.email:processor", mail=True),
    # Receipts are enqueued on email_queue by the RPC; the email processor sends them.
    "payments": Builtin("app.processors.payments:processor"),
    "reports": Builtin("app.processors.reports:processor", mail=True),
    "forward": Builtin("app.processors.forward:processor", ForwardOptions),
}
# What the service serves without a queues file.
DEFAULT_QUEUES: Mapping[str, str] = MappingProxyType(
    {"email_queue": "email", "payments_queue": "payments", "reports_queue": "reports"}
)


class Limits(BaseModel):
    """The per-queue options; unset ones fall back to the global settings."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    max_concurrency: int | None = Field(None, ge=1, le=10_000)
    rate_per_second: float | None = Field(None, gt=0, le=100_000)
    max_attempts: int | None = Field(None, ge=1, le=1_000)
    retry_base_seconds: float | None = Field(None, gt=0, le=86_400)
    retry_max_seconds: float | None = Field(None, gt=0, le=7 * 86_400)
    visibility_timeout_seconds: int | None = Field(None, ge=3, le=86_400)
    job_timeout_seconds: float | None = Field(None, gt=0, le=86_400)


LIMIT_KEYS = frozenset(Limits.model_fields)


@dataclass(frozen=True)
class QueueSpec:
    """One served queue, resolved: what the runner and the lifespan read."""

    name: str
    processor: str  # as written: a built-in name or module:attribute
    max_concurrency: int
    rate_per_second: float | None  # per process; None: no limit
    max_attempts: int
    retry_base_seconds: float
    retry_max_seconds: float
    visibility_timeout_seconds: int
    job_timeout_seconds: float
    # The processor's own keys (forward's url, a plugin's options), `${NAME}` expanded.
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    # Its processor sends mail: a built-in that does, or `mail = true` for one's own.
    mail: bool = False


@dataclass(frozen=True)
class QueuePlan:
    """The served queues, checked, with what builds each one's processor."""

    file: Path | None
    queues: Mapping[str, QueueSpec]
    targets: Mapping[str, Handler | Factory] = field(repr=False)

    @property
    def names(self) -> list[str]:
        return sorted(self.queues)

    @property
    def mail_queues(self) -> list[str]:
        """The served queues whose processors send mail (they need the mail settings)."""
        return sorted(name for name, spec in self.queues.items() if spec.mail)


def require_mail(settings: Settings, plan: QueuePlan) -> None:
    """ConfigError (one line) when a served queue sends mail and a mail setting is missing.

    Naming the variables as a missing setting is named, and the queues that need them.
    """
    queues = plan.mail_queues
    missing = settings.missing_mail()
    if queues and missing:
        problems = "; ".join(f"{name}: is required but not set" for name in missing)
        raise ConfigError(
            f"invalid configuration: {problems} (served queues that send mail: {', '.join(queues)})"
        )


class _Problem(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")


def queues_file(settings: Settings) -> Path | None:
    """QUEUES_FILE, else ./queues.toml when present, else None (the built-in queues)."""
    if settings.queues_file is not None:
        return settings.queues_file
    return DEFAULT_FILE if DEFAULT_FILE.is_file() else None


def environment() -> dict[str, str]:
    """Where `${NAME}` is looked up: the environment, over `.env` (as Settings reads them)."""
    values: dict[str, str] = {}
    if Path(".env").is_file():
        values.update({k: v for k, v in dotenv_values(".env").items() if v is not None})
    values.update(os.environ)
    return values


def load_queues(settings: Settings, environ: Mapping[str, str] | None = None) -> QueuePlan:
    """The queues this process serves, fully checked; ConfigError (one line) otherwise."""
    path = queues_file(settings)
    where = str(path) if path is not None else "built-in queues"
    try:
        tables = _read(path) if path is not None else _defaults()
        return _plan(settings, path, tables, environ if environ is not None else environment())
    except _Problem as problem:
        raise ConfigError(f"invalid configuration: {where}: {problem}") from None


def _defaults() -> dict[str, dict[str, Any]]:
    return {name: {"processor": kind} for name, kind in DEFAULT_QUEUES.items()}


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise _Problem("QUEUES_FILE", f"cannot be read ({error.strerror or error})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise _Problem("file", f"is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Problem("file", "is not UTF-8 text") from None
    _check_duplicates(text)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise _Problem("file", f"is not valid TOML: {error}") from None
    unknown = sorted(set(document) - {"queues"})
    if unknown:
        raise _Problem(unknown[0], "unknown key; the file holds [queues.<name>] tables only")
    queues = document.get("queues")
    if not isinstance(queues, dict) or not queues:
        raise _Problem("queues", "no queues: add a [queues.<name>] table for each queue")
    for name, table in queues.items():
        if not QUEUE_NAME.fullmatch(name):
            raise _Problem(
                f"queues.{name}",
                "invalid queue name: 1 to 47 lowercase letters, digits and _ (as pgmq takes)",
            )
        if not isinstance(table, dict):
            raise _Problem(f"queues.{name}", "must be a table ([queues.<name>])")
    return queues


_HEADER = re.compile(r"^\s*\[\s*queues\s*\.\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*\]")


def _check_duplicates(text: str) -> None:
    """A queue declared twice, named with both lines (TOML would only say "twice")."""
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _HEADER.match(line)
        if match is None:
            continue
        name = match.group(1).strip("\"'")
        if name in seen:
            raise _Problem(f"queues.{name}", f"declared twice (lines {seen[name]} and {number})")
        seen[name] = number


def _plan(
    settings: Settings,
    path: Path | None,
    tables: Mapping[str, Mapping[str, Any]],
    environ: Mapping[str, str],
) -> QueuePlan:
    served = _served(settings, tables, path)
    if path is not None:
        directory = str(path.resolve().parent)
        if directory not in sys.path:
            sys.path.insert(0, directory)  # plugins live next to queues.toml
    specs: dict[str, QueueSpec] = {}
    targets: dict[str, Handler | Factory] = {}
    for name in sorted(tables):
        spec, target = _queue(settings, name, tables[name], environ, resolve_it=name in served)
        if name in served:
            assert target is not None
            specs[name], targets[name] = spec, target
    return QueuePlan(path, MappingProxyType(specs), MappingProxyType(targets))


def _served(
    settings: Settings, tables: Mapping[str, Mapping[str, Any]], path: Path | None
) -> set[str]:
    if settings.queues is None:
        return set(tables)
    unknown = [name for name in settings.queues if name not in tables]
    if unknown:
        source = f"not in {path}" if path is not None else "not a built-in queue; see queues.toml"
        raise ConfigError(
            f"invalid configuration: QUEUES: no processor for {', '.join(map(repr, unknown))} "
            f"({source}); known queues: {', '.join(sorted(tables))}"
        )
    return set(settings.queues)


def _queue(
    settings: Settings,
    name: str,
    table: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    resolve_it: bool,
) -> tuple[QueueSpec, Handler | Factory | None]:
    prefix = f"queues.{name}"
    processor = table.get("processor")
    if processor is None:
        raise _Problem(
            f"{prefix}.processor",
            f"is required: a built-in ({', '.join(sorted(BUILTINS))}) or module:attribute",
        )
    if resolve_it:
        processor = _expand(processor, f"{prefix}.processor", environ)
    if not isinstance(processor, str):
        raise _Problem(f"{prefix}.processor", "must be a string")
    builtin = BUILTINS.get(processor)
    if builtin is not None and "mail" in table:
        raise _Problem(
            f"{prefix}.mail",
            f"only for a processor of your own: the built-in {processor} processor "
            f"{'always sends' if builtin.mail else 'never sends'} mail",
        )
    mail = table.get("mail", False)
    if not isinstance(mail, bool):
        raise _Problem(f"{prefix}.mail", "must be true or false (does the processor send mail?)")
    rest = {
        k: v for k, v in table.items() if k not in {"processor", "mail"} and k not in LIMIT_KEYS
    }
    allowed = set(builtin.options.model_fields) if builtin and builtin.options else set()
    if builtin is None:
        allowed = {"options"}
    for key in rest:
        if key not in allowed:
            kind = f"a {processor} queue" if builtin else "a queue with a processor of your own"
            own = {"processor"} if builtin else {"processor", "mail"}
            keys = ", ".join(sorted(LIMIT_KEYS | allowed | own))
            raise _Problem(f"{prefix}.{key}", f"unknown key; the keys of {kind} are: {keys}")
    try:
        limits = Limits.model_validate({k: v for k, v in table.items() if k in LIMIT_KEYS})
    except ValidationError as error:
        raise _Problem(*_first(prefix, error)) from None
    options: dict[str, Any] = {}
    target: Handler | Factory | None = None
    if resolve_it:
        if builtin is None:
            raw = rest.get("options", {})
            if not isinstance(raw, dict):
                raise _Problem(f"{prefix}.options", "must be a table")
            options = _expand(raw, f"{prefix}.options", environ)
        else:
            options = _expand(rest, prefix, environ)
            if builtin.options is not None:
                try:
                    builtin.options.model_validate(options)
                except ValidationError as error:
                    raise _Problem(*_first(prefix, error)) from None
        target = _target(prefix, processor, builtin)
    mail = builtin.mail if builtin is not None else mail
    return _spec(settings, name, processor, limits, options, prefix, mail=mail), target


def _target(prefix: str, processor: str, builtin: Builtin | None) -> Handler | Factory:
    path = builtin.factory if builtin is not None else processor
    try:
        return inspect_target(resolve(path), path)
    except PluginError as error:
        raise _Problem(f"{prefix}.processor", str(error)) from None


def _spec(
    settings: Settings,
    name: str,
    processor: str,
    limits: Limits,
    options: dict[str, Any],
    prefix: str,
    *,
    mail: bool,
) -> QueueSpec:
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    spec = QueueSpec(
        name=name,
        processor=processor,
        max_concurrency=pick(limits.max_concurrency, settings.max_concurrency),
        rate_per_second=limits.rate_per_second,
        max_attempts=pick(limits.max_attempts, settings.max_attempts),
        retry_base_seconds=pick(limits.retry_base_seconds, settings.retry_base_seconds),
        retry_max_seconds=pick(limits.retry_max_seconds, settings.retry_max_seconds),
        visibility_timeout_seconds=pick(
            limits.visibility_timeout_seconds, settings.visibility_timeout_seconds
        ),
        job_timeout_seconds=pick(limits.job_timeout_seconds, settings.job_timeout_seconds),
        options=MappingProxyType(options),
        mail=mail,
    )
    if spec.retry_max_seconds < spec.retry_base_seconds:
        key = "retry_max_seconds" if limits.retry_max_seconds is not None else "retry_base_seconds"
        raise _Problem(
            f"{prefix}.{key}",
            f"retry_max_seconds ({spec.retry_max_seconds:g}) is below retry_base_seconds "
            f"({spec.retry_base_seconds:g})",
        )
    return spec


def _first(prefix: str, error: ValidationError) -> tuple[str, str]:
    """The first problem of a validation error as (key, message), never the value."""
    item = error.errors(include_input=False, include_url=False)[0]
    key = ".".join([prefix, *(str(part) for part in item["loc"])])
    message = str(item["msg"]).removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        message = "unknown key"
    return key, message


def _expand(value: Any, key: str, environ: Mapping[str, str]) -> Any:
    """`${NAME}` replaced from the environment, in every string inside `value`."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if not VARIABLE_NAME.fullmatch(name):
                raise _Problem(key, f"${{{name}}} is not a variable name (letters, digits, _)")
            found = environ.get(name)
            if found is None:
                raise _Problem(key, f"${{{name}}} is not set in the environment")
            if found == "":
                raise _Problem(key, f"${{{name}}} is set but empty")
            return found

        return VARIABLE.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{key}.{k}", environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{key}[{i}]", environ) for i, v in enumerate(value)]
    return value


async def build_processors(
    plan: QueuePlan,
    *,
    settings: Settings,
    http: httpx.AsyncClient,
    mailer: Mailer,
    rpc: RpcCaller,
) -> dict[str, Processor]:
    """Each served queue's processor, factories called with the shared resources."""
    where = str(plan.file) if plan.file is not None else "built-in queues"
    processors: dict[str, Processor] = {}
    for name, spec in plan.queues.items():
        target = plan.targets[name]
        if isinstance(target, Handler):
            processors[name] = as_processor(target)
            continue
        # Without mail settings, a processor that sends anyway is refused naming its queue.
        queue_mailer = mailer.for_queue(name) if isinstance(mailer, MailNotConfigured) else mailer
        resources = Resources(settings, http, queue_mailer, rpc, name, spec.options)
        path = BUILTINS[spec.processor].factory if spec.processor in BUILTINS else spec.processor
        try:
            processors[name] = await from_factory(target, resources, path)
        except PluginError as error:
            raise ConfigError(
                f"invalid configuration: {where}: queues.{name}.processor: {error}"
            ) from None
    return processors
