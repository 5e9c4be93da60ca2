"""A real SMTP server for the test bed: aiosmtpd with TLS and AUTH, certificates from trustme.

The service sends mail through aiosmtplib (app/mail.py), so the tests talk to
an actual SMTP listener on a loopback socket rather than to a mock: the TLS
handshake, certificate validation, AUTH and the SMTP reply codes are all the
real thing. Two shapes are offered, the two ways providers are reached:

* ``mode="starttls"`` — the port-587 shape: a plain listener that advertises
  STARTTLS and refuses AUTH and MAIL until the client has upgraded.
* ``mode="tls"`` — the port-465 shape: TLS from the first byte.

The certificate is issued by a throw-away trustme CA for ``localhost`` and
``127.0.0.1``. Its CA certificate is written to ``server.ca_file`` so the
service can be pointed at it (fastapi-mail's ``CERT_BUNDLE``); a client that
does not load it fails verification, which proves the chain is genuine.

Messages are stored in arrival order, parsed with the modern email policy, with
their envelope and the AUTH login that sent them. For reliability tests the
server can reject chosen recipients permanently (5xx at RCPT), refuse at a chosen
stage with a permanent reply (`refuse("data", "552 ...")`), answer with
temporary failures (421/451) at a chosen stage, and be stopped and restarted on
the same port to simulate an outage::

    with running_smtp(username="mailer", password=secrets.token_urlsafe()) as server:
        ...  # send to 127.0.0.1:server.port with cert_bundle=server.ca_file
        [message] = server.wait_for(1)
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import gc
import hmac
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = [
    "DEFAULT_REJECT_REPLY",
    "DEFAULT_TEMPORARY_REPLIES",
    "FaultStage",
    "Mode",
    "ReceivedMessage",
    "SmtpServer",
    "running_smtp",
]

Mode = Literal["starttls", "tls"]
FaultStage = Literal["connect", "mail", "rcpt", "data"]
RecipientMatcher = Callable[[str], bool]

HOST = "127.0.0.1"
# The name the certificate is issued for besides HOST; clients that verify the
# hostname may connect by either.
SERVER_NAME = "localhost"

DEFAULT_REJECT_REPLY = "550 5.1.1 Mailbox unavailable"
# Read-only: it is shared by every server in the process.
DEFAULT_TEMPORARY_REPLIES: Mapping[FaultStage, str] = MappingProxyType(
    {
        # A 421 greeting is how a loaded or shutting-down MTA turns clients away.
        "connect": "421 4.3.2 Service not available, closing transmission channel",
        "mail": "451 4.3.0 Temporary local problem, try again later",
        "rcpt": "451 4.3.0 Temporary local problem, try again later",
        "data": "451 4.3.0 Temporary local problem, try again later",
    }
)
_AUTH_REQUIRED_REPLY = "530 5.7.0 Authentication required"
# How long stop() waits for aborted connections to be torn down.
_DROP_TIMEOUT = 5.0


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted message: the parsed message, its raw bytes and the envelope.

    `raw` is exactly what arrived in DATA (CRLF line endings); `message` is
    parsed from it with line endings normalised to "\n".
    """

    message: EmailMessage
    raw: bytes
    mail_from: str
    rcpt_tos: tuple[str, ...]
    # The AUTH identity the client logged in with (never the password).
    login: str | None
    # The client's (host, port): mails with the same peer came over one session.
    peer: tuple[str, int] | None = None
    # time.monotonic() when DATA was accepted.
    at: float = 0.0


@dataclass
class _Fault:
    reply: str
    # None: until cleared; otherwise how many more times to answer with `reply`.
    remaining: int | None


