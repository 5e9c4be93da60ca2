"""One module per queue kind, and the registry that maps queue names to them.

A processor takes a claimed message and either returns (done: ack it) or raises
`RetryableError` / `PermanentError`. It never touches metrics, routes or acks.
`validate()` checks a job body as far as it can without running it; the manual API
calls it at enqueue, so a job that could never succeed is refused there (422).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from app.errors import PermanentError, describe_invalid
from app.queue.models import QueueMessage


class Processor(Protocol):
    """Processes one claimed message of its queue.

    The built-in processors keep the pydantic model of their jobs as `model`; the
    runner and the API need only these two methods.
    """

    def validate(self, body: Any) -> None:
        """Raises PermanentError, naming the field, when `body` can never be processed."""
        ...

    async def __call__(self, message: QueueMessage) -> None: ...


Registry = Mapping[str, Processor]

M = TypeVar("M", bound=BaseModel)


def parse_job(model: type[M], message: QueueMessage) -> M:
    """Validates a message body against a processor's model.

    A message that does not fit will never fit: the error is permanent and names
    each bad field (never its value, which may be personal data).
    """
    return parse_body(model, message.message)


def parse_body(model: type[M], body: Any) -> M:
    """`parse_job` for a bare job body (the manual API checks one before enqueueing)."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise PermanentError(
            f"invalid {model.__name__} message: {describe_invalid(error)}"
        ) from None
