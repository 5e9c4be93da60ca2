"""A mail as valid MIME: what goes into the headers is checked, and the structure is standard.

The service writes every mail through `compose()` (SMTP and the local outbox alike):

    text only / HTML only     text/plain or text/html
    text and HTML             multipart/alternative (text first, HTML last: preferred)
    with attachments          multipart/mixed around the above, then each attachment

composed with the standard library's `email.message.EmailMessage` and its default
policy, so each part carries its own Content-Transfer-Encoding (never a multipart
container), non-ASCII names and subjects are RFC 2047 encoded and attachment filenames
RFC 2231 (`filename*=utf-8''...`). fastapi-mail, which composed mail before, cannot do
this: it sets a charset, and so `Content-Transfer-Encoding: base64`, on every multipart
container, wraps text + HTML in `multipart/related`, and writes filenames as `UTF8''`,
with no option to change any of it.

No character becomes a header: every header-bound value (addresses and their names, the
subject, the sender's name, attachment filenames and types) is refused when it holds a
control character (C0, DEL, C1) or a Unicode line or paragraph separator, as a
PermanentError naming the field. Some mail software ends a header line at a vertical
tab, a form feed or 0x1C-0x1E as it does at CR LF, so each of them could start a header.
"""

from __future__ import annotations

import email.policy
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import Header
from email.headerregistry import Address as HeaderAddress
from email.headerregistry import (
    AddressHeader,
    BaseHeader,
    HeaderRegistry,
    UniqueAddressHeader,
    UniqueUnstructuredHeader,
)
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import cast

from app.errors import PermanentError

# C0 (tab included), DEL, C1 (U+0085 NEL included), LINE and PARAGRAPH SEPARATOR.
HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class _Subject(UniqueUnstructuredHeader):
    """A Subject folded as whole RFC 2047 words when it is not ASCII.

    The default policy's folder (CPython 3.11) loses or moves a space where it folds
    between ASCII and encoded words: `%s ’ 😀` arrived as `%s  ’😀`. Encoding the
    whole subject (as compat32, and so fastapi-mail, did) keeps every character.
    The registry mixes BaseHeader in (`name`, the default `fold`).
    """

    name: str

    def fold(self, *, policy: email.policy.Policy) -> str:
        value = str(self)
        if value.isascii() or getattr(policy, "utf8", False):
            return str(super().fold(policy=policy))  # type: ignore[misc]
        return f"{self.name}: {_encoded_words(value, policy, self.name)}{policy.linesep}"


def _encoded_words(text: str, policy: email.policy.Policy, header_name: str) -> str:
    return Header(
        text, "utf-8", maxlinelen=policy.max_line_length or 78, header_name=header_name
    ).encode(linesep=policy.linesep)


class _Addresses:
    """Address headers folded one address a line, a non-ASCII name encoded whole.

    The default folder breaks a long address list inside encoded names: `Петрова`
    arrived as `П етрова` in a mail to four people.
    """

    name: str
    addresses: tuple[HeaderAddress, ...]

    def fold(self, *, policy: email.policy.Policy) -> str:
        utf8 = getattr(policy, "utf8", False)
        parts = []
        for address in self.addresses:
            display = address.display_name
            if display and not display.isascii() and not utf8:
                parts.append(f"{_encoded_words(display, policy, self.name)} <{address.addr_spec}>")
            else:
                parts.append(str(address))
        return f"{self.name}: {f',{policy.linesep} '.join(parts)}{policy.linesep}"


class _Address(_Addresses, AddressHeader):
    pass


class _UniqueAddress(_Addresses, UniqueAddressHeader):
    pass


class _HeaderClasses(HeaderRegistry):
    """The standard header registry, its classes made once per name, and `_Subject`.

    The standard one builds a new class with `type()` for every header it sets: a
    third of the time a mail took to compose (0.85 -> 0.54 ms, bench/README.md).
    """

    def __init__(self) -> None:
        super().__init__()
        # Mixins as the standard classes are; the registry adds BaseHeader.
        self.map_to_type("subject", cast("type[BaseHeader]", _Subject))
        for name in ("to", "cc", "bcc", "reply-to"):
            self.map_to_type(name, cast("type[BaseHeader]", _Address))
        self.map_to_type("from", cast("type[BaseHeader]", _UniqueAddress))
        self._made: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = super().__getitem__(name)
        return made


