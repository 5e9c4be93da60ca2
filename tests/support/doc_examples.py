"""The shell examples of the docs, read from the Markdown as a reader sees them.

Every fenced block names its language, and every shell block (sh, bash, ...) has
a marker, an HTML comment on the line before it (invisible on the site and on
GitHub):

    <!-- test: local -->                  run against a service in local mode
    <!-- test: local dead-letter=12 -->   ... after the test archived a message,
                                          whose id replaces `/archive/12/` in it
    <!-- test: service -->                the command that starts that service
    <!-- test: skip: <why> -->            not run here (Fly.io, systemd, Docker,
                                          a Supabase project, the test suite...)

A `local` block may state what its curl commands answer, on comment lines after
the command, as a reader would see it:

    curl -X POST http://localhost:8000/queues/email_queue/messages ...
    # -> 201 {"queue":"email_queue","msg_id":7}

A long answer continues on comment lines indented past the `#` (`#   ...`),
joined with one space, as a reader reads a wrapped line.
The status is optional; the JSON is compared by shape (`shape_mismatches`): the
same keys, numbers stand for any number (ids, ages and counts vary), strings must
be equal unless written "…", and a list's documented items must match its first
items. A curl command without a stated status must answer 2xx.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SHELL_LANGUAGES",
    "Block",
    "Expectation",
    "Marker",
    "curl_calls",
    "expectations",
    "fenced_blocks",
    "parse_marker",
    "shape_mismatches",
]

SHELL_LANGUAGES = frozenset({"sh", "bash", "shell", "console", "zsh"})
ANY_STRING = "…"

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*test:\s*(?P<spec>.*?)\s*-->\s*$")
_EXPECTATION = re.compile(r"^\s*#\s*->\s?(?P<text>.*)$")
_CONTINUED = re.compile(r"^\s*#\s{2,}(?P<text>\S.*)$")
# A curl command: at the start of a command, after a pipe, `;`, `&&`, `(` or `$(`.
_CURL = re.compile(r"(?:^|[|;&(])\s*curl\s")


@dataclass(frozen=True)
class Marker:
    kind: str  # "local", "service" or "skip"
    reason: str = ""  # why a block is skipped
    dead_letter: str | None = None  # the id the block uses for a dead message


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # the opening fence, 1-based
    language: str
    code: str
    marker: str | None  # the marker's text after "test:", if any

    @property
    def code_line(self) -> int:
        """The page line of the block's first line of code."""
        return self.line + 1

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


@dataclass(frozen=True)
class Expectation:
    line: int  # in the page
    call: int  # the curl call of its block it describes, 0-based
    status: int | None
    body: Any  # the documented JSON, or None when only the status is given
    has_body: bool


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each with the marker before it."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent = len(opening["indent"])
        fence = opening["fence"]
        info = opening["info"].strip()
        body: list[str] = []
        end = index + 1
        while end < len(lines):
            stripped = lines[end].strip()
            if stripped.startswith(fence) and set(stripped) == {fence[0]}:
                break
            text = lines[end]
            body.append(text[min(indent, len(text) - len(text.lstrip(" "))) :])
            end += 1
        else:
            raise ValueError(f"{path}:{index + 1}: code block never closed")
        blocks.append(
            Block(
                path=path,
                line=index + 1,
                language=info.split()[0].lstrip("{.").rstrip("}") if info else "",
                code="\n".join(body) + "\n",
                marker=_marker_before(lines, index),
            )
        )
        index = end + 1
    return blocks


def _marker_before(lines: list[str], index: int) -> str | None:
    previous = index - 1
    while previous >= 0 and not lines[previous].strip():
        previous -= 1
    if previous < 0:
        return None
    match = _MARKER.match(lines[previous])
    return match["spec"] if match else None


def parse_marker(spec: str) -> Marker:
    """`local`, `local dead-letter=<id>`, `service` or `skip: <reason>`; else ValueError."""
    if spec.startswith("skip:"):
        reason = spec.removeprefix("skip:").strip()
        if not reason:
            raise ValueError("`skip:` needs a reason")
        return Marker("skip", reason=reason)
    words = spec.split()
    if words == ["service"]:
        return Marker("service")
    if words and words[0] == "local":
        dead_letter = None
        for option in words[1:]:
            name, _, value = option.partition("=")
            if name != "dead-letter" or not value.isdigit():
                raise ValueError(f"unknown option {option!r} (known: dead-letter=<id>)")
            dead_letter = value
        return Marker("local", dead_letter=dead_letter)
    raise ValueError(f"unknown marker {spec!r}: use local, service or skip: <reason>")


