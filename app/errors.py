"""What can go wrong with a job, as a small tree the runner understands.

    JobError
     ├── RetryableError   the job may succeed later (SMTP down, REST API blip)
     └── PermanentError   the job can never succeed (invalid message, rejected address)

Processors raise one of these and return; the runner alone decides what happens to the
message (ack, leave for a retry, archive). Anything else a processor raises is treated
as retryable: an unknown failure must not destroy a job.
"""

from __future__ import annotations

from pydantic import ValidationError


class JobError(Exception):
    """A job failed; `str(error)` says why, without secrets or message bodies."""


class RetryableError(JobError):
    """The job failed for a reason that may pass: try again later.

    `after` asks for the next attempt in that many seconds (a server's Retry-After,
    an SMTP 421) instead of the backoff; the runner caps it at RETRY_MAX_SECONDS.
    """

    def __init__(self, message: str = "", *, after: float | None = None) -> None:
        super().__init__(message)
        if after is not None and not after >= 0:  # also refuses NaN
            raise ValueError("RetryableError(after=...) must be zero or more seconds")
        self.after = after


class PermanentError(JobError):
    """The job can never succeed as it is: do not retry it."""


def describe_invalid(
    error: ValidationError, *, root: str = "message", within: str | None = None
) -> str:
    """`field.path: problem; ...` for each error, never the offending value.

    Used wherever a rejection must name the field: a job that does not fit its
    model, a webhook body, a job posted to the manual API. `root` is the path of an
    error about the input as a whole; `within` prefixes every path when the input
    sits inside a larger document (a webhook's "record").
    """
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        parts = [str(part) for part in item["loc"]]
        if within is not None:
            parts.insert(0, within)
        problems.append(f"{'.'.join(parts) or root}: {item['msg']}")
    return "; ".join(problems)
