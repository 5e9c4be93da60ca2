"""Sending mail with fastapi-mail, templates, and telling a bad address from a bad day.

One `Mailer` per process, created in the lifespan. SMTP replies are sorted into
the job error tree: a 5xx about the message or its recipients is permanent, while
connection, login, timeout and 4xx failures are retryable (the message is fine;
the server or our credentials are not, and retrying later can succeed).

Templates live in `app/templates/email/<locale>/<name>.html` and `.txt`, sharing the
layouts `base.html` and `base.txt`; the `.txt` file's `subject` block is the subject.
They are compiled once at start into one Jinja2 environment (the engine fastapi-mail
uses) with strict undefined variables: a missing variable is an error that names
it, never an empty gap in a mail. HTML is autoescaped, plain text is not.
fastapi-mail's own template path builds a new environment for every message and
escapes plain text as HTML, so the bodies are rendered here and handed to it.

Connections are reused: mails that go out together share one SMTP session (up to
`SMTP_MAX_CONNECTIONS` at once, kept open `SMTP_KEEPALIVE_SECONDS` after the last
mail), and `SMTP_MAX_PER_SECOND` paces sending for providers that throttle.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from email.message import Message
from pathlib import Path
from typing import Any

import aiosmtplib
import jinja2
from fastapi_mail import ConnectionConfig, FastMail, MessageSchema, MessageType
from fastapi_mail.schemas import MultipartSubtypeEnum
from pydantic import NameEmail
from starlette.datastructures import Headers, UploadFile

from app import metrics
from app.config import Settings
from app.errors import JobError, PermanentError, RetryableError
from app.tracing import OFF, AttributeValue, Tracing

log = logging.getLogger(__name__)

LOCALES = ("en", "ru")
# Collapsed to one space in a rendered subject: a variable can never start a new header.
_LINE_BREAKS = re.compile(r"[\r\n\t\v\f\x85\u2028\u2029 ]+")
TEMPLATES_DIR = Path(__file__).with_name("templates") / "email"
# Mails with more attachment bytes than this are composed off the event loop.
COMPOSE_IN_THREAD_BYTES = 256 * 1024


@dataclass(frozen=True)
class Address:
    """An address with an optional display name."""

    email: str
    name: str | None = None


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes


@dataclass(frozen=True)
class Mail:
    """A mail ready to send: at least one of `text` and `html`."""

    to: list[Address]
    subject: str
    text: str | None = None
    html: str | None = None
    cc: list[Address] = field(default_factory=list)
    bcc: list[Address] = field(default_factory=list)
    reply_to: list[Address] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)


@dataclass(frozen=True)
class Rendered:
    """A template rendered for one mail."""

    subject: str
    html: str
    text: str


def _money(value: object, locale: str) -> str:
    """`1234.50` -> `1,234.50` (en) or `1 234,50` (ru): grouped, digits exactly as given."""
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return str(value)
    if not amount.is_finite():
        return str(value)
    text = f"{amount:,f}"
    if locale == "ru":
        return text.replace(",", "\u202f").replace(".", ",")
    return text


def _datetime(value: object) -> str:
    """An ISO 8601 timestamp as `2026-11-27 21:32 UTC`; anything else unchanged."""
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC)
    return parsed.strftime("%Y-%m-%d %H:%M UTC")


class Templates:
    """The mail templates, compiled once; `render()` is thread-safe."""

    def __init__(self, directory: Path = TEMPLATES_DIR) -> None:
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(directory),
            autoescape=jinja2.select_autoescape(["html"]),
            undefined=jinja2.StrictUndefined,
            auto_reload=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.filters["money"] = _money
        self._env.filters["datetime"] = _datetime
        self._compiled: dict[tuple[str, str], tuple[jinja2.Template, jinja2.Template]] = {}
        for locale in LOCALES:
            for path in sorted((directory / locale).glob("*.html")):
                html = self._env.get_template(f"{locale}/{path.name}")
                text = self._env.get_template(f"{locale}/{path.stem}.txt")
                if "subject" not in text.blocks:
                    raise RuntimeError(f"template {locale}/{path.stem}.txt has no subject block")
                self._compiled[(path.stem, locale)] = (html, text)
        for name in self.names:
            missing = [loc for loc in LOCALES if (name, loc) not in self._compiled]
            if missing:
                raise RuntimeError(f"template {name!r} is missing locale(s) {missing}")

    @property
    def names(self) -> list[str]:
        return sorted({name for name, _ in self._compiled})

    def render(self, name: str, locale: str, context: Mapping[str, Any]) -> Rendered:
        """Renders template `name` in `locale`; PermanentError names what is wrong."""
        compiled = self._compiled.get((name, locale))
        if compiled is None:
            if name not in self.names:
                raise PermanentError(f"unknown template {name!r}; known: {', '.join(self.names)}")
            raise PermanentError(f"template {name!r} has no locale {locale!r}")
        html, text = compiled
        variables = {**context, "locale": locale}
        try:
            subject = "".join(text.blocks["subject"](text.new_context(variables)))
            rendered = Rendered(
                subject=_LINE_BREAKS.sub(" ", subject).strip(),
                html=html.render(variables),
                text=text.render(variables).strip() + "\n",
            )
        except jinja2.UndefinedError as error:
            raise PermanentError(
                f"template {name!r} ({locale}): {error.message or 'undefined variable'}"
            ) from None
        except (jinja2.TemplateError, TypeError, ValueError) as error:
            raise PermanentError(f"template {name!r} ({locale}) failed: {error}") from None
        if not rendered.subject:
            raise PermanentError(f"template {name!r} ({locale}) rendered an empty subject")
        return rendered


def connection_config(settings: Settings) -> ConnectionConfig:
    """fastapi-mail's config from our settings; every field explicit.

    ConnectionConfig is itself a BaseSettings and would otherwise pick up stray
    MAIL_* variables from the environment.
    """
    password = settings.smtp_password.get_secret_value() if settings.smtp_password else ""
    return ConnectionConfig(
        MAIL_USERNAME=settings.smtp_user or "",
        MAIL_PASSWORD=password,
        MAIL_SERVER=settings.smtp_host,
        MAIL_PORT=settings.smtp_port,
        MAIL_STARTTLS=settings.smtp_starttls,
        MAIL_SSL_TLS=settings.smtp_ssl_tls,
        MAIL_FROM=settings.mail_from,
        MAIL_FROM_NAME=settings.mail_from_name,
        USE_CREDENTIALS=bool(settings.smtp_user),
        VALIDATE_CERTS=True,
        TIMEOUT=settings.smtp_timeout_seconds,
        CERT_BUNDLE=str(settings.smtp_ca_file) if settings.smtp_ca_file else None,
        MAIL_DEBUG=0,
        SUPPRESS_SEND=0,
        TEMPLATE_FOLDER=None,
        LOCAL_HOSTNAME=None,
    )


def _addresses(addresses: list[Address]) -> list[NameEmail]:
    # fastapi-mail would give a bare address its local part as a display name
    # ("a <a@example.com>"); a name equal to the address is left out instead.
    return [NameEmail(a.name or a.email, a.email) for a in addresses]


def _upload(attachment: Attachment) -> UploadFile:
    return UploadFile(
        file=io.BytesIO(attachment.content),
        filename=attachment.filename,
        headers=Headers({"content-type": attachment.content_type}),
    )


def _schema(mail: Mail) -> MessageSchema:
    common = {
        "recipients": _addresses(mail.to),
        "cc": _addresses(mail.cc),
        "bcc": _addresses(mail.bcc),
        "reply_to": _addresses(mail.reply_to),
        "subject": mail.subject,
        "attachments": [_upload(a) for a in mail.attachments],
    }
    if mail.html is not None and mail.text is not None:
        # Plain first, HTML last: in multipart/alternative the last part is the
        # preferred one, so clients that can show HTML do.
        return MessageSchema(
            **common,
            body=mail.text,
            alternative_body=mail.html,
            subtype=MessageType.plain,
            multipart_subtype=MultipartSubtypeEnum.alternative,
        )
    if mail.html is not None:
        return MessageSchema(**common, body=mail.html, subtype=MessageType.html)
    return MessageSchema(**common, body=mail.text, subtype=MessageType.plain)


def _reply(code: int, message: str) -> str:
    return f"{code} {message}".strip()


def _classify(error: Exception) -> JobError:
    """An SMTP failure as a job error: permanent only when the message itself is refused."""
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        replies = "; ".join(_reply(r.code, r.message) for r in error.recipients)
        if all(500 <= r.code < 600 for r in error.recipients):
            return PermanentError(f"SMTP refused the recipients: {replies}")
        return RetryableError(f"SMTP refused the recipients for now: {replies}")
    if isinstance(error, aiosmtplib.SMTPAuthenticationError | aiosmtplib.SMTPSenderRefused):
        # Our credentials or sender address, not the job: retrying after the
        # configuration is fixed saves the job.
        return RetryableError(f"SMTP refused us: {_reply(error.code, error.message)}")
    if isinstance(error, aiosmtplib.SMTPResponseException):
        reply = _reply(error.code, error.message)
        if 500 <= error.code < 600:
            return PermanentError(f"SMTP rejected the message: {reply}")
        return RetryableError(f"SMTP failed: {reply}")
    return RetryableError(f"SMTP unavailable: {type(error).__name__}: {error}")


def _tls_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if settings.smtp_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.smtp_ca_file))
    return context


async def _closed(transport: asyncio.BaseTransport | None, timeout: float = 2.0) -> None:
    """Waits until a transport's socket is really closed.

    `quit()` returns as soon as the server said goodbye, while a TLS connection
    still exchanges close_notify; a process that exits in that gap leaks the socket.
    """
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    deadline = asyncio.get_running_loop().time() + timeout
    while sock is not None and sock.fileno() != -1:
        if asyncio.get_running_loop().time() > deadline:
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            return
        await asyncio.sleep(0.005)


class _Pacer:
    """At most `rate` starts per second, evenly spaced (no bursts)."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._next)
        self._next = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)