def _commands(code: str, first_line: int) -> list[tuple[int, str]]:
    """Logical lines (continuations joined) with their page line; comments kept as is."""
    commands: list[tuple[int, str]] = []
    pending: list[str] = []
    start = first_line
    for number, line in enumerate(code.splitlines(), start=first_line):
        if not pending:
            start = number
        if not pending and line.lstrip().startswith("#"):
            commands.append((number, line))
            continue
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        commands.append((start, " ".join(pending)))
        pending = []
    if pending:
        commands.append((start, " ".join(pending)))
    return commands


def _is_comment(command: str) -> bool:
    return command.lstrip().startswith("#")


def curl_calls(block: Block) -> list[tuple[int, str]]:
    """The curl commands of a block, in order, with their page line."""
    calls: list[tuple[int, str]] = []
    for line, command in _commands(block.code, block.code_line):
        if _is_comment(command):
            continue
        for _ in _CURL.finditer(command):
            calls.append((line, command.strip()))
    return calls


def expectations(block: Block) -> list[Expectation]:
    """The `# -> [status] [json]` lines of a block, each tied to the curl call before it."""
    found: list[Expectation] = []
    calls = 0
    commands = _commands(block.code, block.code_line)
    for index, (line, command) in enumerate(commands):
        if not _is_comment(command):
            calls += len(_CURL.findall(command))
            continue
        match = _EXPECTATION.match(command)
        if match is None:
            continue
        if calls == 0:
            raise ValueError(f"line {line}: `# ->` comes before any curl command")
        if found and found[-1].call == calls - 1:
            raise ValueError(f"line {line}: a second `# ->` for the same curl command")
        # A long answer goes on: comment lines indented past the `#` continue it.
        text = match["text"]
        for _, more in commands[index + 1 :]:
            continued = _CONTINUED.match(more)
            if continued is None:
                break
            text += " " + continued["text"]  # a wrapped line: one space
        status, body, has_body = _expected(text, line)
        found.append(Expectation(line, calls - 1, status, body, has_body))
    return found


def _expected(text: str, line: int) -> tuple[int | None, Any, bool]:
    status_match = re.match(r"(\d{3})(?:\s+|$)", text)
    status = int(status_match[1]) if status_match else None
    rest = text[status_match.end() :] if status_match else text
    if not rest.startswith(("{", "[")):
        if status is None:
            raise ValueError(f"line {line}: `# ->` needs a status, JSON, or both: {text!r}")
        return status, None, False
    try:
        body, _ = json.JSONDecoder().raw_decode(rest)
    except json.JSONDecodeError as error:
        raise ValueError(f"line {line}: the documented answer is not JSON: {error}") from None
    return status, body, True


def shape_mismatches(expected: Any, actual: Any, path: str = "$") -> list[str]:
    """How `actual` differs from the documented `expected`, by shape; empty when it fits."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: documented an object, got {actual!r}"]
        problems = []
        if set(expected) != set(actual):
            problems.append(f"{path}: keys {sorted(actual)}, documented {sorted(expected)}")
        for key in expected:
            if key in actual:
                problems += shape_mismatches(expected[key], actual[key], f"{path}.{key}")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{path}: documented a list, got {actual!r}"]
        if len(actual) < len(expected):
            return [f"{path}: {len(actual)} items, documented at least {len(expected)}"]
        problems = []
        for position, item in enumerate(expected):
            problems += shape_mismatches(item, actual[position], f"{path}[{position}]")
        return problems
    if isinstance(expected, bool) or expected is None:
        return [] if actual is expected else [f"{path}: {actual!r}, documented {expected!r}"]
    if isinstance(expected, int | float):
        if isinstance(actual, int | float) and not isinstance(actual, bool):
            return []
        return [f"{path}: {actual!r}, documented a number"]
    if expected == ANY_STRING:
        return [] if isinstance(actual, str) else [f"{path}: {actual!r}, documented a string"]
    return [] if actual == expected else [f"{path}: {actual!r}, documented {expected!r}"]
