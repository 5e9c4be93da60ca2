"""The console over plain HTTP: off without API_TOKEN, the login cookie, CSRF, escaping, CSP.

tests/test_console_browser.py drives the same pages in a real Chromium.
"""

from __future__ import annotations

import contextlib
import re
import secrets

import httpx
import pytest

from tests.conftest import Service, ServiceFactory
from tests.support.postgres import Database
from tests.test_dead_letters import bury, dead_ids

QUEUE = "email_queue"


@pytest.fixture
def console(start_service: ServiceFactory) -> tuple[Service, str]:
    token = secrets.token_urlsafe(24)
    return start_service(register=False, api_token=token, metrics_cache_seconds=0), token


def signed_in(service: Service, token: str) -> tuple[httpx.Client, str]:
    """A client holding a session cookie, and the page's CSRF token."""
    client = httpx.Client(base_url=service.url, headers={"Origin": service.url})
    response = client.post("/console/login", data={"token": token})
    assert response.status_code == 303
    page = client.get("/console")
    assert page.status_code == 200
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert match is not None
    return client, match.group(1)


def test_the_console_is_off_without_an_api_token(service: Service) -> None:
    for path in ("/console", "/console/login", "/console/static/console.css"):
        assert httpx.get(f"{service.url}{path}").status_code == 404


def test_login_sets_a_strict_httponly_cookie_and_a_wrong_token_is_refused(
    console: tuple[Service, str],
) -> None:
    service, token = console
    assert httpx.get(f"{service.url}/console").headers["location"] == "/console/login"
    origin = {"Origin": service.url}
    wrong = httpx.post(f"{service.url}/console/login", data={"token": "nope" * 8}, headers=origin)
    assert wrong.status_code == 401
    assert "Wrong token." in wrong.text
    assert "set-cookie" not in wrong.headers
    foreign = httpx.post(
        f"{service.url}/console/login",
        data={"token": token},
        headers={"Origin": "https://evil.example"},
    )
    assert foreign.status_code == 403
    ok = httpx.post(f"{service.url}/console/login", data={"token": token}, headers=origin)
    assert ok.status_code == 303
    cookie = ok.headers["set-cookie"]
    assert cookie.startswith("qw_console=")
    assert token not in cookie
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "samesite", "path", "max-age"} <= attributes
    assert "samesite=strict" in cookie.lower()
    assert "secure" not in attributes  # plain http here; over https it is set


def test_every_action_needs_the_csrf_token_and_this_origin(
    db: Database, console: tuple[Service, str]
) -> None:
    service, token = console
    client, csrf = signed_in(service, token)
    with contextlib.closing(client):
        no_token = client.post("/console/pause", data={"queue": QUEUE})
        assert no_token.status_code == 403
        forged = client.post(
            "/console/pause",
            data={"queue": QUEUE, "csrf": csrf},
            headers={"Origin": "https://evil.example"},
        )
        assert forged.status_code == 403
        assert service.services.runner.paused == set()
        done = client.post("/console/pause", data={"queue": QUEUE, "csrf": csrf})
        assert done.status_code == 303
        assert service.services.runner.paused == {QUEUE}
        assert (
            client.post("/console/resume", data={"queue": QUEUE, "csrf": csrf}).status_code == 303
        )
        # Without a session no action is taken, whatever the form says.
        anonymous = httpx.post(
            f"{service.url}/console/pause",
            data={"queue": QUEUE, "csrf": csrf},
            headers={"Origin": service.url},
        )
        assert anonymous.status_code == 401
        assert service.services.runner.paused == set()


def test_hostile_bodies_and_errors_are_escaped_under_a_strict_csp(
    db: Database, console: tuple[Service, str]
) -> None:
    service, token = console
    hostile = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    [msg_id] = bury(db, [hostile])
    with db.connect() as conn:
        conn.execute(
            f"update pgmq.a_{QUEUE} set message = %s::jsonb where msg_id = %s",
            ['{"html": "</pre><script>alert(3)</script>"}', msg_id],
        )
    client, csrf = signed_in(service, token)
    with contextlib.closing(client):
        page = client.get("/console")
        body = client.get(f"/console/dead/{QUEUE}/{msg_id}")
        fragment = client.get("/console/overview")
        for response in (page, body, fragment):
            assert "<script>alert" not in response.text
            assert "<img src=x" not in response.text
            csp = response.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp
            assert "frame-ancestors 'none'" in csp
            assert response.headers["x-frame-options"] == "DENY"
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert "&lt;/pre&gt;&lt;script&gt;alert(3)" in body.text
        # The body is shown only on request: not on the overview.
        assert "alert(3)" not in page.text
        # Replay one, then the purge of what matches needs a filter or "all".
        assert (
            client.post(
                "/console/replay", data={"queue": QUEUE, "msg_id": str(msg_id), "csrf": csrf}
            ).headers["location"]
            == "/console?notice=replayed&n=1"
        )
        assert dead_ids(db) == []
        refused = client.post(
            "/console/bulk", data={"queue": QUEUE, "action": "purge", "csrf": csrf}
        )
        assert refused.status_code == 400
        assert "no filter" in refused.text


def test_static_files_are_served_by_the_service(console: tuple[Service, str]) -> None:
    service, _ = console
    css = httpx.get(f"{service.url}/console/static/console.css")
    assert css.headers["content-type"].startswith("text/css")
    assert "prefers-color-scheme: dark" in css.text
    assert httpx.get(f"{service.url}/console/static/console.js").status_code == 200
    assert httpx.get(f"{service.url}/console/static/..%2Fsession.py").status_code == 404
    assert httpx.get(f"{service.url}/console/overview").status_code == 401
