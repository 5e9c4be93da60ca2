"""`GET /console`: the operator console, server-rendered, behind API_TOKEN.

Mounted only when API_TOKEN is set (404 otherwise, like the manual API). A login
form exchanges the token for a signed session cookie (HttpOnly, SameSite=Strict,
Secure over HTTPS; app/console/session.py). Every action is a form POST that
carries the session's CSRF token and must come from this origin. Pages are
rendered by Jinja2 with autoescaping on: job bodies and error texts are whatever
a producer or an SMTP server wrote, so nothing is ever marked safe. A strict
Content-Security-Policy allows only this service's own CSS and script.

The routes are thin: what they do is app/operations.py, as for the manual API.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app import operations
from app.api.deps import Services, get_services
from app.api.errors import ApiError
from app.console.overview import overview
from app.console.session import COOKIE, Sessions, same_origin
from app.operations import OperationError
from app.queue.models import MAX_MSG_ID

HERE: Final = Path(__file__).resolve().parent.parent / "console"
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC: Final = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# What the page says after an action (a code in the redirect, never text from it).
NOTICES: Final = {
    "replayed": "Replayed {n} dead letter(s).",
    "purged": "Purged {n} dead letter(s).",
    "paused": "Paused: no replica claims from this queue until it is resumed.",
    "resumed": "Resumed.",
    "unchanged": "Nothing changed: it was so already.",
}

templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


templates.filters["age"] = _age

router = APIRouter(prefix="/console", include_in_schema=False)


def _sessions(services: Services) -> Sessions:
    token = services.settings.api_token
    assert token is not None  # the router is mounted only with API_TOKEN
    return _sessions_for(token.get_secret_value())


@functools.lru_cache(maxsize=4)
def _sessions_for(token: str) -> Sessions:
    return Sessions(token)


def _page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    body = templates.get_template(name).render(**context)
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


def _nonce(request: Request) -> str | None:
    return _sessions(get_services(request)).nonce(request.cookies.get(COOKIE))


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded form body: one value per field (the first), as text."""
    try:
        fields = parse_qs((await request.body()).decode("utf-8"), max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "bad_request", "the form is not readable") from None
    return {name: values[0] for name, values in fields.items()}


async def _action(request: Request) -> dict[str, str]:
    """The form of an action, once its session, CSRF token and origin are checked."""
    nonce = _nonce(request)
    if nonce is None:
        raise ApiError(401, "unauthorized", "sign in to the console first")
    form = await _form(request)
    if not same_origin(request) or not _sessions(get_services(request)).csrf_matches(
        nonce, form.get("csrf", "")
    ):
        raise ApiError(403, "forbidden", "the form is stale or from another site; reload it")
    return form


def _done(notice: str, n: int | None = None) -> RedirectResponse:
    query = f"?notice={notice}" + (f"&n={n}" if n is not None else "")
    return RedirectResponse(f"/console{query}", status_code=303, headers=SECURITY_HEADERS)


def _refusal(request: Request, error: OperationError) -> HTMLResponse:
    return _page("refused.html", status=error.status, message=error.message, csrf=_csrf_of(request))


def _csrf_of(request: Request) -> str:
    nonce = _nonce(request)
    return "" if nonce is None else _sessions(get_services(request)).csrf(nonce)


# -- pages ----------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
async def console(request: Request) -> Response:
    nonce = _nonce(request)
    if nonce is None:
        return RedirectResponse("/console/login", status_code=303, headers=SECURITY_HEADERS)
    services = get_services(request)
    notice = NOTICES.get(request.query_params.get("notice", ""))
    n = request.query_params.get("n", "")
    dead_queue = request.query_params.get("dead_queue") or None
    return _page(
        "console.html",
        view=await overview(services, dead_queue),
        csrf=_sessions(services).csrf(nonce),
        notice=notice.format(n=int(n) if n.isdigit() else 0) if notice else None,
        queues=sorted(services.processors),
        dead_queue=dead_queue,
    )


@router.get("/overview", response_class=HTMLResponse)
async def overview_fragment(request: Request) -> Response:
    """The refreshed part of the page (console.js asks every few seconds)."""
    nonce = _nonce(request)
    if nonce is None:
        raise ApiError(401, "unauthorized", "sign in to the console first")
    services = get_services(request)
    dead_queue = request.query_params.get("dead_queue") or None
    return _page(
        "overview.html",
        view=await overview(services, dead_queue),
        csrf=_sessions(services).csrf(nonce),
    )


