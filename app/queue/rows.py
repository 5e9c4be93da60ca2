"""Claimed rows into messages: one row the worker cannot read never fails its batch.

By the time a claim or read reply arrives, the database has claimed every row in
it. If one row fails to parse and takes the whole reply with it, every message of
the batch stays hidden for its visibility timeout, comes back in another batch
with the same row, and fails again: one job that nests too deeply stalls a queue.

So a reply is parsed in one fast pass when it can be (the normal case), and
otherwise row by row, each jsonb column on its own: a row whose columns parse
becomes its `QueueMessage`; in a row with a column that does not, that column is
left empty and `unreadable` names it and the problem. The runner archives such a
message at once, with that reason as its error, and runs the rest of the batch.
Both backends end here with the same bytes: the RPC client with PostgREST's reply,
the SQL backend with the `json_agg` of the same rows (`parse_reply`), so both read
exactly the same rows. The archive listing is read the same way (the SQL backend
passes each row's jsonb columns as text, `archived_from_columns`), so that the dead
letter of such a message can be listed (without its body).

What pydantic-core, the parser here, refuses although PostgreSQL's jsonb keeps it:

- nesting deeper than `PARSER_MAX_DEPTH` levels (its recursion limit; jsonb takes
  over 10,000 levels);
- an integer part of more than `PARSER_MAX_DIGITS` digits (Python's limit on
  converting text to int, which it follows). jsonb keeps 131,072, and prints every
  number in full: 1e400 arrives as 401 digits (readable), 1e131071 as 131,072.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Generic, TypeVar

from pydantic import TypeAdapter, ValidationError

from app.queue import jsontext
from app.queue.backend import ArchivedMessage
from app.queue.models import QueueMessage

# pydantic-core's JSON parser refuses values nested deeper than this...
PARSER_MAX_DEPTH: Final = 200
# ...and integers longer than this (sys.get_int_max_str_digits(), which it follows).
PARSER_MAX_DIGITS: Final = 4300

_ANY: Final[TypeAdapter[Any]] = TypeAdapter(Any)
_OBJECT: Final[TypeAdapter[Any]] = TypeAdapter(dict[str, Any] | None)
_INT: Final[TypeAdapter[Any]] = TypeAdapter(int)
_STAMP: Final[TypeAdapter[Any]] = TypeAdapter(datetime)

# pydantic-core's wording for its two limits, and what they mean to an operator.
_EXPLAINED: Final = {
    "recursion limit exceeded": f"the JSON nests deeper than {PARSER_MAX_DEPTH} levels",
    "number out of range": f"a number has more than {PARSER_MAX_DIGITS} digits",
}

R = TypeVar("R", QueueMessage, ArchivedMessage)


@dataclass(frozen=True)
class _Shape(Generic[R]):
    """A row type of the worker's functions: its plain columns and its jsonb ones."""

    model: type[R]
    whole: TypeAdapter[list[R]]
    scalars: Mapping[str, TypeAdapter[Any]]
    jsonb: Mapping[str, TypeAdapter[Any]]


_MESSAGE: Final = _Shape(
    QueueMessage,
    TypeAdapter(list[QueueMessage]),
    {"msg_id": _INT, "read_ct": _INT, "enqueued_at": _STAMP, "vt": _STAMP},
    {"message": _ANY, "headers": _OBJECT},
)
_ARCHIVED: Final = _Shape(
    ArchivedMessage,
    TypeAdapter(list[ArchivedMessage]),
    {"msg_id": _INT, "read_ct": _INT, "enqueued_at": _STAMP, "archived_at": _STAMP},
    {"message": _ANY, "error": _OBJECT},
)


def parse_reply(raw: bytes | str) -> list[QueueMessage]:
    """A claim or read reply (a JSON array of `queue_worker.message` rows).

    Raises ValueError only when the reply itself is not an array of rows that carry
    a message's id: then nothing can be told apart, as with any broken reply.
    """
    return _parse(raw, _MESSAGE)


def parse_archived(raw: bytes | str) -> list[ArchivedMessage]:
    """An `archived` reply: a dead message whose body cannot be read is listed without it."""
    return _parse(raw, _ARCHIVED)


def archived_from_columns(row: Mapping[str, Any]) -> ArchivedMessage:
    """An `archived` row whose jsonb columns are still JSON text (SQL backend)."""
    return _from_columns(row, _ARCHIVED)


def _parse(raw: bytes | str, shape: _Shape[R]) -> list[R]:
    try:
        return shape.whole.validate_json(raw)
    except ValidationError:
        pass  # a row (or more) spoils the reply: read each on its own
    text = raw.encode() if isinstance(raw, str) else raw
    return [_row(item, shape) for item in jsontext.array_items(text)]


def _row(text: bytes, shape: _Shape[R]) -> R:
    try:
        return shape.model.model_validate_json(text)
    except ValidationError:
        pass
    fields = jsontext.object_fields(text)
    try:
        scalars = {name: kind.validate_json(fields[name]) for name, kind in shape.scalars.items()}
    except (KeyError, ValidationError) as missing:
        # Not a row of this shape: there is no id to handle it by.
        raise ValueError(f"a reply row without a readable {missing}") from None
    return _from_columns({**scalars, **{name: fields.get(name) for name in shape.jsonb}}, shape)


def _from_columns(row: Mapping[str, Any], shape: _Shape[R]) -> R:
    """The row with its jsonb columns (JSON text, or None for SQL null) parsed one by one.

    A column that does not parse is left empty, and `unreadable` names it and why.
    """
    values = dict(row)
    problems = []
    for name, adapter in shape.jsonb.items():
        raw = row.get(name)
        try:
            values[name] = None if raw is None else adapter.validate_json(raw)
        except ValidationError as error:
            values[name] = None
            problems.append(f"{name}: {_explain(error)}")
    if not problems:
        return shape.model.model_validate(values)
    return shape.model.model_validate({**values, "unreadable": "; ".join(problems)})


def _explain(error: ValidationError) -> str:
    reasons = []
    for item in error.errors(include_input=False, include_url=False):
        text = str(item["msg"])
        reasons.append(next((why for key, why in _EXPLAINED.items() if key in text), text))
    return "; ".join(reasons)
