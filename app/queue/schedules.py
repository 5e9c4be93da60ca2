"""Jobs on a schedule: the worker's pg_cron functions, as plain calls for the API and the CLI.

The schedules live in the database (supabase/migrations/20261201006000_schedules.sql):
`queue_worker.schedule(name, cron, queue, job)` has pg_cron enqueue `job` into `queue` on
`cron` with `pgmq.send`, so webhooks and the sweeper take each run's job as any other,
and however many replicas of the worker run, each run is one job. These functions only
call them, through an `RpcCaller` (the Supabase RPC client or the direct SQL backend),
and turn the database's refusals into `InvalidSchedule` (a bad name, expression, queue
or job: its message names the mistake) or `CronUnavailable` (pg_cron is not enabled, or
not usable by the functions' owner). Any other failure stays an `RpcError`.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from app.queue.backend import RpcCaller
from app.queue.rpc import RpcError

# What `queue_worker.schedule` accepts; checked there too.
NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,47}$"
NAME: Final = re.compile(NAME_PATTERN)
MAX_CRON_LENGTH: Final = 100
MIGRATION: Final = "supabase/migrations/20261201006000_schedules.sql"


class ScheduleError(Exception):
    """The database refused a schedule call: its message, and its hint when it gave one."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class InvalidSchedule(ScheduleError):
    """A schedule's name, cron expression, queue or job is not acceptable."""


class CronUnavailable(ScheduleError):
    """pg_cron is not enabled in the database, or its owner may not use it."""


class CronStatus(BaseModel):
    """pg_cron as the schedule functions see it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: str | None = None  # None: the extension is not enabled
    usable: bool = False
    time_zone: str | None = None  # the zone cron expressions are read in (GMT by default)
    seconds: bool = False  # whether "N seconds" schedules exist (pg_cron >= 1.5)


class Schedule(BaseModel):
    """One schedule and what pg_cron last did with it."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    name: str
    cron: str
    queue: str = Field(validation_alias="queue_name")
    job: dict[str, Any]
    # None when the schedule has no pg_cron job (pg_cron not enabled, or the job removed).
    jobid: int | None = None
    active: bool | None = None
    last_status: str | None = None
    last_started_at: datetime | None = None
    last_finished_at: datetime | None = None
    last_message: str | None = None
    created_at: datetime
    updated_at: datetime


_SCHEDULES = TypeAdapter(list[Schedule])
_STATUSES = TypeAdapter(list[CronStatus])


def _refusal(error: RpcError) -> Exception:
    """The schedule error an RPC failure stands for, or the failure itself."""
    code = error.code or ""
    if code == "0A000":
        return CronUnavailable(error.message, error.hint)
    if error.status == 400 and (code.startswith("22") or code in ("P0001", "P0002")):
        return InvalidSchedule(error.message, error.hint)
    return error


async def _call(rpc: RpcCaller, function: str, args: dict[str, Any]) -> Any:
    try:
        return await rpc.call(function, args)
    except RpcError as error:
        raise _refusal(error) from None


async def cron_status(rpc: RpcCaller) -> CronStatus:
    """Whether pg_cron is enabled and usable, its version, time zone and seconds support."""
    rows = _STATUSES.validate_python(await _call(rpc, "cron_status", {}))
    return rows[0] if rows else CronStatus()


async def list_schedules(rpc: RpcCaller) -> list[Schedule]:
    """Every schedule, by name, with its pg_cron job and last run."""
    return _SCHEDULES.validate_python(await _call(rpc, "list_schedules", {}))


async def get_schedule(rpc: RpcCaller, name: str) -> Schedule | None:
    """The schedule called `name`, or None."""
    if not NAME.fullmatch(name):
        return None
    rows = _SCHEDULES.validate_python(await _call(rpc, "list_schedules", {"schedule_name": name}))
    return rows[0] if rows else None


async def set_schedule(
    rpc: RpcCaller, name: str, cron: str, queue: str, job: dict[str, Any]
) -> Schedule:
    """Creates or replaces the schedule `name`: enqueue `job` into `queue` on `cron`.

    `cron` is five fields (`0 9 * * 1`: Mondays at 09:00 in pg_cron's time zone), an
    `@daily`-style shorthand, or `N seconds` where pg_cron has them. Raises
    InvalidSchedule or CronUnavailable with the database's explanation.
    """
    await _call(rpc, "schedule", {"name": name, "cron": cron, "queue": queue, "job": job})
    schedule = await get_schedule(rpc, name)
    if schedule is None:  # removed in between by someone else
        raise InvalidSchedule(f"schedule {name!r} was removed while it was being set")
    return schedule


async def remove_schedule(rpc: RpcCaller, name: str) -> bool:
    """Removes the schedule `name` and its pg_cron job; False when there was none."""
    if not NAME.fullmatch(name):
        return False
    return bool(await _call(rpc, "unschedule", {"name": name}))
