# syntax=docker/dockerfile:1
# queue-worker image: uv builds a virtualenv in the first stage; the runtime stage copies only
# that venv onto a clean slim Python, runs it as an unprivileged user and has no build tools.
#
#   docker build -t queue-worker .
#   docker run --env-file .env -p 8000:8000 --stop-timeout 30 queue-worker
#
# Versions are build arguments so they can be bumped without editing this file. The venv's
# interpreter is the base image's /usr/local/bin/python3.11, so both stages use the same base.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_VERSION=0.13.9

# uv's image only ships the static binaries; a named stage lets the tag come from an ARG.
FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
# Byte-compile at install (the runtime cannot write into the venv), copy files out of uv's
# cache instead of hard-linking them, and use the base image's Python, never a download.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
# Dependencies first, from the lock alone, so a code change does not reinstall them.
# --locked fails the build when uv.lock does not match pyproject.toml.
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-dev --no-install-project
# Then the project itself, as a regular (non-editable) install: the runtime stage has no
# /src. README.md is read by the build backend (pyproject `readme`); the migrations are
# built into the package as app/migrations/ (pyproject `force-include`), so the image
# can run `queue-worker migrate` and `queue-worker check` with no checkout.
COPY README.md ./
COPY supabase/migrations ./supabase/migrations
COPY app ./app
RUN uv sync --locked --no-dev --no-editable

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="queue-worker" \
      org.opencontainers.image.description="Processes Supabase pgmq queues fed by Database Webhooks and pg_net"
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin worker
# Owned by root: the service can read and run its code, not change it.
COPY --from=build /opt/venv /opt/venv
# One process serves HTTP and runs the jobs, so prometheus_client needs no
# PROMETHEUS_MULTIPROC_DIR. HOST/PORT are the service's own defaults, made explicit here.
# QUEUE_WORKER_MODE=supabase: the image never falls back to local mode (it has no
# embedded PostgreSQL); a missing SUPABASE_URL is a start-up error that names it.
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    QUEUE_WORKER_MODE=supabase \
    HOST=0.0.0.0 \
    PORT=8000
# The service reads an optional .env from its working directory; none is in the image.
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# Liveness only (no remote calls): any non-2xx answer or no answer makes urlopen raise.
# The image has no curl; the venv's Python does the request.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=3)"]
# SIGTERM drains: no new work, running jobs get SHUTDOWN_GRACE_SECONDS (20 s), exit 0.
# Give `docker stop` more than that: --stop-timeout 30 (Docker's default is 10 s).
STOPSIGNAL SIGTERM
CMD ["queue-worker"]
