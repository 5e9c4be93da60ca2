"""The optional-tool rule: skipped on a laptop, failed under CI, and CI says it is CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.prometheus import require_binary
from tests.support.tools import in_ci, require_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def empty_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))


@pytest.mark.usefixtures("empty_path")
def test_a_missing_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_binary("prometheus")
    reason = str(skipped.value)
    assert "`prometheus` not found on PATH" in reason and "apt-get install" in reason
    assert "brew install prometheus" in reason
    assert "\n" not in reason  # one line


@pytest.mark.usefixtures("empty_path")
@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_a_missing_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="`promtool` not found on PATH"):
        require_binary("promtool")


@pytest.mark.parametrize("value", ["", "false", "0"])
def test_ci_false_is_not_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert not in_ci()


def test_a_present_tool_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tool = tmp_path / "some-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    assert require_tool("some-tool", "n/a") == str(tool)


def test_the_ci_script_says_it_is_ci() -> None:
    # Without CI=true a machine missing prometheus would skip, not fail, in CI.
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "export CI=true" in lines
