"""The SMTP test server itself, exercised over real sockets with aiosmtplib and fastapi-mail."""

from __future__ import annotations

import base64
import contextlib
import secrets
import ssl
from collections.abc import AsyncIterator
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest
from fastapi_mail import ConnectionConfig, FastMail, MessageSchema, MessageType

from tests.support.smtp import Mode, SmtpServer, running_smtp

SENDER = "worker@example.com"
RECIPIENT = "alice@example.com"
SUBJECT = "Привет, мир"
BODY = "Тело письма: queue-worker test.\n"


# Every test runs on the event loop: the server fixtures wait there, at
# teardown, for the client sockets to finish closing (see serving()).
pytestmark = pytest.mark.anyio


@pytest.fixture
def password() -> str:
    return secrets.token_urlsafe(24)


@contextlib.asynccontextmanager
async def serving(
    *, mode: Mode = "starttls", password: str, **options: Any
) -> AsyncIterator[SmtpServer]:
    """running_smtp() that, on exit, lets the clients' TLS shutdowns complete.

    Otherwise a socket aiosmtplib is still closing when the test's loop ends
    is collected open and the ResourceWarning fails a later test at random.
    """
    with running_smtp(mode=mode, username="mailer", password=password, **options) as smtp:
        yield smtp
        await smtp.wait_clients_closed()


@pytest.fixture(params=["starttls", "tls"])
async def server(request: pytest.FixtureRequest, password: str) -> AsyncIterator[SmtpServer]:
    async with serving(mode=request.param, password=password) as smtp:
        yield smtp


@pytest.fixture
async def starttls_server(password: str) -> AsyncIterator[SmtpServer]:
    async with serving(mode="starttls", password=password) as smtp:
        yield smtp


def make_message(*recipients: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = ", ".join(recipients or (RECIPIENT,))
    message["Subject"] = SUBJECT
    message.set_content(BODY)
    return message


def client(server: SmtpServer, **overrides: Any) -> aiosmtplib.SMTP:
    options: dict[str, Any] = {
        "hostname": server.host,
        "port": server.port,
        "use_tls": server.mode == "tls",
        "start_tls": server.mode == "starttls",
        "cert_bundle": server.ca_file,
        "timeout": 10,
    }
    options.update(overrides)
    return aiosmtplib.SMTP(**options)


def plain_token(username: str, password: str) -> bytes:
    return base64.b64encode(f"\0{username}\0{password}".encode())


async def test_starttls_delivers_message_with_envelope_and_login(
    starttls_server: SmtpServer,
) -> None:
    server = starttls_server
    errors, _ = await aiosmtplib.send(
        make_message(),
        hostname=server.host,
        port=server.port,
        username=server.username,
        password=server.password,
        start_tls=True,
        cert_bundle=server.ca_file,
        timeout=10,
    )

    assert errors == {}
    [message] = server.wait_for(1, timeout=5)
    assert message["Subject"] == SUBJECT
    assert message["From"] == SENDER
    assert message.get_content() == BODY
    [received] = server.received
    assert received.mail_from == SENDER
    assert received.rcpt_tos == (RECIPIENT,)
    assert received.login == "mailer"
    # The Subject went over the wire RFC 2047-encoded, not as raw UTF-8.
    assert b"=?utf-8?" in received.raw


async def test_implicit_tls_delivers_message(password: str) -> None:
    async with serving(mode="tls", password=password) as server:
        await aiosmtplib.send(
            make_message(),
            hostname=server.host,
            port=server.port,
            username=server.username,
            password=server.password,
            use_tls=True,
            cert_bundle=server.ca_file,
            timeout=10,
        )

        [message] = server.wait_for(1, timeout=5)
        assert message["Subject"] == SUBJECT
        assert server.received[0].rcpt_tos == (RECIPIENT,)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_both_auth_mechanisms_accept_the_credentials(
    server: SmtpServer, mechanism: str
) -> None:
    async with client(server) as smtp:
        await smtp.ehlo()  # the EHLO before STARTTLS is forgotten after the upgrade
        assert {"plain", "login"} <= set(smtp.server_auth_methods)
        if mechanism == "PLAIN":
            response = await smtp.auth_plain(server.username, server.password)
        else:
            response = await smtp.auth_login(server.username, server.password)
        assert response.code == 235
        await smtp.send_message(make_message())

    assert server.received[0].login == "mailer"


async def test_auth_and_mail_before_starttls_are_refused(starttls_server: SmtpServer) -> None:
    server = starttls_server
    async with client(server, start_tls=False) as smtp:
        await smtp.ehlo()
        assert smtp.supports_extension("starttls")
        # AUTH is only advertised once the channel is encrypted.
        assert not smtp.supports_extension("auth")

        auth = await smtp.execute_command(
            b"AUTH", b"PLAIN", plain_token(server.username, server.password)
        )
        assert auth.code == 530

        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await smtp.mail(SENDER)
        assert refused.value.code == 530

    assert server.received == []


async def test_mail_without_auth_is_refused(server: SmtpServer) -> None:
    async with client(server) as smtp:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await smtp.sendmail(SENDER, [RECIPIENT], make_message().as_bytes())
    assert refused.value.code == 530
    assert server.received == []


async def test_wrong_password_is_rejected_with_535(server: SmtpServer) -> None:
    async with client(server) as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
            await smtp.login(server.username, secrets.token_urlsafe(24))
    assert failed.value.code == 535


async def test_certificate_is_not_trusted_without_the_ca_bundle(server: SmtpServer) -> None:
    # Default validation (system trust store, hostname check) but no CA bundle:
    # the handshake must fail, so the chain the server presents is real.
    smtp = client(server, cert_bundle=None, validate_certs=True)
    # aiosmtplib wraps the failure on implicit TLS but lets it through raw on STARTTLS.
    with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError)) as failed:
        await smtp.connect()
    smtp.close()

    assert _caused_by(failed.value, ssl.SSLCertVerificationError)


