"""A job given to the service (the manual API, `queue-worker enqueue`), read within bounds
the whole service can live with.

PostgreSQL's jsonb stores JSON that the worker could not read back (nesting deeper
than 200 levels, numbers of thousands of digits; app/queue/rows.py) and refuses
some that Python's json module reads (NaN, Infinity, 1e400 read as a float
infinity, U+0000, lone surrogates). A job posted here is refused at once (422,
naming the problem) unless it is within these bounds (app/operations.py checks the
parsed job with `unstorable()` whichever door it came through):

- at most `MAX_JOB_DEPTH` levels of nesting (the job object itself is level 1);
- every number at most `MAX_NUMBER_CHARS` characters long, and finite;
- text without U+0000 and without lone surrogates (jsonb cannot store them);
- the body no larger than MAX_API_BODY_BYTES (checked before it is read: 413).

The manual API reads the body here rather than through FastAPI, whose parser turns
a body nested deeper than Python's recursion limit into a 400 that names nothing.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

# A job's JSON nests at most this deep; real jobs use a handful of levels.
MAX_JOB_DEPTH: Final = 32
# A number literal in a job is at most this long (sign, digits, point, exponent).
MAX_NUMBER_CHARS: Final = 100
TOO_DEEP: Final = f"nests deeper than {MAX_JOB_DEPTH} levels"


class Refused(ValueError):
    """The body is not a job this service takes; `str()` names the problem.

    `invalid_json` tells a body that is not a JSON object at all from a job that
    is JSON but beyond a bound.
    """

    def __init__(self, message: str, *, invalid_json: bool = False) -> None:
        super().__init__(message)
        self.invalid_json = invalid_json


def _number(text: str) -> None:
    if len(text) > MAX_NUMBER_CHARS:
        raise Refused(f"message: a number of {len(text)} characters; at most {MAX_NUMBER_CHARS}")


def _int(text: str) -> int:
    _number(text)
    return int(text)


def _float(text: str) -> float:
    _number(text)
    value = float(text)
    if not math.isfinite(value):
        raise Refused(f"message: the number {text} is out of range (not a finite double)")
    return value


def _constant(text: str) -> Any:
    raise Refused(f"message: {text} is not a number JSON or PostgreSQL can store")


def loads(text: str) -> Any:
    """`json.loads` with the number bounds above: `Refused` for a number beyond them.

    Errors of the JSON itself (ValueError, RecursionError) are the caller's to word.
    """
    return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)


def load_job(body: bytes) -> dict[str, Any]:
    """The JSON object in `body`, or `Refused` naming the first problem found.

    The rest of the bounds (depth, text) are checked by `unstorable()` in
    app/operations.py, for a job from any door.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Refused(f"body: not UTF-8 ({error.reason})", invalid_json=True) from None
    try:
        value = loads(text)
    except RecursionError:
        raise Refused(f"message: {TOO_DEEP}") from None
    except Refused:
        raise
    except ValueError as error:
        raise Refused(f"body: Invalid JSON: {error}", invalid_json=True) from None
    if not isinstance(value, dict):
        raise Refused("body: Input should be a valid dictionary", invalid_json=True)
    return value


def unstorable(message: Any) -> str | None:
    """What in a parsed job is beyond the bounds above, if anything (no value quoted)."""
    pending: list[tuple[Any, int]] = [(message, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "text must not contain U+0000 (NUL)"
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return "text must be valid Unicode (no lone surrogates)"
        elif isinstance(item, dict | list):
            if depth > MAX_JOB_DEPTH:
                return TOO_DEEP
            if isinstance(item, dict):
                pending.extend((key, depth) for key in item)
                pending.extend((value, depth + 1) for value in item.values())
            else:
                pending.extend((value, depth + 1) for value in item)
    return None