@router.get("/dead/{queue}/{msg_id}", response_class=HTMLResponse)
async def dead_letter(queue: str, msg_id: int, request: Request) -> Response:
    """One dead letter with its body: shown only when asked for."""
    if _nonce(request) is None:
        return RedirectResponse("/console/login", status_code=303, headers=SECURITY_HEADERS)
    services = get_services(request)
    if not 1 <= msg_id <= MAX_MSG_ID:
        raise ApiError(404, "not_archived", "no such dead letter")
    try:
        page = await operations.dead_letters(
            services.backend, services.processors, queue, 1, msg_id + 1
        )
    except OperationError as error:
        return _refusal(request, error)
    found = [m for m in page.messages if m.msg_id == msg_id]
    if not found:
        return _refusal(request, operations.NotArchived(queue, msg_id))
    message = found[0]
    return _page(
        "dead.html",
        queue=queue,
        message=message,
        body=json.dumps(message.message, indent=2, ensure_ascii=False),
        error=json.dumps(message.error, indent=2, ensure_ascii=False),
        csrf=_csrf_of(request),
    )


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC:
        raise ApiError(404, "not_found", "no such file")
    return Response(
        (HERE / "static" / name).read_bytes(),
        media_type=STATIC[name],
        headers={**SECURITY_HEADERS, "Cache-Control": "max-age=300"},
    )


# -- signing in and out -----------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request) -> Response:
    return _page("login.html", error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    sessions = _sessions(get_services(request))
    form = await _form(request)
    if not same_origin(request):
        return _page("login.html", status=403, error="This form must be sent from this page.")
    if not sessions.token_matches(form.get("token", "")):
        return _page("login.html", status=401, error="Wrong token.")
    response = RedirectResponse("/console", status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(
        COOKIE,
        sessions.new(),
        max_age=sessions.lifetime,
        path="/console",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    await _action(request)
    response = RedirectResponse("/console/login", status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict")
    return response


# -- actions ------------------------------------------------------------------------


@router.post("/replay")
async def replay(request: Request) -> Response:
    form = await _action(request)
    services = get_services(request)
    msg_id = form.get("msg_id", "")
    try:
        if not msg_id.isdigit() or len(msg_id) > 19:
            raise OperationError("invalid_request", "msg_id: a whole number")
        await operations.replay(
            services.backend, services.processors, form.get("queue", ""), int(msg_id)
        )
    except OperationError as error:
        return _refusal(request, error)
    return _done("replayed", 1)


@router.post("/bulk")
async def bulk(request: Request) -> Response:
    """Replays or purges every dead letter of a queue that the filter matches."""
    form = await _action(request)
    services = get_services(request)
    action = form.get("action")
    try:
        if action not in ("replay", "purge"):
            raise OperationError("invalid_request", "action: replay or purge")
        where = operations.dead_filter(
            form.get("error") or None, _utc(form, "since"), _utc(form, "until")
        )
        done = await operations.bulk_dead(
            services.backend,
            services.processors,
            form.get("queue", ""),
            "replay" if action == "replay" else "purge",
            where,
            everything=form.get("all") == "on",
        )
    except OperationError as error:
        return _refusal(request, error)
    return _done("replayed" if action == "replay" else "purged", done.affected)


def _utc(form: dict[str, str], name: str) -> datetime | None:
    """A datetime-local field (no zone), read as UTC as the form says."""
    text = form.get(name, "").strip()
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise OperationError("invalid_request", f"{name}: not a date and time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@router.post("/pause")
async def pause(request: Request) -> Response:
    return await _set_paused(request, True)


@router.post("/resume")
async def resume(request: Request) -> Response:
    return await _set_paused(request, False)


async def _set_paused(request: Request, paused: bool) -> Response:
    form = await _action(request)
    services = get_services(request)
    try:
        changed = await operations.set_paused(
            services.backend,
            services.processors,
            form.get("queue", ""),
            paused,
            mirror=services.pauses.apply,
        )
    except OperationError as error:
        return _refusal(request, error)
    return _done(("paused" if paused else "resumed") if changed else "unchanged")
