"""`tokenpool bench overload`: a fresh server at a multiple of its sustainable rate, then at
that rate again (bench/overload.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenpool.cli import _args

DESCRIPTION = """\
Drive a fresh `tokenpool serve --config FILE --scheduler NAME` past capacity and back. For
--duration seconds the fleet's `bench:` workload arrives at --factor x --rate (requests per
second over the fleet; --rate is the sustainable rate, from `bench sweep`); for --recovery
seconds after that, at --rate. Reports per phase what was shed (429), failed and served, the
SLO attainment of the accepted requests, and the server's resident memory (its whole
process tree) with its slope; then the KV pages still held (0 when nothing leaked)."""


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("overload", help="past capacity and back, on a fresh server",
                         description=DESCRIPTION, formatter_class=_args.HelpFormatter)
    _args.add_config(p)
    p.add_argument("--scheduler", default="token-level", help="scheduler name")
    p.add_argument("--rate", metavar="R", type=float, required=True,
                   help="the sustainable rate in req/s over the fleet")
    p.add_argument("--factor", metavar="X", type=float, default=5.0,
                   help="overload multiple of --rate (default: 5)")
    p.add_argument("--duration", metavar="S", type=float, default=60.0,
                   help="seconds of overload (default: 60)")
    p.add_argument("--recovery", metavar="S", type=float, default=30.0,
                   help="seconds at --rate after the overload (default: 30)")
    p.add_argument("--log", metavar="FILE", type=Path, help="keep the server's stderr here")
    _args.add_json_out(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from tokenpool.bench import overload, report
    from tokenpool.errors import ConfigError
    from tokenpool.fleet import load_fleet
    from tokenpool.schedulers.registry import SCHEDULERS

    fleet = load_fleet(args.config)
    if fleet.bench is None:
        raise ConfigError(f"{args.config}: no bench: block (workload) to drive")
    if args.scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler: unknown {args.scheduler!r} (expected one of "
                          f"{', '.join(SCHEDULERS)})")
    if min(args.rate, args.factor, args.duration, args.recovery) <= 0:
        raise ConfigError("--rate, --factor, --duration and --recovery must be positive")
    result = overload.run(str(args.config), fleet, args.scheduler, args.rate, args.factor,
                          args.duration, args.recovery, args.log)
    result["command"] = _args.command_line(args)
    report.write_json(args.json, result)
    sys.stdout.write(overload.table(result))
    return 0
