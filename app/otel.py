"""OpenTelemetry behind app/tracing.py's `Tracing`: imported only when tracing is on.

Configured from OpenTelemetry's standard variables, as the SDK reads them:

- OTEL_TRACES_EXPORTER: `otlp` (the default), `console` or `none` (comma-separated);
- OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL: `http/protobuf` (the default) or `grpc`; the
  exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT itself;
- OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (service.name is `queue-worker` when
  neither names one), OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_* (the batch processor).

The provider is the service's own, not OpenTelemetry's global one: each app (the
tests start several in one process) has its own, shut down with it. Context travels
as W3C Trace Context, in pgmq headers and in the headers of outgoing HTTP requests.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from app import __version__
from app.config import ConfigError
from app.tracing import AttributeValue, context_of
from app.tracing import SpanKind as Kind

_KINDS: dict[Kind, SpanKind] = {
    "internal": SpanKind.INTERNAL,
    "server": SpanKind.SERVER,
    "client": SpanKind.CLIENT,
    "producer": SpanKind.PRODUCER,
    "consumer": SpanKind.CONSUMER,
}


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    exporters: list[SpanExporter] = []
    for name in filter(None, names):
        if name == "none":
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
            continue
        if name != "otlp":
            raise ConfigError(f"OTEL_TRACES_EXPORTER: {name!r} is not one of otlp, console, none")
        protocol = environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ).strip()
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            exporters.append(GrpcSpanExporter())
        else:
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not http/protobuf or grpc"
            )
    return exporters


class _Handle:
    """app/tracing.py's `Span` over an OpenTelemetry span."""

    __slots__ = ("_span",)

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)

    def set_error(self, description: str) -> None:
        self._span.set_status(Status(StatusCode.ERROR, description))


class OtelTracing:
    """Spans through a TracerProvider of the service's own."""

    enabled = True

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("queue-worker", __version__)
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> OtelTracing:
        resource = Resource.create({SERVICE_VERSION: __version__})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "queue-worker"}))
        provider = TracerProvider(resource=resource)
        for exporter in _exporters(environ):
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def span(
        self,
        name: str,
        *,
        kind: Kind = "internal",
        attributes: Mapping[str, AttributeValue] | None = None,
        parent: Mapping[str, Any] | None = None,
        start_time: int | None = None,
    ) -> AbstractContextManager[_Handle]:
        return self._span(name, kind, attributes, parent, start_time)

    @contextmanager
    def _span(
        self,
        name: str,
        kind: Kind,
        attributes: Mapping[str, AttributeValue] | None,
        parent: Mapping[str, Any] | None,
        start_time: int | None,
    ) -> Iterator[_Handle]:
        context = None
        links = None
        carried = context_of(parent)
        if carried is not None:
            extracted = self._propagator.extract(carried)
            if trace.get_current_span(extracted).get_span_context().is_valid:
                context = extracted
                # The span that claimed it here (a webhook, a read) stays reachable.
                here = trace.get_current_span().get_span_context()
                if here.is_valid:
                    links = [Link(here)]
        with self._tracer.start_as_current_span(
            name,
            context=context,
            kind=_KINDS[kind],
            attributes=attributes,
            links=links,
            start_time=start_time,
        ) as span:
            yield _Handle(span)

    def inject(self, carrier: dict[str, Any]) -> None:
        self._propagator.inject(carrier)

    def http_transport(self, transport: httpx.AsyncBaseTransport) -> httpx.AsyncBaseTransport:
        return _TracedTransport(transport, self)

    def shutdown(self) -> None:
        self.provider.shutdown()


class _TracedTransport(httpx.AsyncBaseTransport):
    """A client span per request (until the answer's headers), its context sent along."""

    def __init__(self, inner: httpx.AsyncBaseTransport, tracing: OtelTracing) -> None:
        self._inner = inner
        self._tracing = tracing

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        attributes: dict[str, AttributeValue] = {
            "http.request.method": request.method,
            "server.address": url.host,
            "server.port": url.port or (443 if url.scheme == "https" else 80),
            # Without the query string, which may carry a key.
            "url.full": f"{url.scheme}://{url.netloc.decode()}{url.path}",
        }
        with self._tracing.span(request.method, kind="client", attributes=attributes) as span:
            carrier: dict[str, Any] = {}
            self._tracing.inject(carrier)
            for key, value in carrier.items():
                request.headers[key] = value
            response = await self._inner.handle_async_request(request)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 400:
                span.set_error(f"HTTP {response.status_code}")
            return response

    async def aclose(self) -> None:
        await self._inner.aclose()
