"""Graceful shutdown on SIGTERM and SIGINT.

uvicorn, on a signal, stops accepting connections at once and only then runs the
lifespan's shutdown, so a webhook arriving during the drain would find nobody to
tell it "come back later". Instead the signal first drains the runner while the
server still answers (webhooks get 503 with Retry-After), and only then hands the
signal to uvicorn's own handler.

Signals that follow the first:

- within `REPEAT_WINDOW_SECONDS` of it: the same request, ignored. A SIGTERM sent
  to a process group reaches the service twice within milliseconds when it runs
  under `uv run` (the kernel delivers one, uv forwards its own), and a supervisor
  may repeat itself; neither means "hurry".
- later: a deliberate request to stop now. The drain stops waiting for running
  jobs: they are cancelled and their messages made visible again at once (one
  call), what is owed is settled briefly, and the process exits.
- after that, another one later still: uvicorn's own handler, as without this
  module (the last resort when even the hurried drain cannot finish).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Signals this close to the one before are a repeat of it, not a second request.
REPEAT_WINDOW_SECONDS = 1.0


def install(drain: Callable[[], Awaitable[None]], hurry: Callable[[], None]) -> Callable[[], None]:
    """Wraps the current SIGTERM/SIGINT handlers; returns a function that restores them.

    `drain` runs on the first signal; `hurry` (called in the event loop) on a later,
    deliberate second one. Only possible in the main thread (where uvicorn runs
    when started normally); elsewhere it does nothing and shutdown relies on the
    lifespan alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in SIGNALS}
    # A strong reference keeps the drain task alive. The state is set in the handler
    # itself, before any task exists, so that the next signal is told apart at once.
    tasks: set[asyncio.Task[None]] = set()
    requests = 0  # requests to stop so far: 1 drain, 2 hurry, 3 uvicorn's own
    last_at = 0.0  # monotonic time of the last signal taken as a request

    def forward(signum: int, frame: FrameType | None) -> None:
        handler = previous.get(signum)
        server = getattr(handler, "__self__", None)
        if hasattr(server, "should_exit"):
            # uvicorn's Server.handle_exit would also re-raise the signal once the
            # server has stopped, and the process would die by SIGTERM after a clean
            # drain. Asking the server to exit gives a plain exit status 0 instead.
            server.should_exit = True  # type: ignore[union-attr]
            return
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    async def drain_then_forward(signum: int, frame: FrameType | None) -> None:
        try:
            await drain()
        finally:
            forward(signum, frame)

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal requests, last_at
        now = time.monotonic()
        name = signal.Signals(signum).name
        if requests and now - last_at < REPEAT_WINDOW_SECONDS:
            log.info(
                "signal repeated within %gs; taken as the same request",
                REPEAT_WINDOW_SECONDS,
                extra={"signal": name},
            )
            return
        requests += 1
        last_at = now
        if requests == 1:
            log.info("signal received; draining", extra={"signal": name})

            def start() -> None:
                tasks.add(loop.create_task(drain_then_forward(signum, frame)))

            # The handler interrupts the loop at an arbitrary point: schedule, don't run.
            loop.call_soon_threadsafe(start)
        elif requests == 2:
            log.warning(
                "second signal; stopping now: running jobs are cancelled and given back",
                extra={"signal": name},
            )
            loop.call_soon_threadsafe(hurry)
        else:
            # Stop as uvicorn does on its own.
            handler = previous.get(signum)
            if callable(handler):
                handler(signum, frame)

    for sig in SIGNALS:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
