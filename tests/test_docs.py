"""The docs say what the code does: checks that fail when one of them drifts.

The configuration reference (docs/reference/configuration.md) must list every
setting of `app.config.Settings`, under the environment variable that sets it, with
its default, and nothing that is not a setting. The README is the front page: short,
with the two commands of a fresh machine, its links leading to files that exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import AliasChoices
from pydantic.fields import FieldInfo

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "reference" / "configuration.md"
README = ROOT / "README.md"
SETTINGS_HEADER = ("Variable", "Default", "Meaning")
README_MAX_LINES = 150


@dataclass(frozen=True)
class Row:
    variable: str
    default: str
    meaning: str
    line: int


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def documented_settings() -> list[Row]:
    """The rows of every `| Variable | Default | Meaning |` table of the reference page."""
    rows: list[Row] = []
    header: tuple[str, ...] | None = None
    for number, line in enumerate(CONFIGURATION.read_text().splitlines(), start=1):
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = tuple(cells)
            continue
        if header != SETTINGS_HEADER or set(line) <= set("|-: "):
            continue
        match = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", cells[0])
        assert match, f"configuration.md:{number}: one `VARIABLE` per row, got {cells[0]!r}"
        rows.append(Row(match[1], cells[1], " | ".join(cells[2:]), number))
    return rows


def variable_names(name: str, field: FieldInfo) -> list[str]:
    """The environment variables that set a field: its primary name first, then aliases."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [name.upper()]


SETTINGS = {
    variable_names(name, field)[0]: (name, field) for name, field in Settings.model_fields.items()
}
ROWS = documented_settings()
ROW = {row.variable: row for row in ROWS}


def test_the_reference_page_has_settings_tables() -> None:
    # Guards the parser: a changed header would otherwise make the checks below vacuous.
    assert len(ROWS) >= 40


def test_every_setting_is_documented() -> None:
    missing = sorted(set(SETTINGS) - set(ROW))
    assert not missing, (
        f"settings missing from {CONFIGURATION.relative_to(ROOT)}: {missing}; add a row "
        "| `NAME` | default | meaning | to the table of its section"
    )


def test_every_documented_variable_is_a_setting() -> None:
    unknown = sorted(set(ROW) - set(SETTINGS))
    assert not unknown, f"documented but not in app.config.Settings: {unknown}"


def test_each_variable_is_documented_once() -> None:
    seen: dict[str, int] = {}
    for row in ROWS:
        assert row.variable not in seen, (
            f"{row.variable} documented twice (lines {seen[row.variable]} and {row.line})"
        )
        seen[row.variable] = row.line


def _same_default(literal: str, default: object) -> bool:
    if isinstance(default, bool):
        return literal == str(default).lower()
    if isinstance(default, int | float):
        try:
            return float(literal) == float(default)
        except ValueError:
            return False
    if isinstance(default, Path):
        return Path(literal) == default
    return literal == default


@pytest.mark.parametrize("variable", sorted(SETTINGS))
def test_documented_default_is_the_real_one(variable: str) -> None:
    if variable not in ROW:
        pytest.fail(f"{variable} is not documented (see test_every_setting_is_documented)")
    _, field = SETTINGS[variable]
    default = field.get_default(call_default_factory=True)
    cell = ROW[variable].default
    literal = re.search(r"`([^`]*)`", cell)
    if literal is None:
        # Words (unset, required, ...) stand for "no default value".
        assert default in (None, ""), (
            f"{variable}: documented default {cell!r} but Settings has {default!r}; "
            "write it as a `literal`"
        )
    else:
        assert _same_default(literal[1], default), (
            f"{variable}: documented default {literal[1]!r}, Settings has {default!r}"
        )


def test_aliases_are_named_in_the_meaning() -> None:
    for variable, (name, field) in SETTINGS.items():
        for alias in variable_names(name, field)[1:]:
            assert f"`{alias}`" in ROW[variable].meaning, (
                f"{variable} is also read from {alias}; say so in its row"
            )


def test_the_readme_is_a_front_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; move detail into docs/ and link to it"
    )


def code_lines(markdown: str) -> list[str]:
    """The lines inside the fenced code blocks of a Markdown text."""
    lines: list[str] = []
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            lines.append(line.strip())
    return lines


def test_the_readme_gives_the_two_commands_ci_uses() -> None:
    commands = code_lines(README.read_text())
    # The service on a fresh machine (local mode) and the test command.
    assert "uv run queue-worker" in commands
    assert "uv run pytest" in commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "uv run --frozen pytest" in ci, ".ci/run must run the README's test command"


def test_the_readme_links_lead_somewhere() -> None:
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert any(t.startswith("docs/") for t in local), "the README links into docs/"
    for target in local:
        path = ROOT / target.split("#")[0]
        assert path.exists(), f"README.md links to {target}, which does not exist"
