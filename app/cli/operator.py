"""Operator verbs: `queues`, `enqueue`, `dead`, `replay`, `purge`, `pause` and `resume`.

Each opens the backend the service opens (Supabase RPC, DATABASE_URL or local
mode) and calls the same operation the manual HTTP API calls (app/operations.py);
none re-implements one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from app import job_input, operations
from app.cli.common import (
    FAILURE,
    OK,
    USAGE,
    Exit,
    Opened,
    Verbs,
    add_json_flag,
    emit_json,
    fail,
    opened,
    say,
    settings,
    table,
)
from app.operations import DEFAULT_PAGE, MAX_DELAY_SECONDS, MAX_PAGE
from app.queue.backend import ArchivedMessage, DeadAction
from app.queue.models import MAX_MSG_ID

if TYPE_CHECKING:
    from app.config import Settings

T = TypeVar("T")
# Error texts in the dead-letter table are cut to this many characters (--json has all).
ERROR_WIDTH = 100


def register(verbs: Verbs) -> None:
    queues = verbs.add_parser(
        "queues",
        help="depth of each served queue",
        description="Length, visible length and oldest message age of each queue this "
        "service serves (what GET /queues shows, without the jobs in flight).",
    )
    add_json_flag(queues)
    queues.set_defaults(run=run_queues)

    enqueue = verbs.add_parser(
        "enqueue",
        help="validate a job as its processor does and enqueue it",
        description="Validates a job exactly as the manual API does (the queue's "
        "processor) and enqueues it. The job is JSON text, @FILE, or - for stdin.",
    )
    enqueue.add_argument("queue")
    enqueue.add_argument("job", metavar="JSON|@FILE|-", help="the job body: a JSON object")
    enqueue.add_argument(
        "--delay",
        type=bounded_int(0, MAX_DELAY_SECONDS),
        default=0,
        metavar="SECONDS",
        help=f"run it no sooner than this (0 to {MAX_DELAY_SECONDS})",
    )
    enqueue.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="a later job with the same key, after this one succeeded, is not run "
        "(the manual API's Idempotency-Key)",
    )
    add_json_flag(enqueue)
    enqueue.set_defaults(run=run_enqueue)

    dead = verbs.add_parser(
        "dead",
        help="list dead letters (archived jobs) with their errors",
        description="Archived (dead) jobs of a queue, newest first, with the error that "
        "ended each. Pages with --before, the cursor the previous page printed.",
    )
    dead.add_argument("queue")
    dead.add_argument("--limit", type=bounded_int(1, MAX_PAGE), default=DEFAULT_PAGE, metavar="N")
    dead.add_argument(
        "--before",
        type=bounded_int(1, MAX_MSG_ID),
        metavar="MSG_ID",
        help="only messages older than this one",
    )
    add_json_flag(dead)
    dead.set_defaults(run=run_dead)

    replay = verbs.add_parser(
        "replay",
        help="put dead letters back on their queue",
        description="Moves one archived job (MSG_ID), or every one that matches the "
        "filters, back onto its queue as a new message with its headers. Bulk replays "
        "go 1,000 archived rows per transaction.",
    )
    replay.add_argument("queue")
    replay.add_argument("msg_id", type=bounded_int(1, MAX_MSG_ID), nargs="?")
    _add_filters(replay, "replay")
    add_json_flag(replay)
    replay.set_defaults(run=run_replay)

    purge = verbs.add_parser(
        "purge",
        help="delete the dead letters that match",
        description="Deletes the archived jobs of a queue that match the filters, "
        "1,000 archived rows per transaction. No filter needs --all.",
    )
    purge.add_argument("queue")
    _add_filters(purge, "purge")
    add_json_flag(purge)
    purge.set_defaults(run=run_purge)

    for verb, text in (
        ("pause", "stop every replica claiming from a queue (messages wait)"),
        ("resume", "let a paused queue run again"),
    ):
        parser = verbs.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        parser.add_argument("queue")
        add_json_flag(parser)
        parser.set_defaults(run=run_pause if verb == "pause" else run_resume)


def _add_filters(parser: argparse.ArgumentParser, action: str) -> None:
    parser.add_argument("--error", metavar="TEXT", help="text found in the error, any case")
    parser.add_argument(
        "--since", type=_aware_time, metavar="TIME", help="archived at or after (ISO 8601, zone)"
    )
    parser.add_argument(
        "--until", type=_aware_time, metavar="TIME", help="archived before (ISO 8601, zone)"
    )
    parser.add_argument(
        "--all", action="store_true", help=f"with no filter: {action} every dead letter"
    )


def _aware_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "must be an ISO 8601 time, e.g. 2026-12-02T01:00Z"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError("give a time zone, e.g. 2026-12-02T01:00Z")
    return value


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a decimal integer from `low` to `high` (few digits, no signs games)."""

    def parse(text: str) -> int:
        if not text.isascii() or not text.isdigit() or len(text) > len(str(high)):
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}")
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}")
        return value

    return parse


def _call(args: argparse.Namespace, operation: Callable[[Opened], Awaitable[T]]) -> T:
    config = settings(args)
    return run_operation(config, operation)


def run_operation(config: Settings, operation: Callable[[Opened], Awaitable[T]]) -> T:
    from app.config import ConfigError
    from app.local import LocalModeError
    from app.logs import configure
    from app.queue.rpc import RpcError

    configure("WARNING", "text")

    async def go() -> T:
        async with opened(config) as service:
            return await operation(service)

    try:
        return asyncio.run(go())
    except operations.OperationError as error:
        raise fail(error.message) from None
    except RpcError as error:
        raise fail(f"the queue database call failed: {error}") from None
    except LocalModeError as error:
        raise fail(str(error)) from None
    except ConfigError as error:  # queues.toml: a processor's factory refused to start
        raise fail(str(error), USAGE) from None


