"""`tokenpool bench swap`: what a model switch costs, against a plain copy and an HF load."""

from __future__ import annotations

import argparse
import sys

from tokenpool.cli import _args

SWAP_DESCRIPTION = """\
What a model switch costs, against a plain copy and an HF load. Everything is measured in one
run, side by side, so ratios hold on a noisy machine:
  memcpy      a copy of weight_bytes between two buffers of the kind a switch copies between
              (host cache -> arena: host to host on CPU, pinned host to device on CUDA)
  switch      Worker.switch between two models with one weight slot, so every switch copies
  prefetched  Worker.switch to a model already copied into the spare slot in the background
  hf load     transformers' from_pretrained of the same checkpoint, file in the page cache
  kv swap     one sequence's KV pages to host swap slabs and back, through the engine

--quant applies one weight format to every model of the fleet (as --dtype does), so a switch
copies the packed bytes of that format: compare formats by running once per --quant."""

SWAP_EPILOG = """\
keys of the JSON object:
  quant                   the weight format every model was packed in (--quant, else the
                          fleet file's engine.quantization)
  weight_bytes            packed weights of the first model, in that format
  switch_bytes            packed weights of each model: what a switch to it copies
  memcpy_gbps             a plain copy of weight_bytes host -> device memory
  switch_s                median switch time, one weight slot (every switch copies)
  prefetched_switch_s     median switch time to a model already in the spare slot
  hf_load_s               transformers from_pretrained of the same checkpoint, page cache warm
                          (floats: HF dequantizes a GGUF whatever --quant says)
  ratio_to_memcpy_bound   switch_s / (switch_bytes / memcpy bandwidth), median per switch
  speedup_vs_hf_load      hf_load_s / switch_s
  kv_swap_gbps            one sequence's KV pages out to host swap slabs and back, per second
  cpu                     the CPU: name, cores, isa (its AVX2/AVX-512/AMX flags)

examples:
  tokenpool bench swap --json bench-swap.json
  tokenpool bench swap --models smollm2-135m-instruct --quant native --no-hf \\
      --json swap-q4_1.json
  tokenpool bench swap --config fleet.yaml --models llama-a,llama-b --dtype float32 \\
      --repeats 20 --json bench-swap.json"""


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "swap", help="model switch cost against a plain copy and an HF load",
        description=SWAP_DESCRIPTION, epilog=SWAP_EPILOG,
        formatter_class=_args.HelpFormatter)
    _args.add_config(p)
    p.add_argument("--models", metavar="A,B", default=None,
                   help="the two model ids to switch between (default: the fleet's first two; "
                        "with a one-model fleet, that model and an alias of it)")
    _args.add_dtype(p, "the models")
    _args.add_quant(p, "every model")
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
    overrides = {k: v for k, v in (("dtype", args.dtype), ("device", args.device),
                                   ("quantization", args.quant)) if v}
    engine = dataclasses.replace(fleet.engine, **overrides)
    # the flags beat each model's own dtype / quantization, as they beat the engine's
    per_model = {k: None for k in ("dtype", "quantization") if k in overrides}
    fleet = dataclasses.replace(fleet, engine=engine,
                                models=[dataclasses.replace(m, **per_model)
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


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value
    return parse
