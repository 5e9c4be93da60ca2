"""The email_queue processor: a message becomes a mail sent over SMTP."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, EmailStr, Field, model_validator

from app.mail import Mail, Mailer
from app.processors import parse_job
from app.queue.models import QueueMessage


class EmailJob(BaseModel):
    """`{"to": "a@example.com", "subject": "Hi", "text": "Hello"}`; `html` optional too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: EmailStr
    # A CR or LF would start a second header: refused, never sent.
    subject: str = Field(min_length=1, max_length=998, pattern=r"^[^\r\n]*$")
    text: str | None = None
    html: str | None = None

    @model_validator(mode="after")
    def _has_body(self) -> EmailJob:
        if self.text is None and self.html is None:
            raise ValueError("one of text or html is required")
        return self


class EmailProcessor:
    """Sends the mail a message describes."""

    model = EmailJob

    def __init__(self, mailer: Mailer) -> None:
        self._mailer = mailer

    async def __call__(self, message: QueueMessage) -> None:
        job = parse_job(self.model, message)
        await self._mailer.send(
            Mail(to=[job.to], subject=job.subject, text=job.text, html=job.html)
        )