async def test_verifying_client_context_trusts_the_server(server: SmtpServer) -> None:
    async with client(server, cert_bundle=None, tls_context=server.client_tls_context()) as smtp:
        await smtp.login(server.username, server.password)
        await smtp.send_message(make_message())
    assert len(server.wait_for(1)) == 1


async def test_rejected_recipient_gets_550(password: str) -> None:
    bounced = "ghost@example.com"
    async with serving(password=password, reject={bounced.upper()}) as server:
        async with client(server) as smtp:
            await smtp.login(server.username, server.password)
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                await smtp.send_message(make_message(bounced))

            [error] = refused.value.recipients
            assert error.code == 550
            assert error.recipient == bounced

            # A partly valid envelope is delivered to the valid recipient only.
            errors, _ = await smtp.send_message(make_message(RECIPIENT, bounced))
            assert errors[bounced].code == 550

        [received] = server.received
        assert received.rcpt_tos == (RECIPIENT,)


async def test_rejection_predicate_and_clear_faults(starttls_server: SmtpServer) -> None:
    server = starttls_server
    server.reject_recipients(
        lambda address: address.endswith("@blocked.example.com"),
        reply="554 5.7.1 Recipient address rejected",
    )
    async with client(server) as smtp:
        await smtp.login(server.username, server.password)
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await smtp.send_message(make_message("bob@blocked.example.com"))
        assert refused.value.recipients[0].code == 554

        server.clear_faults()
        await smtp.send_message(make_message("bob@blocked.example.com"))

    assert server.received[0].rcpt_tos == ("bob@blocked.example.com",)


async def test_temporary_failure_at_mail_is_451_until_cleared(server: SmtpServer) -> None:
    server.fail_temporarily("mail")
    async with client(server) as smtp:
        await smtp.login(server.username, server.password)
        for _ in range(2):
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.send_message(make_message())
            assert refused.value.code == 451

        server.clear_faults()
        await smtp.send_message(make_message())

    assert server.temporary_failures_served == 2
    assert len(server.received) == 1


async def test_temporary_failure_at_data_stores_nothing(starttls_server: SmtpServer) -> None:
    server = starttls_server
    server.fail_temporarily("data", times=1)
    async with client(server) as smtp:
        await smtp.login(server.username, server.password)
        with pytest.raises(aiosmtplib.SMTPDataError) as failed:
            await smtp.send_message(make_message())
        assert failed.value.code == 451
        assert server.received == []

        # times=1: the retry goes through.
        await smtp.send_message(make_message())

    assert len(server.wait_for(1)) == 1


async def test_permanent_refusals_at_mail_and_data_are_counted_apart(
    starttls_server: SmtpServer,
) -> None:
    server = starttls_server
    temporary = server.temporary_failures_served
    permanent = server.permanent_failures_served
    server.refuse("mail", "552 5.3.4 Message size exceeds fixed limit", times=1)
    server.refuse("data", "554 5.7.1 Rejected as spam", times=1)
    async with client(server) as smtp:
        await smtp.login(server.username, server.password)
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await smtp.send_message(make_message())
        assert refused.value.code == 552
        with pytest.raises(aiosmtplib.SMTPDataError) as failed:
            await smtp.send_message(make_message())
        assert failed.value.code == 554
        await smtp.send_message(make_message())  # times=1 each: the third goes through

    assert len(server.wait_for(1)) == 1
    assert server.permanent_failures_served - permanent == 2
    assert server.temporary_failures_served == temporary
    with pytest.raises(ValueError):
        server.refuse("data", "451 not permanent")
    with pytest.raises(ValueError):
        server.refuse("connect", "554 no")


