"""`tokenpool bench handoff`: KV handed from a prefill actor to a decode actor, with the
serving process in the data path or out of it (bench/handoff_bench.py)."""

from __future__ import annotations

import argparse
import sys

from tokenpool.cli import _args

HANDOFF_DESCRIPTION = """\
What handing a batch of prefilled requests to a decode worker costs, on Ray actors (a local
Ray cluster, or the fleet file's pool.ray_address), in both ways the pool can move the KV,
side by side in one run:
  driver   the prefill actor returns the KV arrays inside its JobDone; the serving process
           (the driver) receives them and sends them on with the decode job
  by_ref   the prefill actor puts each request's KV into the object store and returns only
           references; the decode actor reads the KV itself (gpu_pool/ray_handoff.py)

Two pools of two workers each (worker 0 prefill-only, worker 1 decode-only), over --model
alone. Each round prefills --requests random prompts of --prompt-tokens tokens on worker 0
(export_after_prefill), then sends worker 1 a job of SwapIn + a one-step Decode of them;
the modes take turns, round by round. Every round sends the same prompts, so after the first
the prefill worker finds them in its prefix cache and prefills in one short step (its export
still copies every page). Two warm-up rounds per mode (model switches, first touch of KV
pages and of the object store's) are not counted; then --repeats rounds per mode are.

A handoff is one round's batch of --requests requests. Per handoff:
  handoff_bytes   the batch's KV bytes (SequenceHandoff.nbytes summed: pages x page_bytes)
  handoff_s       from the driver receiving the prefill job's JobDone to it receiving the
                  decode job's JobDone: the KV's trip to the decode worker, its import into
                  KV pages, and the one decode step (decode_s, reported apart)
  bytes_per_s     handoff_bytes / handoff_s p50
  transfer_bytes_per_s
                  handoff_bytes / p50 of (handoff_s - decode_s): the handoff without the
                  decode step's compute
  driver CPU      this process's CPU time (time.process_time, all threads: the pool's and
                  Ray's) from receiving the prefill job's last step output to receiving the
                  decode job's JobDone, so it includes taking the prefill's JobDone in"""

HANDOFF_EPILOG = """\
keys of the JSON object:
  model, requests, prompt_tokens, repeats, dtype (the KV's), page_bytes
  results                 per mode: mode ("driver" or "by_ref"), handoffs, handoff_bytes,
                          handoff_s_p50, handoff_s_all, bytes_per_s, decode_s_p50 (the
                          decode turn on the worker, part of handoff_s),
                          transfer_bytes_per_s,
                          driver_cpu_s_per_handoff (median), driver_cpu_s_all
  ratio                   handoff_s: driver / by_ref; bytes_per_s: by_ref / driver;
                          driver_cpu_s_per_handoff: driver / by_ref (null if by_ref read 0)
  tokens_agree            both modes produced the same tokens, round by round
  ray_version, cpu        Ray's version; the CPU: name, cores, isa (its AVX2/AVX-512/AMX flags)
  timestamp, command      when and how the run was made

examples:
  tokenpool bench handoff --json handoff.json
  tokenpool bench handoff --requests 8 --prompt-tokens 512 --repeats 5 --json handoff.json
  tokenpool bench handoff --config fleet.yaml --model synth-4l-256h --requests 2 \\
      --prompt-tokens 64 --repeats 1 --json /tmp/handoff.json"""


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "handoff", help="prefill-to-decode KV handoff: through the driver vs by object reference",
        description=HANDOFF_DESCRIPTION, epilog=HANDOFF_EPILOG,
        formatter_class=_args.HelpFormatter)
    _args.add_config(p)
    p.add_argument("--model", metavar="ID", default=None,
                   help="model id, as listed under models: in the fleet file (default: the "
                        "fleet's first model)")
    p.add_argument("--requests", metavar="N", type=_args.positive_int, default=8,
                   help="requests prefilled and handed off together, per round (default: 8)")
    p.add_argument("--prompt-tokens", metavar="N", type=_args.positive_int, default=512,
                   help="tokens of each random prompt (default: 512)")
    p.add_argument("--repeats", metavar="N", type=_args.positive_int, default=5,
                   help="timed rounds per mode, after two warm-up rounds (default: 5)")
    p.add_argument("--seed", metavar="N", type=_args.any_int, default=0,
                   help="seed of the random prompts (default: 0)")
    _args.add_json_out(p)
    p.set_defaults(func=run_handoff)


def run_handoff(args: argparse.Namespace) -> int:
    import os
    from datetime import datetime, timezone

    import ray

    from tokenpool.bench import handoff_bench, report
    from tokenpool.fleet import load_fleet

    fleet = load_fleet(args.config)
    model = args.model or fleet.models[0].id
    result = handoff_bench.run(fleet, model, args.requests, args.prompt_tokens, args.repeats,
                               namespace=f"bench{os.getpid()}", seed=args.seed)
    result |= {"ray_version": ray.__version__, "cpu": report.cpu_info(),
               "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": _args.command_line(args)}
    report.write_json(args.json, result)
    sys.stdout.write(handoff_bench.table(result))
    return 0
