"""The email_queue processor: a message becomes a mail sent over SMTP.

Either the mail is written out:

```json
{"to": ["a@example.com", "Анна <anna@example.com>"], "cc": [], "bcc": [],
 "reply_to": ["support@example.com"], "subject": "Hi", "text": "Hello", "html": "<p>Hello</p>",
 "attachments": [{"filename": "report.csv", "content_type": "text/csv", "content": "<base64>"}]}
```

or it names a template, the variables it needs and a language (`MAIL_DEFAULT_LOCALE`
when absent); `subject` may then override the template's subject:

```json
{"to": "anna@example.com", "template": "checkup_completed", "locale": "ru",
 "context": {"patient_name": "Анна", "checkup_date": "2026-11-27",
             "doctor_name": "Иванов И. И.", "results_url": "https://example.com/r/1"}}
```
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NameEmail,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.jobs import Resources
from app.mail import Address, Attachment, Mail, Mailer
from app.mime import check_headers, unsafe_character
from app.processors import parse_body, parse_job
from app.queue.models import QueueMessage

MAX_RECIPIENTS = 50
MAX_BODY_CHARS = 1_000_000
MAX_ATTACHMENTS = 10
MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
MAX_ATTACHMENTS_TOTAL_BYTES = 20 * 1024 * 1024
MAX_CONTEXT_BYTES = 256 * 1024


def _one_line(value: str) -> str:
    # A CR or LF would end the header and start another one, and some mail software
    # takes VT, FF or 0x1C-0x1E for one too: refused, never sent (app/mime.py).
    bad = unsafe_character(value)
    if bad is not None:
        raise ValueError(f"must not contain line breaks or control characters ({bad})")
    return value


_NAME_EMAIL = TypeAdapter(NameEmail)


def _address(value: object) -> object:
    """`a@example.com` or `Name <a@example.com>` becomes an Address."""
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ValueError("must be an email address string")
    _one_line(value)
    try:
        parsed = _NAME_EMAIL.validate_python(value)
    except ValidationError:
        raise ValueError("is not a valid email address") from None
    # pydantic gives a bare address its local part as a name; keep only real names.
    return Address(email=parsed.email, name=parsed.name if "<" in value else None)


EmailAddress = Annotated[Address, BeforeValidator(_address)]
OneLine = Annotated[str, AfterValidator(_one_line)]


class EmailAttachment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    filename: OneLine = Field(min_length=1, max_length=255, pattern=r"^[^/\\]+$")
    content_type: str = Field(
        "application/octet-stream", pattern=r"^[A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+$", max_length=127
    )
    content: str = Field(description="base64", max_length=MAX_ATTACHMENT_BYTES * 4 // 3 + 4)

    @field_validator("content")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid base64") from None
        if len(decoded) > MAX_ATTACHMENT_BYTES:
            raise ValueError(f"is larger than {MAX_ATTACHMENT_BYTES} bytes")
        return value

    def decoded(self) -> bytes:
        return base64.b64decode(self.content)


Locale = Literal["en", "ru"]  # app.mail.LOCALES: the languages every template has


class EmailJob(BaseModel):
    """A mail to send: recipients, and `subject` with `text` and/or `html`, or a `template`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: list[EmailAddress] = Field(min_length=1, max_length=MAX_RECIPIENTS)
    cc: list[EmailAddress] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    bcc: list[EmailAddress] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    reply_to: list[EmailAddress] = Field(default_factory=list, max_length=10)
    template: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]{0,63}$")
    context: dict[str, Any] = Field(default_factory=dict)
    locale: Locale | None = None
    # After `template`, so that its validator can see whether a template gives one.
    subject: OneLine | None = Field(None, min_length=1, max_length=998, validate_default=True)
    text: str | None = Field(None, max_length=MAX_BODY_CHARS)
    html: str | None = Field(None, max_length=MAX_BODY_CHARS)
    attachments: list[EmailAttachment] = Field(default_factory=list, max_length=MAX_ATTACHMENTS)

    @field_validator("to", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("subject")
    @classmethod
    def _subject_or_template(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("template") is None and "template" in info.data:
            raise ValueError("is required without a template")
        return value

    @field_validator("context")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, ensure_ascii=False).encode()) > MAX_CONTEXT_BYTES:
            raise ValueError(f"is larger than {MAX_CONTEXT_BYTES} bytes")
        return value

    @model_validator(mode="after")
    def _check(self) -> EmailJob:
        if self.template is not None:
            if self.text is not None or self.html is not None:
                raise ValueError("give either template or text/html, not both")
        else:
            if self.text is None and self.html is None:
                raise ValueError("one of text, html or template is required")
            if self.context or self.locale is not None:
                raise ValueError("context and locale go with a template")
        total = sum(len(a.decoded()) for a in self.attachments)
        if total > MAX_ATTACHMENTS_TOTAL_BYTES:
            raise ValueError(f"attachments exceed {MAX_ATTACHMENTS_TOTAL_BYTES} bytes in total")
        return self

    def mail(self, mailer: Mailer) -> Mail:
        """The mail to send; a template is rendered (PermanentError names what is missing)."""
        subject, text, html = self.subject, self.text, self.html
        if self.template is not None:
            rendered = mailer.templates.render(
                self.template, self.locale or mailer.default_locale, self.context
            )
            subject, text, html = subject or rendered.subject, rendered.text, rendered.html
        assert subject is not None  # checked by the model
        return Mail(
            to=list(self.to),
            cc=list(self.cc),
            bcc=list(self.bcc),
            reply_to=list(self.reply_to),
            subject=subject,
            text=text,
            html=html,
            attachments=[
                Attachment(a.filename, a.content_type, a.decoded()) for a in self.attachments
            ],
        )


class EmailProcessor:
    """Sends the mail a message describes."""

    model = EmailJob

    def __init__(self, mailer: Mailer) -> None:
        self._mailer = mailer

    def validate(self, body: Any) -> None:
        # The whole mail as it would be sent, short of composing it: a template that
        # does not exist, a variable it lacks or a value out of bounds is refused here.
        job = parse_body(self.model, body)
        check_headers(job.mail(self._mailer))

    async def __call__(self, message: QueueMessage) -> None:
        job = parse_job(self.model, message)
        await self._mailer.send(job.mail(self._mailer))


def processor(resources: Resources) -> EmailProcessor:
    """The built-in `email` processor (registered in app/processors/registry.py)."""
    return EmailProcessor(resources.mailer)
