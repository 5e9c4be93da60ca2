"""What libcurl puts on the wire for pg_net, and how it reads the answer.

The pg_net stand-in (tests/support/pg_net.py) sends each request through
`perform()`, which writes the request bytes itself rather than through an HTTP
library: a library refuses or escapes what curl sends as is, and the service has to
survive what curl really sends. As measured against a real pg_net 0.20 build
(../shared/SUPABASE-FACTS.md):

* The request is `Host`, `User-Agent: pg_net/<version>`, `Accept: */*`, then the
  caller's header lines exactly as pg_net built them (`key: value` from the jsonb),
  then `Content-Length` and, for a POST body without a caller's Content-Type,
  curl's form default `application/x-www-form-urlencoded`. A caller's header of the
  same name replaces curl's own; `Name:` with nothing after it removes it.
* **A CR or LF inside a header value goes onto the wire as is**, so it splits the
  header: `Bearer x\\r\\nX-Injected: 1` arrives as two headers.
* Redirects are followed (CURLOPT_FOLLOWLOCATION, up to curl's 30): a 301, 302 or
  303 turns a POST into a GET without its body; 307 and 308 keep method and body. A
  caller's Authorization or Cookie header is not sent to another host, port or scheme.
* Failures carry curl_easy_strerror()'s text, which pg_net records as `error_msg`.

Not modelled: connection reuse between requests (each request has a connection of
its own), `Expect: 100-continue` for large bodies, proxies, and HTTP/2.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httptools

MAX_REDIRECTS = 30  # CURLOPT_MAXREDIRS's default since curl 8.3
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
# Custom headers curl keeps to the host the caller named (CVE-2018-1000007, CVE-2022-27776).
_SAME_ORIGIN_ONLY = frozenset({"authorization", "cookie"})


class CurlError(Exception):
    """A transfer that ended without an HTTP answer; the text is curl's."""


@dataclass(frozen=True)
class Reply:
    """The final answer, after redirects."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The last value of a header, as curl's CURLINFO_CONTENT_TYPE reads it."""
        wanted = name.lower()
        values = [value for key, value in self.headers if key.lower() == wanted]
        return values[-1] if values else None


@dataclass
class _Target:
    scheme: str
    host: str
    port: int
    host_header: str
    path: str

    @classmethod
    def parse(cls, url: str) -> _Target:
        # curl refuses control characters and spaces anywhere in a URL.
        if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
            raise CurlError("URL using bad/illegal format or missing URL")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise CurlError("URL using bad/illegal format or missing URL") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise CurlError("Unsupported protocol")
        host = parts.hostname
        if not host:
            raise CurlError("URL using bad/illegal format or missing URL")
        default = 443 if scheme == "https" else 80
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port is None else f"{shown}:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(scheme, host, port or default, host_header, path)

    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host.lower(), self.port)


def request_bytes(
    method: str,
    target: _Target,
    header_lines: Sequence[str],
    body: bytes | None,
    user_agent: str,
) -> bytes:
    """The request exactly as curl writes it for these CURLOPT_HTTPHEADER lines."""
    named: set[str] = set()
    custom: list[str] = []
    for line in header_lines:
        name, _, value = line.partition(":")
        named.add(name.strip().lower())
        if value.strip(" \t"):
            custom.append(line)  # as is, CR and LF included
    lines = [f"{method} {target.path} HTTP/1.1"]
    if "host" not in named:
        lines.append(f"Host: {target.host_header}")
    if "user-agent" not in named:
        lines.append(f"User-Agent: {user_agent}")
    if "accept" not in named:
        lines.append("Accept: */*")
    lines.extend(custom)
    if body is not None:
        if "content-length" not in named:
            lines.append(f"Content-Length: {len(body)}")
        if "content-type" not in named:
            lines.append(f"Content-Type: {FORM_CONTENT_TYPE}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
    return head + (body or b"")


@dataclass
class _Response:
    """httptools callbacks, collecting one response."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    headers_done: bool = False
    complete: bool = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


async def _exchange(target: _Target, request: bytes) -> Reply:
    context = ssl.create_default_context() if target.scheme == "https" else None
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port, ssl=context)
    except socket.gaierror:
        raise CurlError("Couldn't resolve host name") from None
    except ssl.SSLError:
        raise CurlError("SSL connect error") from None
    except OSError:
        raise CurlError("Couldn't connect to server") from None
    try:
        try:
            writer.write(request)
            await writer.drain()
        except OSError:
            raise CurlError("Failed sending data to the peer") from None
        response = _Response()
        parser = httptools.HttpResponseParser(response)
        received = 0
        while not response.complete:
            try:
                data = await reader.read(65536)
            except OSError:
                raise CurlError("Failure when receiving data from the peer") from None
            if not data:
                if received == 0:
                    raise CurlError("Server returned nothing (no headers, no data)")
                names = {name.lower() for name, _ in response.headers}
                if response.headers_done and not names & {"content-length", "transfer-encoding"}:
                    break  # a body delimited by the connection's end
                raise CurlError("Failure when receiving data from the peer")
            received += len(data)
            try:
                parser.feed_data(data)
            except httptools.HttpParserError:
                raise CurlError("Weird server reply") from None
        return Reply(parser.get_status_code(), response.headers, bytes(response.body))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _name(line: str) -> str:
    return line.partition(":")[0].strip().lower()


async def perform(
    method: str,
    url: str,
    header_lines: Sequence[str],
    body: bytes | None,
    *,
    user_agent: str,
) -> Reply:
    """One pg_net request with curl's redirect rules; raises CurlError without an answer.

    `body` is None when pg_net sets no CURLOPT_POSTFIELDS (a GET, a DELETE without
    body); a POST always carries one, empty if the queue row's body is null.
    """
    target = _Target.parse(url)
    origin = target.origin()
    lines = list(header_lines)
    for _ in range(MAX_REDIRECTS + 1):
        sent = lines
        if target.origin() != origin:
            sent = [line for line in lines if _name(line) not in _SAME_ORIGIN_ONLY]
        reply = await _exchange(target, request_bytes(method, target, sent, body, user_agent))
        location = reply.header("location")
        if reply.status not in (301, 302, 303, 307, 308) or location is None:
            return reply
        if reply.status in (301, 302, 303) and method == "POST":
            method, body = "GET", None
        elif reply.status == 303 and method != "GET":
            body = None
        url = urljoin(url, location.strip())
        target = _Target.parse(url)
    raise CurlError("Number of redirects hit maximum amount")