def run_queues(args: argparse.Namespace) -> int:
    rows = _call(args, lambda s: operations.depths(s.backend, s.processors))
    if args.json:
        emit_json({"queues": [row.as_dict() for row in rows]})
        return OK
    lines = table(
        ("queue", "length", "visible", "oldest_s", "state"),
        [(r.queue, r.length, r.visible, r.oldest_age_seconds, _state(r.paused)) for r in rows],
    )
    for line in lines:
        say(line)
    return OK


def _state(paused: bool) -> str:
    return "paused" if paused else "running"


def read_job(source: str, max_bytes: int) -> Any:
    """The job argument as JSON: text, `@file` or `-` (stdin), at most `max_bytes`."""
    if source == "-":
        raw = sys.stdin.buffer.read(max_bytes + 1)
        where = "stdin"
    elif source.startswith("@"):
        path = Path(source[1:])
        where = str(path)
        try:
            with path.open("rb") as file:
                raw = file.read(max_bytes + 1)
        except OSError as error:
            raise Exit(USAGE, f"job: cannot read {where}: {error.strerror}") from None
    else:
        raw = source.encode("utf-8", errors="surrogateescape")
        where = "the argument"
    if len(raw) > max_bytes:
        raise Exit(USAGE, f"job: {where} is larger than {max_bytes} bytes (MAX_API_BODY_BYTES)")
    try:
        return job_input.loads(raw.decode("utf-8"))
    except job_input.Refused as error:
        raise Exit(FAILURE, str(error)) from None
    except UnicodeDecodeError:
        raise Exit(USAGE, f"job: {where} is not UTF-8") from None
    except json.JSONDecodeError as error:
        raise Exit(
            USAGE,
            f"job: {where} is not JSON ({error.msg} at line {error.lineno} col {error.colno})",
        ) from None
    except RecursionError:
        raise Exit(USAGE, f"job: {where} is nested too deeply") from None


def run_enqueue(args: argparse.Namespace) -> int:
    config = settings(args)
    job = read_job(args.job, config.max_api_body_bytes)
    msg_id = run_operation(
        config,
        lambda s: operations.enqueue(
            s.backend,
            s.processors,
            args.queue,
            job,
            args.delay,
            idempotency_key=args.idempotency_key,
        ),
    )
    if args.json:
        emit_json({"queue": args.queue, "msg_id": msg_id})
    else:
        say(f"enqueued {args.queue} msg_id {msg_id}")
    return OK


def _one_line(message: ArchivedMessage) -> str:
    text = " ".join(message.reason.split())
    return text if len(text) <= ERROR_WIDTH else text[: ERROR_WIDTH - 1] + "…"


def run_dead(args: argparse.Namespace) -> int:
    page = _call(
        args,
        lambda s: operations.dead_letters(
            s.backend, s.processors, args.queue, args.limit, args.before
        ),
    )
    if args.json:
        emit_json(page.as_dict())
        return OK
    if not page.messages:
        say(f"no dead letters in {args.queue}" + (f" before {args.before}" if args.before else ""))
        return OK
    rows = [
        (
            m.msg_id,
            m.read_ct,
            m.archived_at.isoformat(timespec="seconds"),
            _one_line(m),
        )
        for m in page.messages
    ]
    for line in table(("msg_id", "attempts", "archived_at", "error"), rows):
        say(line)
    if page.next is not None:
        say(f"more: queue-worker dead {args.queue} --before {page.next} --limit {args.limit}")
    return OK


def _filtered(args: argparse.Namespace) -> bool:
    return bool(args.error or args.since or args.until or args.all)


def run_bulk(args: argparse.Namespace, action: DeadAction) -> int:
    config = settings(args)
    try:
        where = operations.dead_filter(args.error, args.since, args.until)
    except operations.OperationError as error:
        raise Exit(USAGE, error.message) from None
    done = run_operation(
        config,
        lambda s: operations.bulk_dead(
            s.backend, s.processors, args.queue, action, where, everything=args.all
        ),
    )
    if args.json:
        emit_json(done.as_dict())
    else:
        verb = "replayed" if action == "replay" else "purged"
        say(f"{verb} {done.affected} of {done.scanned} dead letters in {args.queue}")
    return OK


def run_purge(args: argparse.Namespace) -> int:
    return run_bulk(args, "purge")


def _pause(args: argparse.Namespace, paused: bool) -> int:
    changed = _call(
        args, lambda s: operations.set_paused(s.backend, s.processors, args.queue, paused)
    )
    if args.json:
        emit_json({"queue": args.queue, "paused": paused, "changed": changed})
    else:
        state = "paused" if paused else "running"
        say(f"{args.queue} is {state}" + ("" if changed else f" (it was {state} already)"))
    return OK


def run_pause(args: argparse.Namespace) -> int:
    return _pause(args, True)


def run_resume(args: argparse.Namespace) -> int:
    return _pause(args, False)


def run_replay(args: argparse.Namespace) -> int:
    if args.msg_id is None:
        return run_bulk(args, "replay")
    if _filtered(args):
        raise Exit(USAGE, "replay: give a MSG_ID or filters, not both")
    new_id = _call(
        args, lambda s: operations.replay(s.backend, s.processors, args.queue, args.msg_id)
    )
    if args.json:
        emit_json({"queue": args.queue, "replayed": args.msg_id, "msg_id": new_id})
    else:
        say(f"replayed {args.queue} msg_id {args.msg_id} as msg_id {new_id}")
    return OK
