"""What can go wrong with a job, as a small tree the runner understands.

    JobError
     ├── RetryableError   the job may succeed later (SMTP down, REST API blip)
     └── PermanentError   the job can never succeed (invalid message, rejected address)

Processors raise one of these and return; the runner alone decides what happens to the
message (ack, leave for a retry, archive). Anything else a processor raises is treated
as retryable: an unknown failure must not destroy a job.
"""

from __future__ import annotations


class JobError(Exception):
    """A job failed; `str(error)` says why, without secrets or message bodies."""


class RetryableError(JobError):
    """The job failed for a reason that may pass: try again later."""


class PermanentError(JobError):
    """The job can never succeed as it is: do not retry it."""
