"""The console's login cookie and CSRF tokens, both derived from API_TOKEN.

The cookie never holds the token: it holds an expiry and a random nonce, signed
with HMAC-SHA256 keyed by the token, so changing API_TOKEN signs every session
out. Each session's CSRF token is another HMAC of its nonce: a form carries it,
and every POST must also come from this origin (`same_origin`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Final
from urllib.parse import urlsplit

from starlette.requests import Request

COOKIE: Final = "qw_console"
LIFETIME_SECONDS: Final = 12 * 3600


class Sessions:
    def __init__(self, token: str, *, lifetime: int = LIFETIME_SECONDS) -> None:
        self._key = hashlib.sha256(b"queue-worker console|" + token.encode()).digest()
        self._token = token.encode()
        self.lifetime = lifetime

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        """The login form's token against API_TOKEN, in constant time."""
        return hmac.compare_digest(given.strip().encode(), self._token)

    def new(self) -> str:
        """A cookie value for a new session."""
        body = f"v1.{int(time.time()) + self.lifetime}.{secrets.token_urlsafe(18)}"
        return f"{body}.{self._sign('session|' + body)}"

    def nonce(self, cookie: str | None) -> str | None:
        """The session's nonce when `cookie` is a valid, unexpired session, else None."""
        if not cookie or len(cookie) > 200:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature.encode(), self._sign("session|" + body).encode()):
            return None
        version, expires, nonce = (body.split(".") + ["", "", ""])[:3]
        if version != "v1" or not expires.isdigit() or int(expires) < time.time():
            return None
        return nonce

    def csrf(self, nonce: str) -> str:
        return self._sign("csrf|" + nonce)

    def csrf_matches(self, nonce: str, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf(nonce).encode())


def same_origin(request: Request) -> bool:
    """True when the request's Origin (or, without one, its Referer) is this host.

    Browsers send Origin with every form POST; a request with neither is refused.
    The host is compared, not the scheme: behind a TLS proxy the service sees http.
    """
    source = request.headers.get("origin") or request.headers.get("referer")
    host = request.headers.get("host")
    if not source or not host or source == "null":
        return False
    return urlsplit(source).netloc.lower() == host.lower()
