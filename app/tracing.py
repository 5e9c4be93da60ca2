"""Traces: what the service tells OpenTelemetry, and nothing at all when tracing is off.

With tracing on (`TRACING=true`, or unset and one of OTEL_SERVICE_NAME,
OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set) the service
makes spans for a webhook, the claim it starts, a sweeper's read, each job's
processing (its SMTP session or HTTP call inside) and the ack; an enqueue through
the manual API makes a producer span and carries its W3C trace context in the
message's pgmq headers (`traceparent`, `tracestate`), so the processing span is its
child and a trace crosses the queue. The exporter, sampler and resource come from
OpenTelemetry's own OTEL_* variables (app/otel.py, docs/guides/operations.md#traces).

The rest of the service talks to the `Tracing` protocol here. `OFF` is the one used
when tracing is off: plain Python, and this module imports nothing of OpenTelemetry,
so a service without the `otel` extra, or with tracing off, pays nothing but an
`enabled` check on the paths that would make spans.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from app.config import ConfigError, Settings

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

SpanKind = Literal["internal", "server", "client", "producer", "consumer"]
AttributeValue = str | int | float | bool
# The variables that turn tracing on when TRACING is unset: where to send spans, or
# a service name, are what someone who wants traces sets.
TRIGGERS = (
    "OTEL_SERVICE_NAME",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
)
# The pgmq headers that carry a job's trace context (W3C Trace Context).
CONTEXT_HEADERS = ("traceparent", "tracestate")


class Span(Protocol):
    def set_attribute(self, key: str, value: AttributeValue) -> None: ...

    def set_error(self, description: str) -> None:
        """Marks the span as failed (an exception raised through it is marked anyway)."""
        ...


class Tracing(Protocol):
    """What the service asks of tracing; `OFF` or app/otel.py's `OtelTracing`."""

    @property
    def enabled(self) -> bool: ...

    def span(
        self,
        name: str,
        *,
        kind: SpanKind = "internal",
        attributes: Mapping[str, AttributeValue] | None = None,
        parent: Mapping[str, Any] | None = None,
        start_time: int | None = None,
    ) -> AbstractContextManager[Span]:
        """A span, current while the block runs.

        `parent`: pgmq headers; when they carry a trace context, the span is its child
        and links to the span current here (the webhook or the read that claimed it).
        `start_time`: nanoseconds since the epoch, for a span begun before it was known
        to be worth making.
        """
        ...

    def inject(self, carrier: dict[str, Any]) -> None:
        """Writes the current trace context into `carrier` (`traceparent`, `tracestate`)."""
        ...

    def http_transport(self, transport: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
        """`transport` with a client span per request and the context in its headers."""
        ...

    def shutdown(self) -> None:
        """Sends the spans still buffered (at shutdown)."""
        ...


class _NoSpan:
    """A span that records nothing, reused for every block."""

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        pass

    def set_error(self, description: str) -> None:
        pass


_NO_SPAN = _NoSpan()


class NoTracing:
    """Tracing off: every call does nothing."""

    enabled = False

    def span(
        self,
        name: str,
        *,
        kind: SpanKind = "internal",
        attributes: Mapping[str, AttributeValue] | None = None,
        parent: Mapping[str, Any] | None = None,
        start_time: int | None = None,
    ) -> AbstractContextManager[Span]:
        return _NO_SPAN

    def inject(self, carrier: dict[str, Any]) -> None:
        pass

    def http_transport(self, transport: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
        return transport

    def shutdown(self) -> None:
        pass


OFF: Tracing = NoTracing()


def wanted(settings: Settings, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether tracing is on: TRACING when set, else whether an OTEL_* trigger is set
    (and the SDK is not disabled with OTEL_SDK_DISABLED=true)."""
    if settings.tracing is not None:
        return settings.tracing
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(name, "").strip() for name in TRIGGERS)


def open_tracing(settings: Settings, environ: Mapping[str, str] = os.environ) -> Tracing:
    """`OFF`, or tracing configured from the OTEL_* variables.

    TRACING=true without the `otel` extra is a ConfigError; tracing asked for by an
    OTEL_* variable alone is a warning, and off.
    """
    if not wanted(settings, environ):
        return OFF
    try:
        from app import otel
    except ImportError as error:
        hint = "install the otel extra: pip install 'queue-worker[otel]'"
        if settings.tracing:
            raise ConfigError(
                f"TRACING: OpenTelemetry is not installed ({error.name}); {hint}"
            ) from None
        log.warning("tracing is off: OpenTelemetry is not installed", extra={"hint": hint})
        return OFF
    return otel.OtelTracing.from_environment(environ)


def context_of(headers: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The trace context a message's pgmq headers carry, or None."""
    if not headers:
        return None
    found = {k: v for k in CONTEXT_HEADERS if isinstance(v := headers.get(k), str)}
    return found if "traceparent" in found else None


def messaging(queue: str, operation: str) -> dict[str, AttributeValue]:
    """OpenTelemetry's messaging attributes of a span about `queue` (send, receive, ...)."""
    return {
        "messaging.system": "pgmq",
        "messaging.destination.name": queue,
        "messaging.operation.type": operation,
    }