async def test_busy_server_greets_with_421_a_limited_number_of_times(server: SmtpServer) -> None:
    server.fail_temporarily("connect", times=2)
    for _ in range(2):
        smtp = client(server)
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as busy:
            await smtp.connect()
        smtp.close()
        assert busy.value.code == 421

    async with client(server) as smtp:
        await smtp.login(server.username, server.password)
        await smtp.send_message(make_message())

    assert server.temporary_failures_served == 2
    assert len(server.received) == 1


async def test_421_at_rcpt_closes_the_connection(starttls_server: SmtpServer) -> None:
    server = starttls_server
    server.fail_temporarily("rcpt", reply="421 4.3.2 Shutting down")
    smtp = client(server)
    await smtp.connect()
    try:
        await smtp.login(server.username, server.password)
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await smtp.sendmail(SENDER, [RECIPIENT], make_message().as_bytes())
        assert refused.value.recipients[0].code == 421
        assert not smtp.is_connected
    finally:
        smtp.close()


async def test_stop_and_start_keep_the_port_and_the_messages(server: SmtpServer) -> None:
    port = server.port
    await aiosmtplib.send(make_message(), **server.client_options())

    server.stop()
    assert not server.is_running
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await aiosmtplib.send(make_message(), **server.client_options())

    server.start()
    assert server.port == port
    await aiosmtplib.send(make_message(), **server.client_options())

    assert len(server.wait_for(2)) == 2


async def test_stop_drops_a_connected_client(server: SmtpServer) -> None:
    smtp = client(server)
    await smtp.connect()
    try:
        await smtp.login(server.username, server.password)
        server.stop()
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.sendmail(SENDER, [RECIPIENT], make_message().as_bytes())
    finally:
        smtp.close()

    server.start()
    await aiosmtplib.send(make_message(), **server.client_options())
    assert len(server.wait_for(1)) == 1


async def test_fixed_port_is_honoured(password: str) -> None:
    with running_smtp(username="mailer", password=password) as first:
        port = first.port
    with running_smtp(username="mailer", password=password, port=port) as second:
        assert second.port == port


async def test_wait_for_times_out_with_the_count_so_far(starttls_server: SmtpServer) -> None:
    with pytest.raises(TimeoutError, match="got 0"):
        starttls_server.wait_for(1, timeout=0.1)


async def test_fault_arguments_are_validated(starttls_server: SmtpServer) -> None:
    with pytest.raises(ValueError):
        starttls_server.fail_temporarily("mail", reply="550 not temporary")
    with pytest.raises(ValueError):
        starttls_server.reject_recipients({RECIPIENT}, reply="451 not permanent")
    with pytest.raises(TypeError):
        starttls_server.reject_recipients(RECIPIENT)


async def test_fastapi_mail_delivers_through_starttls(starttls_server: SmtpServer) -> None:
    server = starttls_server
    # ConnectionConfig is a BaseSettings: every field is passed so MAIL_* variables
    # in the environment cannot change what is being tested.
    config = ConnectionConfig(
        MAIL_USERNAME=server.username,
        MAIL_PASSWORD=server.password,
        MAIL_PORT=server.port,
        MAIL_SERVER="localhost",
        MAIL_STARTTLS=True,
        MAIL_SSL_TLS=False,
        MAIL_DEBUG=0,
        MAIL_FROM=SENDER,
        MAIL_FROM_NAME="Queue Worker",
        TEMPLATE_FOLDER=None,
        SUPPRESS_SEND=0,
        USE_CREDENTIALS=True,
        VALIDATE_CERTS=True,
        TIMEOUT=10,
        LOCAL_HOSTNAME=None,
        CERT_BUNDLE=server.ca_file,
    )
    schema = MessageSchema(
        recipients=[RECIPIENT],
        subject=SUBJECT,
        body=BODY,
        subtype=MessageType.plain,
    )

    await FastMail(config).send_message(schema)

    [message] = await server.wait_for_async(1, timeout=5)
    assert message["Subject"] == SUBJECT
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    assert body.get_content() == BODY
    [received] = server.received
    assert received.mail_from == SENDER
    assert received.rcpt_tos == (RECIPIENT,)
    assert received.login == "mailer"


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
