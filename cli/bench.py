"""`tokenpool bench engine|swap|proxy`: engine throughput, model-switch cost and proxy
overhead, as JSON (`serve` and `sweep` live in cli/bench_serve.py, `overload` in cli/bench_overload.py)."""

from __future__ import annotations

import argparse
import json
import sys

from tokenpool.cli import _args

ENGINE_DESCRIPTION = """\
Measure our engine on batches of random prompts (greedy, ignore EOS, exactly --new-tokens
tokens each) and, unless --no-hf, HF transformers' batched generate() on the same checkpoint,
dtype, device and prompts. Prints a table to stdout and writes one JSON object to --json.

For each batch size B the prompts are B random token sequences (fixed by --seed) whose
lengths are spread evenly over --prompt-lens (a batch of one gets the midpoint).
  ttft_s                mean time from the start to a request's first token
                        (HF: the time until generate() hands its streamer the first token)
  prefill_tokens_per_s  prompt tokens / time until every request has its first token
                        (HF: unpadded prompt tokens / ttft)
  decode_tokens_per_s   the all-decode phase: tokens generated after the last request got
                        its first token / the time from then to the end
                        (HF: B*(N-1) / (time of the last token - time of the first),
                        each step timestamped by a streamer in one generate() call)
  speedup_vs_hf         ours / HF decode tokens per second, per batch size"""

ENGINE_EPILOG = """\
examples:
  tokenpool bench engine --model smollm2-135m-instruct --json bench-engine.json
  tokenpool bench engine --model smollm2-135m-instruct --batch 1,8,32 \\
      --prompt-lens 64-512 --new-tokens 64 --dtype float32 --json bench-engine.json
  tokenpool bench engine --config synth.yaml --model synth-l2-h64-nh4-kv2-f192 \\
      --batch 1,2 --prompt-lens 16-32 --new-tokens 4 --no-hf --json /tmp/b.json"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "bench", help="benchmarks that write one JSON object (engine, swap, proxy, serve, sweep, overload)",
        description="Benchmarks. Each prints a short table to stdout and writes one JSON "
                    "object to --json OUT.",
        formatter_class=_args.HelpFormatter)
    kinds = p.add_subparsers(dest="bench_command", metavar="KIND", required=True)
    _add_engine(kinds)
    _add_swap(kinds)
    _add_proxy(kinds)
    from tokenpool.cli import bench_overload, bench_serve

    bench_serve.add_parsers(kinds)
    bench_overload.add_parser(kinds)


def _add_engine(kinds: argparse._SubParsersAction) -> None:
    from tokenpool.bench.engine_bench import parse_batches, parse_prompt_lens

    p = kinds.add_parser(
        "engine", help="engine throughput and TTFT, against HF transformers",
        description=ENGINE_DESCRIPTION, epilog=ENGINE_EPILOG, formatter_class=_args.HelpFormatter)
    p.add_argument("--model", metavar="ID", required=True,
                   help="model id, as listed under models: in the fleet file")
    _args.add_config(p)
    p.add_argument("--batch", metavar="B[,B...]", default=(1, 8, 32),
                   type=_args.checked(parse_batches, "batch sizes"),
                   help="comma-separated batch sizes, each run separately (default: 1,8,32)")
    p.add_argument("--prompt-lens", metavar="LOW-HIGH", default=(64, 512),
                   type=_args.checked(parse_prompt_lens, "prompt lengths"),
                   help="prompt lengths in tokens, spread evenly over LOW..HIGH within a "
                        "batch; a single N means every prompt has N tokens (default: 64-512)")
    p.add_argument("--new-tokens", metavar="N", default=64,
                   type=_args.checked(_at_least_two, "new tokens"),
                   help="tokens generated per request, at least 2 (default: 64)")
    _args.add_dtype(p, "both engines")
    _args.add_device(p)
    p.add_argument("--seed", metavar="N", type=_args.any_int, default=0,
                   help="seed of the random prompts (default: 0)")
    p.add_argument("--threads", metavar="N", type=_args.positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-hf", action="store_true",
                   help="skip the HF transformers reference (hf is [], speedup_vs_hf {})")
    _args.add_json_out(p)
    p.set_defaults(func=run_engine)


def run_engine(args: argparse.Namespace) -> int:
    import torch

    from tokenpool.bench import engine_bench, report
    from tokenpool.cli._model import find_model, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    fleet, spec = find_model(args.config, args.model)
    model = load_model(fleet, spec, dtype=args.dtype, device=args.device)
    engine = model.engine
    low, high = args.prompt_lens
    engine_bench.check_fits(engine, high, args.new_tokens)
    if max(args.batch) > engine.config.max_num_seqs:
        print(f"tokenpool: warning: batches above engine.max_num_seqs="
              f"{engine.config.max_num_seqs} run in waves", file=sys.stderr)
    workloads = {b: engine_bench.make_prompts(b, low, high, model.checkpoint.config.vocab_size,
                                              args.seed) for b in args.batch}
    ours = engine_bench.bench_engine(engine, workloads, args.new_tokens)
    device, dtype = engine.device, engine.dtype
    del model, engine  # free our weights and KV cache before HF loads its own copy
    hf = [] if args.no_hf else _bench_hf(fleet, spec, dtype, device, workloads, args.new_tokens)
    result = report.engine_report(
        model=spec.id, device=str(device), dtype=str(dtype).removeprefix("torch."),
        new_tokens=args.new_tokens, prompt_lens=(low, high), ours=ours, hf=hf,
        torch_threads=torch.get_num_threads(), command=_args.command_line(args))
    report.write_json(args.json, result)
    sys.stdout.write(report.engine_table(result))
    return 0


def _bench_hf(fleet, spec, dtype, device, workloads, new_tokens):
    from tokenpool.bench import hf_reference
    from tokenpool.models import resolve_source

    print("tokenpool: loading the HF transformers reference", file=sys.stderr, flush=True)
    model = hf_reference.load_hf_model(resolve_source(spec.source, fleet.base_dir), dtype, device)
    return hf_reference.bench_hf(model, workloads, new_tokens)


SWAP_EPILOG = """\
keys of the JSON object:
  weight_bytes            packed weights of the first model
  memcpy_gbps             a plain copy of weight_bytes host -> device memory
  switch_s                median switch time, one weight slot (every switch copies)
  prefetched_switch_s     median switch time to a model already in the spare slot
  hf_load_s               transformers from_pretrained of the same checkpoint, page cache warm
  ratio_to_memcpy_bound   switch_s / (weight_bytes / memcpy bandwidth)
  speedup_vs_hf_load      hf_load_s / switch_s
  kv_swap_gbps            one sequence's KV pages out to host swap slabs and back, per second

