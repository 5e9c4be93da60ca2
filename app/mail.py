"""Sending mail over SMTP, and telling a bad address from a bad day.

One `Mailer` per process, created in the lifespan. A mail is composed as standard MIME
by `app.mime.compose` (the standard library's EmailMessage; docs/guides/jobs.md#mail
says why not fastapi-mail) and delivered with aiosmtplib over a small pool of sessions.
Templates are `app.mail_templates.Templates`, rendered here before a mail is composed.

Each SMTP reply is sorted into the job error tree by its code and the stage it
answered (`_classify`): a 5xx to MAIL FROM, RCPT TO or DATA refuses this message
(too large, no such mailbox, policy): permanent. A 4xx is retryable, and a 421
(closing) or 451 (local problem) asks for the next attempt after
SMTP_BACKOFF_SECONDS rather than the usual backoff. Connection, TLS, login and
timeout failures are retryable: the message is fine; the server or our credentials
are not, and retrying after a fix can succeed.

Connections are reused: mails that go out together share one SMTP session (up to
`SMTP_MAX_CONNECTIONS` at once, kept open `SMTP_KEEPALIVE_SECONDS` after the last
mail), and `SMTP_MAX_PER_SECOND` paces the start of each mail's transaction (MAIL FROM)
on a session that is ready, so the server sees at most that many a second.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage, Message

import aiosmtplib

from app import metrics
from app.config import Settings
from app.errors import JobError, PermanentError, RetryableError
from app.mail_templates import LOCALES, TEMPLATES_DIR, Rendered, Templates
from app.mime import Address, Attachment, Mail, compose
from app.tracing import OFF, AttributeValue, Tracing
from app.worker.ratelimit import RateLimiter

__all__ = [
    "LOCALES",
    "TEMPLATES_DIR",
    "Address",
    "Attachment",
    "Mail",
    "MailNotConfigured",
    "Mailer",
    "Rendered",
    "Templates",
]

log = logging.getLogger(__name__)

# Mails with more attachment bytes than this are composed off the event loop.
COMPOSE_IN_THREAD_BYTES = 256 * 1024
# Replies that say "not now, and not soon": the next attempt waits SMTP_BACKOFF_SECONDS.
BACK_OFF_CODES = frozenset({421, 451})
# 530 "authentication required" at MAIL FROM is our configuration, not the message.
_CONFIGURATION_CODES = frozenset({530})


def _reply(code: int, message: str) -> str:
    return f"{code} {message}".strip()


def _by_code(stage: str, codes: list[int], replies: str, backoff: float) -> JobError:
    """A reply (or replies, one per recipient) at a message stage, by its code."""
    if all(500 <= code < 600 for code in codes) and not set(codes) & _CONFIGURATION_CODES:
        return PermanentError(f"SMTP refused the message at {stage}: {replies}")
    after = backoff if set(codes) & BACK_OFF_CODES else None
    if set(codes) & _CONFIGURATION_CODES:
        return RetryableError(
            f"SMTP wants a login at {stage} ({replies}): set SMTP_USER and SMTP_PASSWORD",
            after=after,
        )
    return RetryableError(f"SMTP deferred the message at {stage}: {replies}", after=after)


def _classify(error: Exception, backoff: float) -> JobError:
    """An SMTP failure as a job error, by the reply's code and the stage it came at."""
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        replies = "; ".join(_reply(r.code, r.message) for r in error.recipients)
        return _by_code("RCPT TO", [r.code for r in error.recipients], replies, backoff)
    if isinstance(error, aiosmtplib.SMTPSenderRefused):
        return _by_code("MAIL FROM", [error.code], _reply(error.code, error.message), backoff)
    if isinstance(error, aiosmtplib.SMTPDataError):
        return _by_code("DATA", [error.code], _reply(error.code, error.message), backoff)
    if isinstance(error, aiosmtplib.SMTPAuthenticationError):
        # Our credentials, not the job: retrying after the configuration is fixed saves it.
        return RetryableError(f"SMTP refused our login: {_reply(error.code, error.message)}")
    if isinstance(error, aiosmtplib.SMTPResponseException):
        # The greeting, EHLO, STARTTLS: the server or the connection, never the message.
        after = backoff if error.code in BACK_OFF_CODES else None
        return RetryableError(f"SMTP failed: {_reply(error.code, error.message)}", after=after)
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


