"""Every Prometheus metric of the service, in one place.

Labels are low-cardinality only (queue, outcome, result): never message ids or
addresses. The worker records job metrics; the API records webhook metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

WEBHOOKS = Counter(
    "queue_worker_webhooks_total",
    "Webhook requests received, by queue and result.",
    ["queue", "result"],
)
JOBS = Counter(
    "queue_worker_jobs_total",
    "Jobs finished, by queue and outcome.",
    ["queue", "outcome"],
)
JOB_DURATION = Histogram(
    "queue_worker_job_duration_seconds",
    "Time from claim to outcome of one job.",
    ["queue"],
)
RPC_ERRORS = Counter(
    "queue_worker_rpc_errors_total",
    "Supabase RPC calls that failed, by function.",
    ["function"],
)