examples:
  tokenpool bench swap --json bench-swap.json
  tokenpool bench swap --config fleet.yaml --models llama-a,llama-b --dtype float32 \\
      --repeats 20 --json bench-swap.json"""


SWAP_DESCRIPTION = """\
What a model switch costs, against a plain copy and an HF load. Everything is measured in one
run, side by side, so ratios hold on a noisy machine:
  memcpy      a copy of weight_bytes between two buffers of the kind a switch copies between
              (host cache -> arena: host to host on CPU, pinned host to device on CUDA)
  switch      Worker.switch between two models with one weight slot, so every switch copies
  prefetched  Worker.switch to a model already copied into the spare slot in the background
  hf load     transformers' from_pretrained of the same checkpoint, file in the page cache
  kv swap     one sequence's KV pages to host swap slabs and back, through the engine"""


def _add_swap(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "swap", help="model switch cost against a plain copy and an HF load",
        description=SWAP_DESCRIPTION, epilog=SWAP_EPILOG,
        formatter_class=_args.HelpFormatter)
    _args.add_config(p)
    p.add_argument("--models", metavar="A,B", default=None,
                   help="the two model ids to switch between (default: the fleet's first two; "
                        "with a one-model fleet, that model and an alias of it)")
    _args.add_dtype(p, "the models")
    _args.add_device(p)
    p.add_argument("--repeats", metavar="N", type=_args.checked(_at_least(10), "repeats"),
                   default=10, help="switches timed per kind, at least 10 (default: 10)")
    p.add_argument("--no-hf", action="store_true",
                   help="skip the HF from_pretrained timing (hf_load_s is null)")
    _args.add_json_out(p)
    p.set_defaults(func=run_swap)


def run_swap(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from tokenpool.bench import report, swap_bench
    from tokenpool.errors import ConfigError
    from tokenpool.fleet import load_fleet

    fleet = load_fleet(args.config)
    engine = dataclasses.replace(fleet.engine, **{k: v for k, v in (
        ("dtype", args.dtype), ("device", args.device)) if v})
    fleet = dataclasses.replace(fleet, engine=engine,
                                models=[dataclasses.replace(m, dtype=None) if args.dtype else m
                                        for m in fleet.models])
    ids = args.models.split(",") if args.models else [m.id for m in fleet.models[:2]]
    for model_id in ids:
        fleet.model(model_id)
    if len(ids) == 1:
        fleet, alias = swap_bench.with_alias(fleet, ids[0])
        ids.append(alias)
    if len(ids) != 2 or ids[0] == ids[1]:
        raise ConfigError(f"--models: expected two different model ids, got {args.models!r}")
    result = swap_bench.run(fleet, ids[0], ids[1], args.repeats, not args.no_hf,
                            namespace=f"bench{os.getpid()}")
    result |= {"cpu": report.cpu_info(), "command": _args.command_line(args)}
    report.write_json(args.json, result)
    sys.stdout.write(report.swap_table(result))
    return 0


PROXY_DESCRIPTION = """\
The proxy's share of token latency. Serves the fleet (as `tokenpool serve` does, with the
worker's time stamp added to each SSE chunk), streams completions over its models from a
separate client process, and reports how long each token spent between the worker that made
it and the client: median, p90, p99 in ms (target: median <= 5 ms)."""


def _add_proxy(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("proxy", help="time a token spends between its worker and the client",
                         description=PROXY_DESCRIPTION, formatter_class=_args.HelpFormatter)
    _args.add_config(p)
    p.add_argument("--requests", metavar="N", type=_args.positive_int, default=32,
                   help="streamed requests, round robin over the fleet's models (default: 32)")
    p.add_argument("--concurrency", metavar="C", type=_args.positive_int, default=4,
                   help="requests in flight at once (default: 4)")
    p.add_argument("--max-tokens", metavar="N", type=_args.positive_int, default=16,
                   help="tokens per request (default: 16)")
    _args.add_json_out(p)
    p.set_defaults(func=_run_proxy)


def _run_proxy(args: argparse.Namespace) -> int:
    from tokenpool.bench import proxy_overhead

    result = proxy_overhead.run(args.config, args.requests, args.json,
                                concurrency=args.concurrency, max_tokens=args.max_tokens,
                                progress=True)
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_ms")}, indent=1))
    return 0


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value
    return parse



def _at_least_two(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None
    if value < 2:
        raise ValueError(f"must be at least 2 (one prefill token plus decode), got {text!r}")
    return value
