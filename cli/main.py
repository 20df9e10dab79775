"""The `tokenpool` command line.

Each subcommand lives in its own module with `add_parser(subcommands)`, which sets `func`
(args -> exit code). Exit codes (DESIGN §6): 0 on success; 2 for bad arguments, whether
argparse finds them or the run does (a bad config, an unknown model, an invalid request or
an unusable checkpoint), with a one-line `tokenpool: error: ...` on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from tokenpool.cli import _args, bench, fleet, generate, serve, simulate

PROG = "tokenpool"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

COMMANDS = (serve, generate, fleet, bench, simulate)

DESCRIPTION = """\
tokenpool serves many LLMs from a few accelerators by pooling them at token granularity.
Run `tokenpool COMMAND --help` for the options of a command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=_args.HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)  # exits 2 with a usage message on bad arguments
    args.argv = argv
    try:
        return args.func(args) or EXIT_OK
    except _usage_errors() as exc:
        return _fail(exc, EXIT_USAGE)
    except _tokenpool_error() as exc:
        return _fail(exc, EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # stdout closed early, e.g. `tokenpool generate ... | head -c 10`
        _silence_stdout()
        return EXIT_FAILED


def _usage_errors() -> tuple[type[Exception], ...]:
    from tokenpool.errors import (CheckpointError, ConfigError, InvalidRequestError,
                                  UnknownModelError)

    return ConfigError, UnknownModelError, InvalidRequestError, CheckpointError


def _tokenpool_error() -> type[Exception]:
    from tokenpool.errors import TokenpoolError

    return TokenpoolError


def _fail(error: Exception | str, code: int) -> int:
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokenpool")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