# email.policy.default (RFC 5322 and 2047/2231, folding at 78), with cached header classes.
POLICY = email.policy.default.clone(header_factory=_HeaderClasses())


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


def unsafe_character(value: str) -> str | None:
    """The first character of `value` that must not reach a header, as `U+000B`; else None."""
    found = HEADER_UNSAFE.search(value)
    return None if found is None else f"U+{ord(found.group()):04X}"


def check_header_value(name: str, value: str) -> None:
    """PermanentError naming field `name` when `value` cannot go into a header."""
    bad = unsafe_character(value)
    if bad is not None:
        raise PermanentError(f"{name}: must not contain line breaks or control characters ({bad})")


def check_headers(mail: Mail, sender_name: str | None = None) -> None:
    """Every header-bound value of `mail` (and the sender's name), named as in the email job."""
    for group, addresses in (
        ("to", mail.to),
        ("cc", mail.cc),
        ("bcc", mail.bcc),
        ("reply_to", mail.reply_to),
    ):
        for n, address in enumerate(addresses):
            check_header_value(f"{group}.{n}", address.email)
            if address.name is not None:
                check_header_value(f"{group}.{n}", address.name)
    check_header_value("subject", mail.subject)
    if sender_name is not None:
        check_header_value("MAIL_FROM_NAME", sender_name)
    for n, attachment in enumerate(mail.attachments):
        check_header_value(f"attachments.{n}.filename", attachment.filename)
        check_header_value(f"attachments.{n}.content_type", attachment.content_type)


def _header_address(name: str, address: Address) -> HeaderAddress:
    try:
        # A display name equal to the address says nothing: left out.
        display = address.name if address.name and address.name != address.email else ""
        return HeaderAddress(display_name=display, addr_spec=address.email)
    except (HeaderParseError, ValueError, IndexError):
        raise PermanentError(f"{name}: is not an address a mail header can hold") from None


def _addresses(group: str, addresses: list[Address]) -> list[HeaderAddress]:
    return [_header_address(f"{group}.{n}", a) for n, a in enumerate(addresses)]


def compose(mail: Mail, sender: Address) -> EmailMessage:
    """The MIME message for `mail` from `sender`; PermanentError names a value it refuses.

    Bcc is a header of the composed message (the envelope is built from it); SMTP
    delivery and the outbox take it out before the message leaves.
    """
    check_headers(mail, sender.name)
    if mail.text is None and mail.html is None:
        raise PermanentError("a mail needs a text or an HTML body")
    message = EmailMessage(policy=POLICY)
    message["From"] = _header_address("MAIL_FROM", sender)
    message["To"] = _addresses("to", mail.to)
    if mail.cc:
        message["Cc"] = _addresses("cc", mail.cc)
    if mail.bcc:
        message["Bcc"] = _addresses("bcc", mail.bcc)
    if mail.reply_to:
        message["Reply-To"] = _addresses("reply_to", mail.reply_to)
    message["Subject"] = mail.subject
    message["Date"] = format_datetime(datetime.now(UTC))
    # The sender's domain, not socket.getfqdn(): that can wait on DNS for every mail.
    message["Message-ID"] = make_msgid(domain=sender.email.rpartition("@")[2] or None)
    if mail.text is not None:
        message.set_content(mail.text)
        if mail.html is not None:
            message.add_alternative(mail.html, subtype="html")
    else:
        assert mail.html is not None
        message.set_content(mail.html, subtype="html")
    for attachment in mail.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        message.add_attachment(
            attachment.content,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=attachment.filename,
        )
    for part in message.walk():
        # add_alternative and add_attachment give each new part a MIME-Version of its
        # own; it belongs in the top-level header only (RFC 2045 section 4).
        if part is not message:
            del part["MIME-Version"]
    return message
