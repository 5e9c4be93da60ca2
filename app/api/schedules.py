"""The manual API's schedules: list, set and remove jobs that pg_cron enqueues on a schedule.

Thin routes over app/queue/schedules.py (the CLI calls the same functions). Mounted
with the manual API, under the same `Authorization: Bearer <API_TOKEN>`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from app import operations
from app.api.deps import BearerSecret, Services, get_services
from app.api.errors import ApiError
from app.queue import schedules
from app.queue.schedules import CronUnavailable, ScheduleError

router = APIRouter(
    prefix="/schedules", tags=["schedules"], dependencies=[Depends(BearerSecret("api_token"))]
)

ServicesDep = Annotated[Services, Depends(get_services)]
ScheduleName = Annotated[str, Path(pattern=schedules.NAME_PATTERN)]


class ScheduleIn(BaseModel):
    """A schedule's definition: `job` is enqueued into `queue` on `cron`."""

    model_config = ConfigDict(extra="forbid")

    cron: str = Field(min_length=1, max_length=schedules.MAX_CRON_LENGTH)
    queue: str = Field(pattern=r"^[a-z0-9_]{1,47}$")
    job: dict[str, Any]


def _refused(error: ScheduleError) -> ApiError:
    text = f"{error.message}. {error.hint}" if error.hint else error.message
    if isinstance(error, CronUnavailable):
        return ApiError(409, "cron_unavailable", text)
    return ApiError(422, "invalid_schedule", text)


@router.get("")
async def list_schedules(services: ServicesDep) -> dict[str, Any]:
    """Every schedule with its last run, and pg_cron's state and time zone."""
    status = await schedules.cron_status(services.rpc)
    rows = await schedules.list_schedules(services.rpc)
    return {
        "cron": status.model_dump(mode="json"),
        "schedules": [row.model_dump(mode="json") for row in rows],
    }


@router.get("/{name}")
async def get_schedule(name: ScheduleName, services: ServicesDep) -> dict[str, Any]:
    """One schedule with its last run."""
    row = await schedules.get_schedule(services.rpc, name)
    if row is None:
        raise ApiError(404, "not_scheduled", f"no schedule named {name!r}")
    return row.model_dump(mode="json")


@router.put("/{name}")
async def set_schedule(
    name: ScheduleName, services: ServicesDep, schedule: Annotated[ScheduleIn, Body()]
) -> dict[str, Any]:
    """Creates or replaces a schedule. Its job is checked as an enqueued job is (its
    bounds, and its processor when this service processes the queue), so a schedule
    can never enqueue a job that could not succeed."""
    try:
        row = await operations.set_schedule(
            services.rpc, services.processors, name, schedule.cron, schedule.queue, schedule.job
        )
    except operations.OperationError as error:
        raise ApiError(error.status, error.code, error.message) from None
    except ScheduleError as error:
        raise _refused(error) from None
    return row.model_dump(mode="json")


@router.delete("/{name}", status_code=204)
async def remove_schedule(name: ScheduleName, services: ServicesDep) -> Response:
    """Removes a schedule and its pg_cron job."""
    try:
        removed = await schedules.remove_schedule(services.rpc, name)
    except ScheduleError as error:
        raise _refused(error) from None
    if not removed:
        raise ApiError(404, "not_scheduled", f"no schedule named {name!r}")
    return Response(status_code=204)
