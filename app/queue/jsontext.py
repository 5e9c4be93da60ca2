"""JSON text nobody vouched for: split into its parts without recursion.

PostgreSQL's `jsonb` accepts what Python's parsers refuse. It nests as deep as the
server's stack allows (over 10,000 levels with the default `max_stack_depth`) and
keeps numbers of up to 131,072 digits, while pydantic-core stops at 200 levels and
4,300 digits and the `json` module at the interpreter's recursion limit (about
1,000 levels) and 4,300 digits. A claim or read reply holding one such row is a
document those parsers refuse as a whole.

These functions find the parts of such a document (the elements of an array, the
fields of an object) by matching brackets with one regular expression that also
skips strings, so their cost grows with the brackets and strings of the text, not
with its depth, and nothing in them recurses. They check the structure only as far
as they need to; each part is then parsed (and validated) on its own.
"""

from __future__ import annotations

import json
import re
from typing import Final

# Possessive quantifiers: no backtracking, so matching is linear in the text.
# A string (its closing quote optional, so that an unterminated string ends the
# match at the end of the text instead of being tried again from every later
# quote), or a bracket. Commas, colons, numbers and literals inside a nested value
# are not tokens: skipping a value costs one step per bracket or string in it.
_NESTED: Final = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(")?|[\[\]{}]', re.DOTALL)
_STRING: Final = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_SCALAR: Final = re.compile(rb"[^,\]}\s]+")
_SPACE: Final = re.compile(rb"[ \t\r\n]*")
_OPEN: Final = frozenset(b"[{")
_CLOSE: Final = frozenset(b"]}")
_QUOTE: Final = ord('"')


def _skip_space(text: bytes, pos: int) -> int:
    match = _SPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _expect(text: bytes, pos: int, char: bytes) -> int:
    if text[pos : pos + 1] != char:
        raise ValueError(f"expected {char.decode()!r} at byte {pos}")
    return pos + 1


def value_end(text: bytes, pos: int) -> int:
    """Where the JSON value that starts at `pos` ends (one past its last byte)."""
    if pos >= len(text):
        raise ValueError(f"expected a value at byte {pos}")
    first = text[pos]
    if first == _QUOTE:
        match = _STRING.match(text, pos)
        if match is None:
            raise ValueError(f"unterminated string at byte {pos}")
        return match.end()
    if first not in _OPEN:
        scalar = _SCALAR.match(text, pos)
        if scalar is None:
            raise ValueError(f"expected a value at byte {pos}")
        return scalar.end()
    depth = 0
    for match in _NESTED.finditer(text, pos):
        char = text[match.start()]
        if char == _QUOTE:
            if match.group(1) is None:
                raise ValueError(f"unterminated string at byte {match.start()}")
        elif char in _OPEN:
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return match.end()
    raise ValueError(f"unbalanced brackets in the value at byte {pos}")


def array_items(text: bytes) -> list[bytes]:
    """The elements of a JSON array, each as its own text."""
    pos = _expect(text, _skip_space(text, 0), b"[")
    items: list[bytes] = []
    pos = _skip_space(text, pos)
    if text[pos : pos + 1] == b"]":
        return items
    while True:
        end = value_end(text, pos)
        items.append(text[pos:end])
        pos = _skip_space(text, end)
        if text[pos : pos + 1] == b"]":
            return items
        pos = _skip_space(text, _expect(text, pos, b","))


def object_fields(text: bytes) -> dict[str, bytes]:
    """The fields of a JSON object, each value as its own text (the last of repeated keys)."""
    pos = _expect(text, _skip_space(text, 0), b"{")
    fields: dict[str, bytes] = {}
    pos = _skip_space(text, pos)
    if text[pos : pos + 1] == b"}":
        return fields
    while True:
        key_end = value_end(text, pos)
        key = json.loads(text[pos:key_end])
        if not isinstance(key, str):
            raise ValueError(f"expected a key at byte {pos}")
        pos = _skip_space(text, _expect(text, _skip_space(text, key_end), b":"))
        end = value_end(text, pos)
        fields[key] = text[pos:end]
        pos = _skip_space(text, end)
        if text[pos : pos + 1] == b"}":
            return fields
        pos = _skip_space(text, _expect(text, pos, b","))
