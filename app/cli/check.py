"""`queue-worker check`: the preflight, one line per check with OK or the fix.

Exit code 0 only when every check passes (N/A counts as passing: a check that does
not apply to this mode); 1 when any fails; 2 when the settings themselves are not
valid (nothing else can be checked then).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from app.cli.common import FAILURE, OK, USAGE, Verbs, add_json_flag, emit_json, opened, say

if TYPE_CHECKING:
    from app.config import Settings
    from app.preflight import Result

LABELS = {"ok": "OK", "fail": "FAIL", "skip": "SKIP", "n/a": "N/A"}


def register(verbs: Verbs) -> None:
    parser = verbs.add_parser(
        "check",
        help="preflight: settings, database, migrations, Vault, triggers, pg_net, SMTP "
        "(when a served queue sends mail)",
        description="Checks everything the service needs before it can run here, one line "
        "per check with OK or the fix. Exit code 0 only when all pass.",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give each remote check at most this long (default 30)",
    )
    add_json_flag(parser)
    parser.set_defaults(run=run)


def _mode(settings: Settings) -> str:
    if settings.local_mode:
        return "local mode (embedded PostgreSQL)"
    if settings.database_url is not None:
        return "direct SQL (DATABASE_URL)"
    return "Supabase RPC (SUPABASE_URL)"


def _print(results: list[Result], as_json: bool) -> int:
    passed = all(result.passed for result in results)
    if as_json:
        emit_json({"ok": passed, "checks": [result.as_dict() for result in results]})
    else:
        width = max(len(result.name) for result in results)
        for result in results:
            line = f"{LABELS[result.status]:<4}  {result.name:<{width}}  {result.detail}"
            if result.fix:
                line += f". Fix: {result.fix}"
            say(line)
    return OK if passed else FAILURE


def run(args: argparse.Namespace) -> int:
    from app import preflight
    from app.config import ConfigError, load_settings
    from app.local import LocalModeError
    from app.logs import configure
    from app.main import serving_plan

    overrides = {"_env_file": args.env_file} if args.env_file is not None else {}
    try:
        settings = load_settings(**overrides)
        plan = serving_plan(settings)
    except ConfigError as error:
        failure = preflight.failed(
            "settings", str(error), "set the variables it names (.env.example lists them)"
        )
        _print([failure], args.json)
        return USAGE
    configure("ERROR", "text")
    queues = plan.names
    results = [preflight.ok("settings", f"{_mode(settings)}; queues {', '.join(queues)}")]

    async def go() -> list[Result]:
        async with opened(settings) as service:
            return await preflight.run(
                settings,
                service.rpc,
                service.mailer,
                queues,
                mail_queues=plan.mail_queues,
                timeout=args.timeout,
            )

    try:
        results.extend(asyncio.run(go()))
    except LocalModeError as error:
        results.append(preflight.failed("database", str(error)))
    except ConfigError as error:  # queues.toml: a processor's factory refused to start
        _print([preflight.failed("settings", str(error))], args.json)
        return USAGE
    return _print(results, args.json)
