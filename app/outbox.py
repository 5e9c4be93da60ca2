"""The local outbox: mail written to files instead of sent, for local mode without SMTP.

`Outbox` is the `Mailer` with another last step: the message `app.mime.compose` wrote
(templates, MIME structure and encodings exactly as for SMTP) is written to
DATA_DIR/outbox/ as one `.eml` file per mail, which any mail client opens. Bcc is
taken out of the headers as SMTP delivery does; every envelope recipient is listed
in `X-Envelope-To`, so the file still shows where the mail would have gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import tempfile
from datetime import UTC, datetime
from email.message import Message
from email.utils import getaddresses
from pathlib import Path

from app.config import Settings
from app.errors import RetryableError
from app.mail import Mailer, Templates

log = logging.getLogger(__name__)

# The sender of outbox mails when MAIL_FROM is not set (a reserved domain, RFC 2606).
LOCAL_SENDER = "queue-worker@example.com"


class Outbox(Mailer):
    """Writes each mail to `directory` as an `.eml` file."""

    def __init__(
        self, settings: Settings, directory: Path, templates: Templates | None = None
    ) -> None:
        # Composing needs a sender; the SMTP settings are never used.
        super().__init__(
            settings.model_copy(
                update={
                    "mail_from": settings.mail_from or LOCAL_SENDER,
                    "smtp_host": settings.smtp_host or "localhost",
                }
            ),
            templates,
        )
        self.directory = directory.expanduser().resolve()
        self._sequence = itertools.count(1)

    async def check(self) -> None:
        """The outbox directory exists (it is created) and takes a file."""
        try:
            await asyncio.to_thread(self._probe)
        except OSError as error:
            raise RetryableError("outbox not writable") from error

    async def close(self) -> None:
        """Nothing to close: no connections."""

    async def _deliver(self, message: Message) -> None:
        path = await asyncio.to_thread(self._write, message)
        log.info("mail written to the outbox", extra={"path": str(path)})

    def _probe(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self.directory):
            pass

    def _write(self, message: Message) -> Path:
        recipients = [
            address
            for _, address in getaddresses(
                [str(value) for name in ("To", "Cc", "Bcc") for value in message.get_all(name, [])]
            )
            if address
        ]
        del message["Bcc"]
        message["X-Envelope-To"] = ", ".join(recipients)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Names sort in the order the mails were written.
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{stamp}-{next(self._sequence):06d}-{secrets.token_hex(3)}.eml"
        path = self.directory / name
        # Written aside, then renamed: a reader never sees half a mail.
        partial = self.directory / f".{name}.partial"
        with partial.open("wb") as file:
            file.write(message.as_bytes())
            file.flush()
            os.fsync(file.fileno())
        partial.replace(path)
        return path
