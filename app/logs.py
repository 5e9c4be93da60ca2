"""Logging set-up: one line per event with its fields (queue, msg_id, outcome, ...)."""

from __future__ import annotations

import logging

# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class FieldsFormatter(logging.Formatter):
    """`time level logger message key=value ...` with the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        )
        return f"{line} {fields}" if fields else line


def configure(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(FieldsFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; that is noise at our volume.
    logging.getLogger("httpx").setLevel(logging.WARNING)
