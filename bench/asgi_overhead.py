"""CPU per webhook request inside the app, without sockets: the service against bare FastAPI.

Both apps are called directly as ASGI applications with the same webhook, 20,000 times
each, alternating, in this process; CPU time is `time.process_time()`. The service's
runner is replaced by one that defers every offer, so no job runs and nothing else
(database, gateway) is involved: what remains is what the service adds per request
(middlewares, routing, authentication, validation, metrics, the answer) on top of the
framework's own cost, which the bare endpoint (bench/bare_app.py) also pays.

    uv run python -m bench.asgi_overhead [--requests 20000] [--repeat 3] [--tracing]

With --tracing the service makes its webhook span (TRACING=true, spans kept in memory
and dropped: OTEL_TRACES_EXPORTER=none), to show what tracing costs when it is on.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import uvloop

from app.api.signatures import ReplayCache
from app.main import create_app
from app.tracing import OFF, Tracing, open_tracing
from app.worker import Offer
from bench.bare_app import app as bare_app
from bench.loadgen import webhook_body
from tests.support.settings import new_webhook_secret, settings_for

QUEUE = "email_queue"


class DeferringRunner:
    """Takes no work: every offer is deferred, as at capacity."""

    queues = frozenset({QUEUE})

    def offer(self, queue: str, msg_ids: list[int]) -> Offer:
        return Offer.DEFERRED


class Services:
    """What the webhook route reads from the app's services."""

    def __init__(self, settings: Any, tracing: Tracing = OFF) -> None:
        self.settings = settings
        self.runner = DeferringRunner()
        self.replays = ReplayCache()
        self.tracing = tracing


def webhook(secret: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body of a webhook, as the throughput benches' load generator sends it."""
    body = webhook_body(QUEUE, 1)
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer " + secret.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    return headers, body


async def cpu_per_request(
    app: Any, headers: list[tuple[bytes, bytes]], body: bytes, n: int
) -> float:
    statuses: set[int] = set()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    def scope() -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": f"/webhooks/{QUEUE}",
            "raw_path": f"/webhooks/{QUEUE}".encode(),
            "query_string": b"",
            "root_path": "",
            "headers": list(headers),
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }

    for _ in range(200):  # warm-up: first-call caches, lazy imports
        await app(scope(), receive, send)
    started = time.process_time()
    for _ in range(n):
        await app(scope(), receive, send)
    elapsed = time.process_time() - started
    if statuses != {202}:
        raise RuntimeError(f"unexpected answers: {sorted(statuses)}")
    return elapsed / n * 1e6


async def run(args: argparse.Namespace) -> None:
    secret = new_webhook_secret()
    settings = settings_for(
        supabase_url="http://127.0.0.1:9",  # never contacted
        supabase_service_role_key="sb_secret_" + "x" * 40,
        webhook_secret=secret,
        smtp_host="127.0.0.1",
        mail_from="bench@example.com",
        queues=[QUEUE],
    )
    service = create_app(settings)
    tracing = OFF
    if args.tracing:
        os.environ.setdefault("OTEL_TRACES_EXPORTER", "none")
        tracing = open_tracing(settings.model_copy(update={"tracing": True}))
    # No lifespan: nothing runs behind it.
    service.state.services = Services(settings, tracing)
    headers, body = webhook(secret)
    print(f"{args.requests} webhooks per run, in-process ASGI calls; CPU us per request")  # noqa: T201
    print(f"{'run':>4}{'bare FastAPI':>15}{'queue-worker':>15}{'added':>9}")  # noqa: T201
    for i in range(args.repeat):
        bare = await cpu_per_request(bare_app, headers, body, args.requests)
        ours = await cpu_per_request(service, headers, body, args.requests)
        print(f"{i + 1:>4}{bare:>15.1f}{ours:>15.1f}{ours - bare:>9.1f}")  # noqa: T201


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tracing", action="store_true", help="with the webhook span")
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