@dataclass
class _Idle:
    smtp: aiosmtplib.SMTP
    since: float


class Mailer:
    """The process's SMTP sender.

    `app.mime.compose` writes the messages (MIME structure, encodings); delivery goes
    through aiosmtplib, driven here so that connections are reused and closed
    completely, and each SMTP reply is classified.
    """

    def __init__(
        self, settings: Settings, templates: Templates | None = None, *, tracing: Tracing = OFF
    ) -> None:
        self._settings = settings
        self._tracing = tracing
        self._sender = Address(settings.mail_from, settings.mail_from_name or None)
        self._backoff = settings.smtp_backoff_seconds
        self._tls = _tls_context(settings)
        self.templates = templates or Templates()
        self.default_locale: str = settings.mail_default_locale
        self._keepalive = settings.smtp_keepalive_seconds
        self._slots = asyncio.Semaphore(settings.smtp_max_connections)
        self._idle: list[_Idle] = []
        rate = settings.smtp_max_per_second
        self._pacer = RateLimiter(rate) if rate else None
        self._reaper: asyncio.TimerHandle | None = None

    async def compose(self, mail: Mail) -> EmailMessage:
        """The MIME message for `mail`; PermanentError names a header value it refuses.

        Encoding megabytes of attachments takes a while of pure CPU: a large mail is
        composed in a worker thread so that webhooks are not held up meanwhile.
        """
        if sum(len(a.content) for a in mail.attachments) > COMPOSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(compose, mail, self._sender)
        return compose(mail, self._sender)

    async def send(self, mail: Mail) -> None:
        """Sends `mail`; raises PermanentError or RetryableError on failure."""
        message = await self.compose(mail)
        try:
            await self._deliver(message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            metrics.EMAILS.labels("failed").inc()
            raise _classify(error, self._backoff) from None
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
                if self._pacer is not None:
                    # Paced on a ready session, so that the server sees the mails (not
                    # our connection attempts) at most SMTP_MAX_PER_SECOND apart.
                    await self._pacer.wait()
                refused, _ = await smtp.send_message(message)
            except BaseException:
                # Only a session that just delivered is trusted with the next mail.
                await self._close(smtp)
                raise
            if not self._keep(smtp):
                await self._close(smtp)
        if refused:
            # Delivered to the others: a retry would send it to them twice.
            codes = sorted({reply.code for reply in refused.values()})
            log.warning(
                "mail delivered, some recipients refused",
                extra={"refused": len(refused), "codes": codes},
            )

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


class MailNotConfigured(Mailer):
    """The mailer of a service that has no mail settings because none of its queues
    declared that it sends mail (app/processors/registry.py `require_mail`).

    Its templates and default locale work (a factory may read them at start), but
    sending a mail (or composing or checking one) raises PermanentError naming the
    variables to set: the job is archived with that reason, where the operator sees
    it and can replay it once mail is configured, instead of retrying in vain.
    """

    def __init__(
        self,
        settings: Settings,
        missing: Sequence[str],
        templates: Templates | None = None,
        *,
        queue: str | None = None,
    ) -> None:
        super().__init__(settings, templates)
        self.missing = tuple(missing)
        self.queue = queue

    def for_queue(self, queue: str) -> MailNotConfigured:
        """The same refusal, naming the queue whose processor tried to send."""
        return MailNotConfigured(self._settings, self.missing, self.templates, queue=queue)

    def refusal(self) -> PermanentError:
        names = " and ".join(self.missing)
        table = f"[queues.{self.queue}]" if self.queue else "the queue's table"
        return PermanentError(
            f"mail is not configured ({names} {'is' if len(self.missing) == 1 else 'are'} "
            f"not set): set {names} and add mail = true to {table} in queues.toml, so that "
            "start-up requires them, then replay this job"
        )

    async def compose(self, mail: Mail) -> EmailMessage:
        raise self.refusal()

    async def send(self, mail: Mail) -> None:
        raise self.refusal()

    async def check(self) -> None:
        raise self.refusal()

    async def _deliver(self, message: Message) -> None:
        raise self.refusal()
