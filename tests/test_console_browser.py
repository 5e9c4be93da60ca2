"""The console in a real headless Chromium (Debian's `chromium`, driven by Playwright).

Playwright never downloads a browser here: it is pointed at the system's chromium
(`executable_path`). Without chromium the test skips with the package to install;
under CI (.ci/run installs it) it fails instead.

The walk an operator takes at 3 a.m.: a wrong token is refused; signed in, a queue
shows a dead letter with its reason; replayed, the job is delivered; a paused
queue keeps a new job waiting (the page's own refresh shows it) until resumed.
Screenshots at desktop and phone width go to test-artifacts/ (TEST_ARTIFACTS).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Service, ServiceFactory
from tests.support.cli import ROOT
from tests.support.pg_net import PgNetSender
from tests.support.postgres import OWNER_ROLE, Database
from tests.support.smtp import SmtpServer
from tests.support.tools import require_tool
from tests.support.waiting import wait_until
from tests.test_e2e import enqueue, queue_rows

# Playwright is a dev dependency; without it (a trimmed install) the test skips.
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
sync_playwright = sync_api.sync_playwright

QUEUE = "email_queue"
REASON = "550 5.1.1 <gone@example.com>: Recipient address rejected"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def artifacts() -> Path:
    path = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def chromium() -> Iterator[Any]:
    executable = require_tool("chromium", "apt-get install chromium (Debian's package)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        try:
            yield browser
        finally:
            browser.close()


def dead_letter(db: Database, job: dict[str, Any], reason: str) -> int:
    """A job archived with its error, as the runner leaves one after its last attempt.

    Sent invisible (a delay): its webhook rings the service, whose claim must find
    nothing, or the job would run (and mail) before it is archived.
    """
    with db.connect(role=OWNER_ROLE) as conn:
        [(msg_id,)] = conn.execute(
            "select * from pgmq.send(%s, %s::jsonb, 3600)", [QUEUE, json.dumps(job)]
        ).fetchall()
    record = {"type": "PermanentError", "message": reason, "attempt": 5}
    with db.connect(role="service_role") as conn:
        conn.execute(
            "select queue_worker.archive(%s, %s, %s::jsonb)",
            [QUEUE, [msg_id], json.dumps({str(msg_id): record})],
        )
    return msg_id


def test_an_operator_signs_in_replays_a_dead_letter_and_pauses_a_queue(
    db: Database,
    start_service: ServiceFactory,
    sender: PgNetSender,
    smtp: SmtpServer,
    chromium: Any,
    artifacts: Path,
) -> None:
    token = secrets.token_urlsafe(24)
    service: Service = start_service(api_token=token, metrics_cache_seconds=0)
    job = {"to": "ops@example.com", "subject": "Replayed from the console", "text": "hi"}
    msg_id = dead_letter(db, job, REASON)

    context = chromium.new_context(viewport=DESKTOP)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    # A wrong token is refused, and no cookie is set.
    page.goto(f"{service.url}/console")
    assert page.url.endswith("/console/login")
    page.fill("#token", "not-the-token-" + secrets.token_hex(8))
    with page.expect_response(lambda r: r.url.endswith("/console/login")) as refused:
        page.click("button[type=submit]")
    assert refused.value.status == 401
    assert page.locator("[role=alert]").inner_text() == "Wrong token."
    assert context.cookies() == []

    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{service.url}/console")
    [cookie] = context.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict")

    # The queue's dead letter, with its reason.
    row = page.locator(f"tr[data-msg-id='{msg_id}']")
    assert REASON in row.locator(".reason").inner_text()
    queue_row = page.locator(f"tr[data-queue='{QUEUE}']")
    assert queue_row.locator(".dead").inner_text() == "1"
    page.screenshot(path=str(artifacts / "console-desktop.png"), full_page=True)
    phone = chromium.new_context(
        viewport=PHONE,
        device_scale_factor=2,
        is_mobile=True,
        color_scheme="dark",
        storage_state=context.storage_state(),
    )
    phone_page = phone.new_page()
    phone_page.goto(f"{service.url}/console")
    assert REASON in phone_page.locator(f"tr[data-msg-id='{msg_id}'] .reason").inner_text()
    # Readable on a phone: nothing wider than the screen.
    assert phone_page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    # Dark mode follows the system's (prefers-color-scheme).
    background = phone_page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(13, 17, 23)"
    phone_page.screenshot(path=str(artifacts / "console-phone-dark.png"), full_page=True)
    phone.close()

    # Replayed: the job runs again (the webhook rings for the new message) and is delivered.
    row.locator("button", has_text="Replay").click()
    page.wait_for_url("**/console?notice=replayed&n=1")
    assert "Replayed 1 dead letter(s)." in page.locator("#notice").inner_text()
    [mail] = smtp.wait_for(1, timeout=20)
    assert mail["Subject"] == "Replayed from the console"
    wait_until(lambda: queue_rows(db) == [], what="the replayed job to be acked")
    page.reload()
    assert page.locator("p.empty").inner_text() == "No dead letters."
    assert queue_row.locator(".dead").inner_text() == "0"

    # Paused: a new job waits, as the page's own refresh shows, until resumed.
    queue_row.locator("button", has_text="Pause").click()
    page.wait_for_url("**/console?notice=paused")
    assert queue_row.locator(".state").inner_text() == "paused"
    waiting = enqueue(db, {**job, "subject": "Waited for resume"})
    # console.js refreshes the overview every few seconds: the depth shows 1.
    expect(queue_row.locator(".depth")).to_have_text("1", timeout=20_000)
    time.sleep(1.0)  # the webhook has rung (pg_net) and been deferred meanwhile
    assert len(smtp.messages) == 1
    assert [row[0] for row in queue_rows(db)] == [waiting]
    assert queue_rows(db)[0][1] == 0  # never claimed
    page.screenshot(path=str(artifacts / "console-paused.png"), full_page=True)

    queue_row.locator("button", has_text="Resume").click()
    page.wait_for_url("**/console?notice=resumed")
    mails = smtp.wait_for(2, timeout=20)
    assert mails[-1]["Subject"] == "Waited for resume"
    # No CSP violation, no script error: only the refused login's own 401.
    assert errors == [
        "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
    ]
    context.close()
