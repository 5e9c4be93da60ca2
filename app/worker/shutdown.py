"""Graceful shutdown on SIGTERM and SIGINT.

uvicorn, on a signal, stops accepting connections at once and only then runs the
lifespan's shutdown, so a webhook arriving during the drain would find nobody to
tell it "come back later". Instead the signal first drains the runner while the
server still answers (webhooks get 503 with Retry-After), and only then hands the
signal to uvicorn's own handler. A second signal goes straight to uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install(drain: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Wraps the current SIGTERM/SIGINT handlers; returns a function that restores them.

    Only possible in the main thread (where uvicorn runs when started normally);
    elsewhere it does nothing and shutdown relies on the lifespan alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in SIGNALS}
    # A strong reference keeps the drain task alive; `started` is set in the handler
    # itself, before the task exists, so that a second signal is recognised at once.
    tasks: set[asyncio.Task[None]] = set()
    started = False

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
        nonlocal started
        if started:
            # A second signal: stop now, the way uvicorn does on its own.
            handler = previous.get(signum)
            if callable(handler):
                handler(signum, frame)
            return
        log.info("signal received; draining", extra={"signal": signal.Signals(signum).name})

        def start() -> None:
            tasks.add(loop.create_task(drain_then_forward(signum, frame)))

        # The handler interrupts the loop at an arbitrary point: schedule, don't run.
        loop.call_soon_threadsafe(start)
        started = True

    for sig in SIGNALS:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
