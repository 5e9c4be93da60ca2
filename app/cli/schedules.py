"""`queue-worker schedules`: list, show, set and remove jobs that pg_cron enqueues.

The same calls as the manual API's /schedules (app/operations.py, app/queue/schedules.py),
over the service's own backend: a job is checked as an enqueued job is, and the
database checks the name, the cron expression and the queue.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from app import operations
from app.cli.common import OK, Opened, Verbs, add_json_flag, emit_json, fail, say, settings, table
from app.cli.operator import read_job, run_operation
from app.queue import schedules
from app.queue.schedules import CronStatus, Schedule, ScheduleError

T = TypeVar("T")


def register(verbs: Verbs) -> None:
    parser = verbs.add_parser(
        "schedules",
        help="list, show, set or remove jobs on a schedule (pg_cron)",
        description="Jobs that pg_cron enqueues on a schedule (Supabase Cron). With no "
        "action, lists them with their last run. Cron expressions are read in pg_cron's "
        "time zone: UTC (GMT) unless the database sets cron.timezone.",
    )
    add_json_flag(parser)
    parser.set_defaults(run=run_list)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", title="actions")

    listing = actions.add_parser("list", help="every schedule with its last run (the default)")
    add_json_flag(listing)
    listing.set_defaults(run=run_list)

    show = actions.add_parser("show", help="one schedule with its last run")
    show.add_argument("name")
    add_json_flag(show)
    show.set_defaults(run=run_show)

    put = actions.add_parser(
        "set",
        help="create or replace a schedule",
        description="Creates or replaces the schedule NAME: pg_cron enqueues JOB into QUEUE "
        "on CRON ('0 9 * * 1', '@hourly', or '30 seconds' where pg_cron has seconds).",
    )
    put.add_argument("name")
    put.add_argument("cron")
    put.add_argument("queue")
    put.add_argument("job", metavar="JSON|@FILE|-", help="the job body: a JSON object")
    add_json_flag(put)
    put.set_defaults(run=run_set)

    remove = actions.add_parser("remove", help="remove a schedule and its pg_cron job")
    remove.add_argument("name")
    add_json_flag(remove)
    remove.set_defaults(run=run_remove)


def _scheduled(args: argparse.Namespace, operation: Callable[[Opened], Awaitable[T]]) -> T:
    """Runs `operation`; the database's refusal of a schedule is one line and exit 1."""

    async def refusals_said(service: Opened) -> T:
        try:
            return await operation(service)
        except ScheduleError as error:
            text = f"{error.message}. {error.hint}" if error.hint else error.message
            raise operations.OperationError("invalid_schedule", text) from None

    return run_operation(settings(args), refusals_said)


def _row(schedule: Schedule) -> tuple[Any, ...]:
    started = schedule.last_started_at
    return (
        schedule.name,
        schedule.cron,
        schedule.queue,
        "yes" if schedule.active else "no",
        schedule.last_status,
        started.isoformat(timespec="seconds") if started else None,
    )


_HEADER = ("name", "cron", "queue", "active", "last_status", "last_started_at")


def _cron_line(status: CronStatus) -> str:
    if status.version is None:
        return "pg_cron: not enabled (Dashboard > Integrations > Cron, or create extension pg_cron)"
    zone = status.time_zone or "GMT"
    seconds = ", seconds schedules" if status.seconds else ""
    return f"pg_cron {status.version}: times in {zone}{seconds}"


def run_list(args: argparse.Namespace) -> int:
    async def both(service: Opened) -> tuple[CronStatus, list[Schedule]]:
        status = await schedules.cron_status(service.rpc)
        return status, await schedules.list_schedules(service.rpc)

    status, rows = _scheduled(args, both)
    if args.json:
        emit_json(
            {
                "cron": status.model_dump(mode="json"),
                "schedules": [row.model_dump(mode="json") for row in rows],
            }
        )
        return OK
    say(_cron_line(status))
    if not rows:
        say("no schedules")
        return OK
    for line in table(_HEADER, [_row(row) for row in rows]):
        say(line)
    return OK


def _print(schedule: Schedule, as_json: bool) -> None:
    if as_json:
        emit_json(schedule.model_dump(mode="json"))
        return
    for line in table(_HEADER, [_row(schedule)]):
        say(line)
    if schedule.last_message:
        say(f"last message: {schedule.last_message}")


def run_show(args: argparse.Namespace) -> int:
    row = _scheduled(args, lambda s: schedules.get_schedule(s.rpc, args.name))
    if row is None:
        raise fail(f"no schedule named {args.name!r}")
    _print(row, args.json)
    return OK


def run_set(args: argparse.Namespace) -> int:
    config = settings(args)
    job = read_job(args.job, config.max_api_body_bytes)
    row = _scheduled(
        args,
        lambda s: operations.set_schedule(
            s.rpc, s.processors, args.name, args.cron, args.queue, job
        ),
    )
    _print(row, args.json)
    return OK


def run_remove(args: argparse.Namespace) -> int:
    removed = _scheduled(args, lambda s: schedules.remove_schedule(s.rpc, args.name))
    if not removed:
        raise fail(f"no schedule named {args.name!r}")
    if args.json:
        emit_json({"removed": args.name})
    else:
        say(f"removed schedule {args.name}")
    return OK
