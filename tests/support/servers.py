"""Serving ASGI apps over real loopback sockets from a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready TCP socket; port 0 lets the kernel choose a free port."""
    # IPPROTO_TCP explicitly: asyncio enables TCP_NODELAY only when sock.proto says TCP,
    # and without it every response waits out the 40 ms delayed-ACK timer.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


@contextlib.contextmanager
def serve_in_thread(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, **config: Any
) -> Iterator[str]:
    """Runs `app` under uvicorn in a thread with its own event loop.

    Yields the base URL (`http://127.0.0.1:PORT`). The lifespan runs as it does
    in production; start-up failures are raised here.
    """
    sock = bound_socket(host, port)
    actual_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"uvicorn-{actual_port}", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError(f"server on port {actual_port} failed to start") from (
                failure[0] if failure else None
            )
        threading.Event().wait(0.01)
    try:
        yield f"http://{host}:{actual_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on `port` (from /proc/net/tcp*)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for row in list(lines)[1:]:
                fields = row.split()
                address, _, hex_port = fields[1].partition(":")
                if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
                    if width == 8:
                        raw = bytes.fromhex(address)[::-1]
                        found.add(".".join(str(b) for b in raw))
                    else:
                        found.add("::" if set(address) == {"0"} else address)
    return found
