"""`tokenpool bench chat|chunked`: prefix caching on a multi-turn chat, and what chunked
prefill does for streams decoding beside a long prompt (bench/chat_bench.py,
bench/chunked_bench.py)."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

from tokenpool.cli import _args

CHAT_DESCRIPTION = """\
A multi-turn chat over fresh `tokenpool serve` processes of the fleet, run twice on the same
workload: engine.prefix_caching on, then off. Session s talks to model s mod M (default: the
fleet's SmolLM2 aliases); every model has its own system prompt of about --system-tokens
tokens, and turn t sends it, the session's earlier turns (with the answers the server gave)
and a new user message, through the official openai client (chat completions, streamed,
include_usage, temperature 0, --max-tokens). Sessions are closed loop: --concurrency of them
at once, each sending its next turn when the last answer has ended.

Reports per run TTFT p50/p90 over every turn, over the turns that hit the cache
(usage.prompt_tokens_details.cached_tokens > 0), over first and later turns, and cached /
prompt tokens; then ttft_p50_ratio_hits: TTFT p50 of the turns that hit with caching on over
the same turns' TTFT p50 with caching off (target: 5x lower, a ratio <= 0.2).

With --rates, open loop instead (bench/chat_sweep.py): at each rate, sessions start as a
seeded Poisson process of that many sessions per second for --duration seconds, each running
its turns back to back, on a fresh server per rate and setting; a point ends when its
sessions have ended or --grace seconds after the last start. Per point: turns sent,
finished, errors, SLO attainment and the sustainable rate as `bench sweep` defines them
(every turn a request, the fleet's TTFT and TBT SLOs), TTFT p50/p90, cached / prompt tokens,
turns per second."""

CHAT_EPILOG = """\
examples:
  tokenpool bench chat --json chat.json
  tokenpool bench chat --sessions 12 --turns 4 --concurrency 4 --json chat.json
  tokenpool bench chat --models smollm2-135m-instruct,smollm2-135m-code --sessions 4 \\
      --turns 3 --json chat.json
  tokenpool bench chat --rates 0.1,0.2,0.3,0.4 --duration 40 --turns 3 --json chat-rates.json"""

CHUNKED_DESCRIPTION = """\
A long prompt arriving while --streams streams decode, on one worker of the fleet in this
process, driven through its JobRunner: (same_model) a Prefill unit of model A's
--prompt-tokens prompt with A's streams riding it, and (other_model) model B's prompt of the
same length between two decode turns of A (Switch B, Prefill, Switch A). Runs chunked prefill
on (engine.max_num_batched_tokens = --budget) and off (the budget raised to fit the prompt
and the streams in one step), same weights, and reports the streams' inter-token gaps (p50,
p99, max) in the window the long prompt is computed in, against A's TBT SLO."""

CHUNKED_EPILOG = """\
examples:
  tokenpool bench chunked --json chunked.json
  tokenpool bench chunked --prompt-tokens 4000 --streams 16 --budget 256 --json chunked.json"""


def add_parsers(kinds: argparse._SubParsersAction) -> None:
    _add_chat(kinds)
    _add_chunked(kinds)


def _add_chat(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("chat", help="multi-turn chat TTFT, prefix caching on against off",
                         description=CHAT_DESCRIPTION, epilog=CHAT_EPILOG,
                         formatter_class=_args.HelpFormatter)
    _args.add_config(p)
    p.add_argument("--models", metavar="A,B,...", default=None,
                   help="model ids the sessions go to, round robin (default: the fleet's "
                        "SmolLM2 aliases, else all of its models)")
    p.add_argument("--scheduler", default=None, help="scheduler name (default: the fleet's)")
    for flag, default, what in (("--sessions", 12, "chat sessions"),
                                ("--turns", 4, "turns per session"),
                                ("--concurrency", 4, "sessions running at once"),
                                ("--system-tokens", 1000, "tokens of each model's system prompt "
                                                          "(about)"),
                                ("--user-tokens", 40, "tokens of each user message (about)"),
                                ("--max-tokens", 32, "max_tokens of each turn")):
        p.add_argument(flag, metavar="N", type=_args.positive_int, default=default,
                       help=f"{what} (default: {default})")
    p.add_argument("--seed", metavar="N", type=_args.any_int, default=0,
                   help="seed of the texts (default: 0)")
    p.add_argument("--shed", action="store_true",
                   help="keep the fleet's admission control (default: both servers admit "
                        "every turn, so both runs serve the same workload)")
    p.add_argument("--log-dir", metavar="DIR", type=Path,
                   help="keep each server's stderr here")
    _add_rates(p)
    _args.add_json_out(p)
    p.set_defaults(func=_run_chat)


def _add_rates(p: argparse.ArgumentParser) -> None:
    from tokenpool.cli.bench_serve import _floats

    p.add_argument("--rates", metavar="R1,R2,...", type=_args.checked(_floats, "rates"),
                   help="open loop: sessions started per second, one point per rate and "
                        "setting (--sessions and --concurrency then unused)")
    for flag, default, what in (("--duration", 40.0, "seconds sessions start for"),
                                ("--grace", 60.0, "seconds a point then waits at most")):
        p.add_argument(flag, metavar="S", type=_args.non_negative_float, default=default,
                       help=f"with --rates: {what} (default: {default:g})")


def _run_chat(args: argparse.Namespace) -> int:
    from tokenpool.bench import chat_bench, report
    from tokenpool.bench.chat_workload import ChatPlan
    from tokenpool.errors import ConfigError
    from tokenpool.fleet import load_fleet
    from tokenpool.schedulers.registry import SCHEDULERS

    fleet = load_fleet(args.config)
    models = tuple(args.models.split(",")) if args.models else chat_bench.default_models(fleet)
    for model_id in models:
        fleet.model(model_id)  # an unknown id is an error here, not in the server
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler: unknown {args.scheduler!r} (expected one of "
                          f"{', '.join(SCHEDULERS)})")
    plan = ChatPlan(models, args.sessions, args.turns, args.system_tokens, args.user_tokens,
                    args.max_tokens, args.concurrency, args.seed)
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    with _sigterm_interrupts():  # so that `timeout` still stops the servers (own sessions)
        result, table = _chat(args, fleet, plan)
    result["command"] = _args.command_line(args)
    report.write_json(args.json, result)
    sys.stdout.write(table(result))
    return 0


def _chat(args: argparse.Namespace, fleet, plan):
    from tokenpool.bench import chat_bench, chat_sweep

    if not args.rates:
        return (chat_bench.run(args.config, fleet, plan, args.scheduler, args.log_dir,
                               args.shed), chat_bench.table)
    rates = chat_sweep.RatePlan(tuple(args.rates), args.duration, args.grace)
    return (chat_sweep.run(args.config, fleet, plan, rates, args.scheduler, args.log_dir,
                           args.shed), chat_sweep.table)


@contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt meanwhile, so `finally` blocks run."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _add_chunked(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("chunked", help="stream gaps while a long prompt prefills, chunked "
                                         "prefill on against off",
                         description=CHUNKED_DESCRIPTION, epilog=CHUNKED_EPILOG,
                         formatter_class=_args.HelpFormatter)
    _args.add_config(p)
    p.add_argument("--models", metavar="A,B", default=None,
                   help="A: the streams' model; B: the other model (default: the first two "
                        "SmolLM2 aliases of the fleet, else its first two models)")
    for flag, default, what in (
            ("--prompt-tokens", 4000, "tokens of the long prompt (cut to the context)"),
            ("--streams", 16, "streams decoding"),
            ("--budget", 512, "max_num_batched_tokens with chunked prefill on"),
            ("--decode-steps", 16, "decode steps before each long prompt")):
        p.add_argument(flag, metavar="N", type=_args.positive_int, default=default,
                       help=f"{what} (default: {default})")
    p.add_argument("--threads", metavar="N", type=_args.positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", metavar="N", type=_args.any_int, default=0,
                   help="seed of the random prompts (default: 0)")
    _args.add_json_out(p)
    p.set_defaults(func=_run_chunked)


def _run_chunked(args: argparse.Namespace) -> int:
    import torch

    from tokenpool.bench import chat_bench, chunked_bench, report
    from tokenpool.errors import ConfigError
    from tokenpool.fleet import load_fleet

    fleet = load_fleet(args.config)
    ids = args.models.split(",") if args.models else list(chat_bench.default_models(fleet))
    if len(ids) < 2 or args.models and len(ids) != 2 or ids[0] == ids[1]:
        raise ConfigError(f"--models: expected two different model ids, got {args.models!r}")
    for model_id in ids:
        fleet.model(model_id)
    if args.budget <= args.streams:
        raise ConfigError(f"--budget ({args.budget}) must exceed --streams ({args.streams}): "
                          "the decodes take a token each of every step's budget")
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = chunked_bench.ChunkedPlan(ids[0], ids[1], args.prompt_tokens, args.streams,
                                     args.budget, decode_steps=args.decode_steps,
                                     seed=args.seed)
    with _sigterm_interrupts():  # so that `timeout` still removes its host cache files
        result = chunked_bench.run(fleet, plan)
    result["command"] = _args.command_line(args)
    report.write_json(args.json, result)
    sys.stdout.write(chunked_bench.table(result))
    return 0