@dataclass
class _Idle:
    smtp: aiosmtplib.SMTP
    since: float


class Mailer:
    """The process's SMTP sender.

    fastapi-mail composes the messages (MIME structure, encodings); delivery goes
    through aiosmtplib, fastapi-mail's own transport, driven here so that
    connections are reused and closed completely, and each SMTP reply is classified.
    """

    def __init__(
        self, settings: Settings, templates: Templates | None = None, *, tracing: Tracing = OFF
    ) -> None:
        self._settings = settings
        self._tracing = tracing
        self._compose = FastMail(connection_config(settings))
        self._tls = _tls_context(settings)
        self.templates = templates or Templates()
        self.default_locale: str = settings.mail_default_locale
        self._keepalive = settings.smtp_keepalive_seconds
        self._slots = asyncio.Semaphore(settings.smtp_max_connections)
        self._idle: list[_Idle] = []
        self._pacer = _Pacer(settings.smtp_max_per_second) if settings.smtp_max_per_second else None
        self._reaper: asyncio.TimerHandle | None = None

    async def compose(self, mail: Mail) -> Message:
        """The MIME message fastapi-mail builds for `mail`.

        Encoding megabytes of attachments takes a while of pure CPU: a large mail is
        composed in a worker thread (with an event loop of its own, as fastapi-mail's
        API is async) so that webhooks are not held up meanwhile.
        """
        schema = _schema(mail)
        if sum(len(a.content) for a in mail.attachments) > COMPOSE_IN_THREAD_BYTES:
            message = await asyncio.to_thread(asyncio.run, self._compose.get_message(schema))
        else:
            message = await self._compose.get_message(schema)
        assert isinstance(message, Message)  # one schema in, one message out
        return message

    async def send(self, mail: Mail) -> None:
        """Sends `mail`; raises PermanentError or RetryableError on failure."""
        message = await self.compose(mail)
        try:
            if self._pacer is not None:
                await self._pacer.wait()
            await self._deliver(message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            metrics.EMAILS.labels("failed").inc()
            raise _classify(error) from None
        except Exception:
            metrics.EMAILS.labels("failed").inc()
            raise
        metrics.EMAILS.labels("sent").inc()

    async def check(self) -> None:
        """Connects, logs in and says NOOP: raises RetryableError (with the cause) if not."""
        smtp = self._client()
        try:
            await smtp.connect(timeout=self._settings.smtp_connect_timeout_seconds)
            await self._login(smtp)
            await smtp.noop()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            raise RetryableError("SMTP check failed") from error
        finally:
            await self._close(smtp)

    async def close(self) -> None:
        """Closes the idle connections (at shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._close(entry.smtp) for entry in idle))

    async def _login(self, smtp: aiosmtplib.SMTP) -> None:
        if self._settings.smtp_user and self._settings.smtp_password:
            await smtp.login(
                self._settings.smtp_user, self._settings.smtp_password.get_secret_value()
            )

    def _client(self) -> aiosmtplib.SMTP:
        settings = self._settings
        return aiosmtplib.SMTP(
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            use_tls=settings.smtp_ssl_tls,
            start_tls=settings.smtp_starttls,
            tls_context=self._tls,
            timeout=settings.smtp_timeout_seconds,
        )

    async def _connection(self) -> aiosmtplib.SMTP:
        """An idle session that still answers, or a new one, connected and logged in."""
        while self._idle:
            entry = self._idle.pop()
            # The server may have closed a parked session: a NOOP tells before a mail
            # is risked on it (a failure mid-mail could not be told from a delivery).
            try:
                await entry.smtp.noop()
                return entry.smtp
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                await self._close(entry.smtp)
        smtp = self._client()
        try:
            await smtp.connect(timeout=self._settings.smtp_connect_timeout_seconds)
            await self._login(smtp)
        except BaseException:
            await self._close(smtp)
            raise
        metrics.SMTP_CONNECTIONS.inc()
        return smtp

    def _keep(self, smtp: aiosmtplib.SMTP) -> bool:
        """Parks a session for reuse; False when reuse is off."""
        if self._keepalive <= 0 or not smtp.is_connected:
            return False
        loop = asyncio.get_running_loop()
        self._idle.append(_Idle(smtp, loop.time()))
        if self._reaper is None:
            self._reaper = loop.call_later(self._keepalive, self._reap)
        return True

    def _reap(self) -> None:
        """Closes sessions idle longer than the keep-alive; runs while any are parked."""
        loop = asyncio.get_running_loop()
        self._reaper = None
        cutoff = loop.time() - self._keepalive
        expired = [entry for entry in self._idle if entry.since <= cutoff]
        self._idle = [entry for entry in self._idle if entry.since > cutoff]
        for entry in expired:
            task = loop.create_task(self._close(entry.smtp))
            _CLOSING.add(task)
            task.add_done_callback(_CLOSING.discard)
        if self._idle:
            wait = self._idle[0].since + self._keepalive - loop.time()
            self._reaper = loop.call_later(max(wait, 0.01), self._reap)

    async def _deliver(self, message: Message) -> None:
        if not self._tracing.enabled:
            await self._send_message(message)
            return
        attributes: dict[str, AttributeValue] = {
            "server.address": self._settings.smtp_host,
            "server.port": self._settings.smtp_port,
            "network.protocol.name": "smtp",
        }
        with self._tracing.span("smtp send", kind="client", attributes=attributes):
            await self._send_message(message)

    async def _send_message(self, message: Message) -> None:
        async with self._slots:
            smtp = await self._connection()
            try:
                await smtp.send_message(message)
            except BaseException:
                # Only a session that just delivered is trusted with the next mail.
                await self._close(smtp)
                raise
            if not self._keep(smtp):
                await self._close(smtp)

    async def _close(self, smtp: aiosmtplib.SMTP) -> None:
        transport = smtp.transport
        if smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()
        else:
            smtp.close()
        await _closed(transport)


# Closing tasks of expired sessions, referenced until done.
_CLOSING: set[asyncio.Task[None]] = set()
