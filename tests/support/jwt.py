"""HS256 JSON Web Tokens with the standard library, for the test stand-ins.

Supabase's legacy API keys and user access tokens are HS256 JWTs signed with the
project's JWT secret; the RPC gateway stand-in mints them and PostgREST-style
verifies them. The error messages are PostgREST's (`PostgREST.Error`), so a test
that asserts on a 401 body sees what a real project would send.

Only what the test bed needs: HS256, `exp`/`nbf`/`iat` checks, no `aud`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

ALGORITHM = "HS256"


class JWTError(Exception):
    """A token PostgREST would refuse; `code` is its PGRST error code."""

    code = "PGRST301"

    def __init__(self, message: str, details: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class JWTDecodeError(JWTError):
    """Malformed token, wrong algorithm or bad signature (PostgREST PGRST301)."""

    code = "PGRST301"


class JWTClaimsError(JWTError):
    """Well signed but not valid now: expired, not yet valid (PostgREST PGRST303)."""

    code = "PGRST303"


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(segment: str) -> bytes:
    padded = segment + "=" * (-len(segment) % 4)
    # validate=True would reject the URL-safe alphabet; decode strictly by hand.
    if not all(c.isalnum() or c in "-_=" for c in padded):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(padded.encode("ascii"))


def _key(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def _sign(signing_input: bytes, secret: str | bytes) -> bytes:
    return hmac.new(_key(secret), signing_input, hashlib.sha256).digest()


def encode(
    claims: Mapping[str, Any],
    secret: str | bytes,
    *,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """Signs `claims` with HS256. Extra `headers` may override the JOSE header."""
    header: dict[str, Any] = {"alg": ALGORITHM, "typ": "JWT"}
    if headers:
        header.update(headers)
    segments = [
        _b64url_encode(json.dumps(header, separators=(",", ":")).encode()),
        _b64url_encode(json.dumps(dict(claims), separators=(",", ":")).encode()),
    ]
    signing_input = ".".join(segments).encode("ascii")
    return ".".join([*segments, _b64url_encode(_sign(signing_input, secret))])


def _numeric_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # bool is an int subclass, and PostgREST rejects it as a number too.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JWTClaimsError(f"The JWT '{name}' claim must be a number")
    return float(value)


def decode(
    token: str,
    secret: str | bytes,
    *,
    now: float | None = None,
    leeway: float = 0.0,
) -> dict[str, Any]:
    """Verifies an HS256 token and returns its claims.

    Raises `JWTDecodeError` for anything that is not a well-signed HS256 JWT and
    `JWTClaimsError` when `exp`, `nbf` or `iat` make it invalid at `now`.
    `leeway` is the clock skew allowed in seconds (PostgREST allows 30).
    """
    if token == "":
        raise JWTDecodeError("Empty JWT is sent in Authorization header")
    parts = token.split(".")
    if len(parts) != 3:
        raise JWTDecodeError(f"Expected 3 parts in JWT; got {len(parts)}")
    header_b64, payload_b64, signature_b64 = parts
    try:
        header = json.loads(_b64url_decode(header_b64))
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise JWTDecodeError("JWT couldn't be decoded") from exc
    if not isinstance(header, dict):
        raise JWTDecodeError("JWT couldn't be decoded")
    alg = header.get("alg")
    # Refusing anything but HS256 closes the `alg: none` and key-confusion holes.
    if alg != ALGORITHM:
        raise JWTDecodeError(
            "Wrong or unsupported encoding algorithm", f"expected {ALGORITHM}, got {alg!r}"
        )
    try:
        signature = _b64url_decode(signature_b64)
    except (ValueError, binascii.Error) as exc:
        raise JWTDecodeError("JWT cryptographic operation failed") from exc
    expected = _sign(f"{header_b64}.{payload_b64}".encode("ascii"), secret)
    if not hmac.compare_digest(signature, expected):
        raise JWTDecodeError("JWT cryptographic operation failed")
    try:
        claims = json.loads(_b64url_decode(payload_b64))
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise JWTDecodeError("JWT couldn't be decoded") from exc
    if not isinstance(claims, dict):
        raise JWTClaimsError("Parsing claims failed")

    current = time.time() if now is None else now
    exp = _numeric_claim(claims, "exp")
    nbf = _numeric_claim(claims, "nbf")
    iat = _numeric_claim(claims, "iat")
    if exp is not None and current - leeway >= exp:
        raise JWTClaimsError("JWT expired")
    if nbf is not None and current + leeway < nbf:
        raise JWTClaimsError("JWT not yet valid")
    if iat is not None and current + leeway < iat:
        raise JWTClaimsError("JWT issued at future")
    return claims
