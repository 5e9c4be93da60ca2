"""The service as `queue-worker` runs it, with a no-op processor on email_queue.

For throughput benchmarks only: what is measured is the path from webhook (or sweep)
to ack, not SMTP. The product has no such processor; this module swaps the
built-in `email` processor of the registry (`app.processors.registry.BUILTINS`) in
its own process before the app is built, then serves through `app.server.serve`
exactly as the console script does (same event loop, HTTP parser and settings).

    python -m bench.noop_service   # settings from the environment, as queue-worker

With BENCH_PROFILE=<file>, SIGUSR1 starts cProfile (counting CPU time, not wall
time) and SIGUSR2 stops it and writes the statistics to that file, so that a
benchmark can profile exactly its measured phase (`webhook_path.py --profile`).
"""

from __future__ import annotations

import cProfile
import os
import signal
import time

from pydantic import BaseModel

from app.config import load_settings
from app.jobs import Resources
from app.logs import configure
from app.processors import registry
from app.queue.models import QueueMessage
from app.server import serve


class NoopProcessor:
    """Succeeds at once."""

    model = BaseModel

    def validate(self, body: object) -> None:
        return None

    async def __call__(self, message: QueueMessage) -> None:
        return None


def noop(resources: Resources) -> NoopProcessor:
    """The factory registered in place of the email processor."""
    return NoopProcessor()


def _profile_on_signals(path: str) -> None:
    profile = cProfile.Profile(time.process_time)
    signal.signal(signal.SIGUSR1, lambda *_: profile.enable())

    def stop(*_: object) -> None:
        profile.disable()
        profile.dump_stats(path)

    signal.signal(signal.SIGUSR2, stop)


def run() -> None:
    if path := os.environ.get("BENCH_PROFILE"):
        _profile_on_signals(path)
    registry.BUILTINS["email"] = registry.Builtin("bench.noop_service:noop")
    settings = load_settings()
    configure(settings.log_level, settings.log_format)
    serve(settings)


if __name__ == "__main__":
    run()