class _FaultySMTP(SMTP):
    """aiosmtpd's SMTP that registers its connection and can refuse the greeting."""

    def __init__(self, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._owner = handler.owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again after STARTTLS on the same object; the set makes that a no-op.
        self._owner._connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._owner._connections.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        reply = self._owner._take_fault("connect")
        if reply is None:
            await super()._handle_client()
            return
        # aiosmtpd always greets with 220 and has no hook for the greeting, so a
        # server that is "up but refusing" has to be played here.
        await self.push(reply)
        assert self.transport is not None
        self.transport.close()


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _FaultySMTP(self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Port 0 lets the kernel pick a free port at bind time, which cannot race
        # with other processes the way "find a free port, then bind it" can; the
        # readiness probe and every later restart need the real number.
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


class _Handler:
    """aiosmtpd hooks; every decision is delegated to the owning SmtpServer."""

    def __init__(self, owner: SmtpServer) -> None:
        self.owner = owner

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # aiosmtpd's own auth_required check would wrongly demand STARTTLS on an
        # implicit-TLS listener (it only knows about upgraded connections), so
        # authentication is enforced here for both modes instead.
        if not session.authenticated:
            return _AUTH_REQUIRED_REPLY
        if self.owner.mail_delay:
            await asyncio.sleep(self.owner.mail_delay)
        reply = self.owner._take_fault("mail")
        if reply is not None:
            return _closing_if_421(server, reply)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.owner._take_fault("rcpt")
        if reply is not None:
            return _closing_if_421(server, reply)
        rejection = self.owner._rejection_for(address)
        if rejection is not None:
            return rejection
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self.owner._take_fault("data")
        if reply is not None:
            return _closing_if_421(server, reply)
        raw = envelope.original_content or b""
        # SMTP carries CRLF line endings; parse with "\n" as a local delivery
        # agent would store the mail, so get_content() equals the text sent.
        parsed = email.message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=email.policy.default)
        login = session.auth_data if isinstance(session.auth_data, str) else None
        number = self.owner._store(
            ReceivedMessage(
                message=parsed,
                raw=raw,
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                login=login,
                peer=tuple(session.peer[:2]) if isinstance(session.peer, tuple) else None,
                at=time.monotonic(),
            )
        )
        return f"250 2.0.0 OK queued as {number}"


def _closing_if_421(server: SMTP, reply: str) -> str:
    """Schedules the connection to close when `reply` is a 421.

    RFC 5321 §3.8: 421 means the server is closing the channel. The close is
    deferred to the next loop iteration so the reply (written synchronously
    right after the hook returns) is flushed first.
    """
    if reply.startswith("421") and server.transport is not None:
        server.loop.call_soon(server.transport.close)
    return reply


class SmtpServer:
    """A real SMTP server on 127.0.0.1 running in a background thread.

    Create it through `running_smtp()`; the listener survives `stop()` and
    `start()` on the same port, and the received messages survive both.
    """

    def __init__(self, *, mode: Mode, username: str, password: str, port: int = 0) -> None:
        if mode not in ("starttls", "tls"):
            raise ValueError(f"mode must be 'starttls' or 'tls', not {mode!r}")
        if not password:
            raise ValueError("password must not be empty")
        self.mode: Mode = mode
        self.host = HOST
        self.hostname = SERVER_NAME
        self.port = port
        self.username = username
        self.password = password

        self.ca = trustme.CA()
        self._cert = self.ca.issue_cert(SERVER_NAME, HOST)
        self._tmpdir = tempfile.TemporaryDirectory(prefix="qw-smtp-")
        ca_path = Path(self._tmpdir.name) / "ca.pem"
        self.ca.cert_pem.write_to_path(str(ca_path))
        # str, not Path: fastapi-mail's CERT_BUNDLE and aiosmtplib's cert_bundle
        # are declared as str.
        self.ca_file = str(ca_path)

        self._tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(self._tls_context)

        self._condition = threading.Condition()
        self._received: list[ReceivedMessage] = []
        self._faults: dict[FaultStage, _Fault] = {}
        # Seconds to wait before answering MAIL: a slow relay, for timeouts and drains.
        self.mail_delay = 0.0
        self._reject: RecipientMatcher | None = None
        self._reject_reply = DEFAULT_REJECT_REPLY
        self._temporary_failures_served = 0
        self._permanent_failures_served = 0
        # Set while start() runs so the controller's readiness probe does not
        # consume a "connect" fault meant for the code under test.
        self._probing = False
        self._controller: _Controller | None = None
        # Live sessions for stop() to abort. Only the server's event-loop thread
        # touches the set, so it needs no lock.
        self._connections: set[_FaultySMTP] = set()

    # -- lifecycle -------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._controller is not None

    def start(self) -> None:
        """Starts listening, on the same port as before if it was started already."""
        if self._controller is not None:
            raise RuntimeError("SMTP server is already running")
        # A fresh Controller each time: a stopped one has closed its event loop.
        controller = self._make_controller()
        self._probing = True
        try:
            controller.start()
        except BaseException:
            _discard(controller)
            raise
        finally:
            self._probing = False
        self.port = controller.port
        self._controller = controller

    def stop(self) -> None:
        """Stops listening and drops open connections, as a crash or outage would.

        Connected clients see the connection reset; new ones get ECONNREFUSED.
        """
        controller, self._controller = self._controller, None
        if controller is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(
                self._drop_connections(controller.server), controller.loop
            ).result(timeout=_DROP_TIMEOUT + 5)
        finally:
            controller.stop()

    async def _drop_connections(self, listener: asyncio.AbstractServer | None) -> None:
        # Controller.stop() alone cancels the session tasks and closes the loop
        # while TLS connections may still be mid-shutdown; their sockets would
        # then be garbage-collected open (a ResourceWarning, an error under
        # filterwarnings=error). Aborting them first and waiting for
        # connection_lost leaves nothing behind. Aborting, not closing
        # gracefully: a TLS close waits for the client's close_notify, and the
        # client may be blocked on this very call.
        if listener is not None:
            listener.close()
        for connection in list(self._connections):
            transport = connection.transport
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DROP_TIMEOUT
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.005)

    def close(self) -> None:
        """Stops the server and removes the certificate files."""
        try:
            self.stop()
        finally:
            self._tmpdir.cleanup()

    def __enter__(self) -> SmtpServer:
        try:
            self.start()
        except BaseException:
            # Left to the finalizer, the directory would warn (ResourceWarning).
            self._tmpdir.cleanup()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _make_controller(self) -> _Controller:
        implicit_tls = self.mode == "tls"
        return _Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            ssl_context=self._tls_context if implicit_tls else None,
            # Without this aiosmtpd resolves the machine's FQDN, which can stall on DNS.
            server_hostname=SERVER_NAME,
            tls_context=None if implicit_tls else self._tls_context,
            require_starttls=not implicit_tls,
            # On the implicit-TLS listener the whole connection is encrypted, but
            # aiosmtpd only recognises TLS obtained through STARTTLS.
            auth_require_tls=not implicit_tls,
            authenticator=self._authenticate,
        )

    # -- authentication --------------------------------------------------------

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        if mechanism not in ("PLAIN", "LOGIN") or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        # Constant-time comparison: cheap, and keeps the test double honest.
        ok = hmac.compare_digest(auth_data.login, self.username.encode()) & hmac.compare_digest(
            auth_data.password, self.password.encode()
        )
        if not ok:
            # handled=False makes aiosmtpd answer "535 5.7.8 ... credentials invalid".
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=self.username)

    # -- received messages -----------------------------------------------------

    def _store(self, received: ReceivedMessage) -> int:
        with self._condition:
            self._received.append(received)
            self._condition.notify_all()
            return len(self._received)

    @property
    def received(self) -> list[ReceivedMessage]:
        """A snapshot of the accepted messages with their envelopes, oldest first."""
        with self._condition:
            return list(self._received)

    @property
    def messages(self) -> list[EmailMessage]:
        """A snapshot of the accepted messages, parsed, oldest first."""
        return [r.message for r in self.received]

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[EmailMessage]:
        """Blocks until at least `count` messages arrived; returns all of them.

        Raises TimeoutError with the number that did arrive otherwise.
        """
        with self._condition:
            if not self._condition.wait_for(lambda: len(self._received) >= count, timeout):
                raise TimeoutError(
                    f"expected {count} message(s) within {timeout}s, got {len(self._received)}"
                )
            return [r.message for r in self._received]

    async def wait_for_async(self, count: int = 1, timeout: float = 10.0) -> list[EmailMessage]:
        """`wait_for` without blocking the calling event loop (e.g. the app's own)."""
        return await asyncio.to_thread(self.wait_for, count, timeout)

    def clear(self) -> None:
        """Forgets the received messages."""
        with self._condition:
            self._received.clear()

    # -- fault injection -------------------------------------------------------

    def reject_recipients(
        self,
        match: Iterable[str] | RecipientMatcher | None,
        *,
        reply: str = DEFAULT_REJECT_REPLY,
    ) -> None:
        """Rejects matching recipients at RCPT with a permanent 5xx `reply`.

        `match` is a collection of addresses (compared case-insensitively) or a
        predicate on the address; None stops rejecting. Replaces any earlier
        rejection rule.
        """
        if not reply[:1] == "5":
            raise ValueError(f"a permanent rejection needs a 5xx reply, not {reply!r}")
        matcher: RecipientMatcher | None
        if match is None or callable(match):
            matcher = match
        else:
            if isinstance(match, str):
                raise TypeError("pass a collection of addresses, not a single string")
            addresses = frozenset(a.lower() for a in match)

            def matcher(address: str) -> bool:
                return address.lower() in addresses

        with self._condition:
            self._reject = matcher
            self._reject_reply = reply

    def fail_temporarily(
        self,
        stage: FaultStage = "mail",
        *,
        reply: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answers a temporary (4xx) failure at `stage` instead of proceeding.

        "connect" replaces the 220 greeting and hangs up (default 421, server
        busy/down); "mail", "rcpt" and "data" answer that command (default 451),
        and hang up too when the reply is a 421, as RFC 5321 requires. `times`
        limits the fault to the next N occurrences; None keeps it until
        `clear_faults()`. Every reply sent counts in `temporary_failures_served`.
        """
        if stage not in DEFAULT_TEMPORARY_REPLIES:
            raise ValueError(f"unknown stage {stage!r}")
        text = DEFAULT_TEMPORARY_REPLIES[stage] if reply is None else reply
        if not text[:1] == "4":
            raise ValueError(f"a temporary failure needs a 4xx reply, not {text!r}")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None for until cleared)")
        with self._condition:
            self._faults[stage] = _Fault(text, times)

    def refuse(self, stage: FaultStage, reply: str, *, times: int | None = None) -> None:
        """Answers a permanent (5xx) `reply` at "mail", "rcpt" or "data" instead of proceeding.

        What a server says to a message it will never take: `552 5.3.4 Message too
        big` at MAIL FROM (SIZE) or after DATA, `550`/`553`/`554` for policy. `times`
        and `clear_faults()` work as for `fail_temporarily`; these replies count in
        `permanent_failures_served`, not in `temporary_failures_served`.
        """
        if stage == "connect":
            raise ValueError("a refusal answers a command: mail, rcpt or data")
        if not reply[:1] == "5":
            raise ValueError(f"a permanent refusal needs a 5xx reply, not {reply!r}")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None for until cleared)")
        with self._condition:
            self._faults[stage] = _Fault(reply, times)

    @property
    def permanent_failures_served(self) -> int:
        """How many 5xx replies `refuse()` made the server send."""
        with self._condition:
            return self._permanent_failures_served

    def clear_faults(self) -> None:
        """Stops every injected failure: temporary ones and recipient rejections."""
        with self._condition:
            self._faults.clear()
            self._reject = None
            self._reject_reply = DEFAULT_REJECT_REPLY
            self.mail_delay = 0.0

    @property
    def temporary_failures_served(self) -> int:
        """How many temporary-failure replies were sent, e.g. to count retries."""
        with self._condition:
            return self._temporary_failures_served

    def _take_fault(self, stage: FaultStage) -> str | None:
        with self._condition:
            if stage == "connect" and self._probing:
                return None
            fault = self._faults.get(stage)
            if fault is None:
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self._faults[stage]
            if fault.reply.startswith("5"):
                self._permanent_failures_served += 1
            else:
                self._temporary_failures_served += 1
            return fault.reply

    def _rejection_for(self, address: str) -> str | None:
        with self._condition:
            matcher, reply = self._reject, self._reject_reply
        # The predicate runs outside the lock: it is caller code and may be slow.
        if matcher is not None and matcher(address):
            return reply
        return None

    # -- client helpers --------------------------------------------------------

    def open_client_sockets(self) -> list[socket.socket]:
        """Sockets in this process still connected to this server (the client side).

        aiosmtplib (and so fastapi-mail) returns from quit() before its TLS
        shutdown has finished and the socket is closed. An event loop that ends
        right then leaves the socket to the garbage collector, which reports a
        ResourceWarning; tests wait for this list to empty first.
        """
        found = []
        for obj in gc.get_objects():
            if not isinstance(obj, socket.socket) or obj.fileno() == -1:
                continue
            try:
                peer = obj.getpeername()
            except OSError:  # listening, unconnected or reset: not a client of ours
                continue
            if isinstance(peer, tuple) and peer[:2] == (self.host, self.port):
                found.append(obj)
        return found

    async def wait_clients_closed(self, timeout: float = 5.0) -> None:
        """Lets the calling event loop run until no client socket to the server is open."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while open_sockets := self.open_client_sockets():
            if loop.time() >= deadline:
                raise TimeoutError(f"client sockets still open after {timeout}s: {open_sockets}")
            await asyncio.sleep(0.005)

    def client_tls_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts this server's CA."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(context)
        return context

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for `aiosmtplib.send` / `aiosmtplib.SMTP` to reach this server."""
        return {
            "hostname": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "use_tls": self.mode == "tls",
            "start_tls": self.mode == "starttls",
            "cert_bundle": self.ca_file,
        }


def _discard(controller: _Controller) -> None:
    """Releases what a Controller that failed to start still holds."""
    # A failed bind leaves the loop open and no thread; a failed factory leaves
    # the loop running in its thread. Either way an unclosed loop would surface
    # later as a ResourceWarning.
    controller.stop(no_assert=True)
    if not controller.loop.is_closed():
        controller.loop.close()


@contextlib.contextmanager
def running_smtp(
    *,
    mode: Mode = "starttls",
    username: str,
    password: str,
    port: int = 0,
    reject: Iterable[str] | RecipientMatcher | None = None,
) -> Iterator[SmtpServer]:
    """Runs an SMTP server on 127.0.0.1 for the duration of the block.

    `port=0` picks a free port (read it from `server.port`). `reject` makes
    those recipients fail permanently at RCPT from the start.
    """
    server = SmtpServer(mode=mode, username=username, password=password, port=port)
    if reject is not None:
        server.reject_recipients(reject)
    with server:
        yield server
