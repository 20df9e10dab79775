"""`tokenpool bench engine|proxy`: engine throughput and proxy overhead, as JSON (`swap` lives
in cli/bench_swap.py, `handoff` in cli/bench_handoff.py, `serve` and `sweep` in
cli/bench_serve.py, `overload` in cli/bench_overload.py, `chat` and `chunked` in
cli/bench_prefix.py)."""

from __future__ import annotations

import argparse
import json
import sys

from tokenpool.cli import _args

ENGINE_DESCRIPTION = """\
Measure our engine on batches of random prompts (greedy, ignore EOS, exactly --new-tokens
tokens each) and, unless --no-hf, HF transformers' batched generate() on the same checkpoint,
dtype, device and prompts; on CPU, for a .gguf model, when llama-cpp-python is installed (the
`bench` extra) and unless --no-llama-cpp, llama.cpp on the same GGUF file with the same
thread count and the same batch-1 prompt. Prints a table to stdout and writes one JSON object
to --json.

Our engine serves --quant's weight format (none: floats in --dtype; native: a GGUF's
quantized tensors as stored, e.g. Q4_1 and Q8_0; int8 / int4: quantized at load). HF always
runs float weights (a GGUF dequantized) in --dtype: it has no quantized kernels to compare.

For each batch size B the prompts are B random token sequences (fixed by --seed) whose
lengths are spread evenly over --prompt-lens (a batch of one gets the midpoint).
  ttft_s                mean time from the start to a request's first token
                        (HF: the time until generate() hands its streamer the first token;
                        llama.cpp: until its generator yields the first token)
  prefill_tokens_per_s  prompt tokens / time until every request has its first token
                        (HF: unpadded prompt tokens / ttft)
  decode_tokens_per_s   the all-decode phase: tokens generated after the last request got
                        its first token / the time from then to the end
                        (HF: B*(N-1) / (time of the last token - time of the first),
                        each step timestamped by a streamer in one generate() call;
                        llama.cpp: (N-1) / (last token - first token), batch 1 only)
  speedup_vs_hf         ours / HF decode tokens per second, per batch size
  speedup_vs_llama_cpp  ours / llama.cpp decode tokens per second ({"1": ...} or {})"""

ENGINE_EPILOG = """\
other keys of the JSON object:
  quant                 the weight format our engine served (--quant, else the fleet's)
  weight_bytes          our packed weights, in that format (bytes)
  kernel_isa            the quantized kernels' code path, picked from the CPU's features
                        (avx512, avx2, generic; torch: dequantize + F.linear, as on CUDA;
                        null with --quant none: torch's own float matmuls)
  hf_weights            what HF ran: float weights, a GGUF dequantized to --dtype
  llama_cpp             llama.cpp's results (batch 1; [] when it did not run, and then
                        llama_cpp_skipped says why); llama_cpp_info its version and build
  llama_cpp_tokens      llama.cpp's greedy token ids, per batch size ({} when not run)
  llama_cpp_agreement   leading greedy tokens ours and llama.cpp's share, per batch size
  threads               {"ours": torch threads, "llama_cpp": its n_threads (null: not run)}
  cpu                   name, cores, fast_bf16 and isa: avx2, avx512f, avx512_vnni,
                        avx512_bf16, amx_tile, amx_bf16, amx_int8... as /proc/cpuinfo has them

examples:
  tokenpool bench engine --model smollm2-135m-instruct --json bench-engine.json
  tokenpool bench engine --model smollm2-135m-instruct --quant native --batch 1,8,32 \\
      --prompt-lens 64 --new-tokens 64 --threads 4 --json bench-q4_1.json
  tokenpool bench engine --model smollm2-135m-instruct --batch 1,8,32 \\
      --prompt-lens 64-512 --new-tokens 64 --dtype float32 --json bench-engine.json
  tokenpool bench engine --config synth.yaml --model synth-l2-h64-nh4-kv2-f192 \\
      --batch 1,2 --prompt-lens 16-32 --new-tokens 4 --quant int8 --no-hf --json /tmp/b.json"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    from tokenpool.cli import (bench_handoff, bench_overload, bench_prefix, bench_serve,
                               bench_swap)

    p = commands.add_parser(
        "bench", help="benchmarks that write one JSON object (engine, swap, handoff, proxy, "
             "serve, sweep, overload, chat, chunked)",
        description="Benchmarks. Each prints a short table to stdout and writes one JSON "
                    "object to --json OUT.",
        formatter_class=_args.HelpFormatter)
    kinds = p.add_subparsers(dest="bench_command", metavar="KIND", required=True)
    _add_engine(kinds)
    bench_swap.add_parser(kinds)
    bench_handoff.add_parser(kinds)
    _add_proxy(kinds)
    bench_serve.add_parsers(kinds)
    bench_overload.add_parser(kinds)
    bench_prefix.add_parsers(kinds)


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
    _args.add_dtype(p, "our engine and HF")
    _args.add_quant(p, "our engine (HF runs floats; llama.cpp runs the GGUF as stored)")
    _args.add_device(p)
    p.add_argument("--seed", metavar="N", type=_args.any_int, default=0,
                   help="seed of the random prompts (default: 0)")
    p.add_argument("--threads", metavar="N", type=_args.positive_int, default=None,
                   help="torch CPU threads, and llama.cpp's (default: torch's choice)")
    p.add_argument("--no-hf", action="store_true",
                   help="skip the HF transformers reference (hf is [], speedup_vs_hf {})")
    p.add_argument("--no-llama-cpp", action="store_true",
                   help="skip the llama.cpp reference (llama_cpp is [], "
                        "speedup_vs_llama_cpp {})")
    _args.add_json_out(p)
    p.set_defaults(func=run_engine)


def run_engine(args: argparse.Namespace) -> int:
    import torch

    from tokenpool.bench import engine_bench, report
    from tokenpool.cli._model import find_model, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    fleet, spec = find_model(args.config, args.model)
    model = load_model(fleet, spec, dtype=args.dtype, device=args.device,
                       quantization=args.quant)
    engine, source = model.engine, model.path
    low, high = args.prompt_lens
    engine_bench.check_fits(engine, high, args.new_tokens)
    if max(args.batch) > engine.config.max_num_seqs:
        print(f"tokenpool: warning: batches above engine.max_num_seqs="
              f"{engine.config.max_num_seqs} run in waves", file=sys.stderr)
    workloads = {b: engine_bench.make_prompts(b, low, high, model.checkpoint.config.vocab_size,
                                              args.seed) for b in args.batch}
    our_tokens: dict[int, list[list[int]]] = {}
    ours = engine_bench.bench_engine(engine, workloads, args.new_tokens, our_tokens)
    device, dtype = engine.device, engine.dtype
    quant, weight_bytes = engine.config.quantization, engine.weight_bytes
    kernel_isa = _kernel_isa(quant, device)
    del model, engine  # free our weights and KV cache before HF loads its own copy
    dtype_name = str(dtype).removeprefix("torch.")
    hf = [] if args.no_hf else _bench_hf(fleet, spec, dtype, device, workloads, args.new_tokens)
    lcpp_keys, lcpp_tokens = _run_llama_cpp(args, source, device, workloads, threads,
                                            our_tokens)
    result = report.engine_report(
        model=spec.id, device=str(device), dtype=dtype_name,
        new_tokens=args.new_tokens, prompt_lens=(low, high), ours=ours, hf=hf,
        torch_threads=threads, command=_args.command_line(args),
        quant=quant, weight_bytes=weight_bytes, kernel_isa=kernel_isa,
        hf_weights=_hf_weights(source, dtype_name), **lcpp_keys)
    result |= lcpp_tokens
    report.write_json(args.json, result)
    sys.stdout.write(report.engine_table(result))
    return 0


def _kernel_isa(quant: str, device) -> str | None:
    """The quantized kernels' code path (None when the weights are floats): the CPU
    extension's vector ISA, or "torch" (dequantize + F.linear, as on CUDA)."""
    if quant == "none":
        return None
    if device.type != "cpu":
        return "torch"
    from tokenpool.gpu_pool.quant_kernels import kernel_isa

    return kernel_isa()


def _hf_weights(source, dtype_name: str) -> str:
    if str(source).lower().endswith(".gguf"):
        return f"dequantized float: the GGUF's tensors dequantized to {dtype_name}"
    return f"float: the checkpoint's tensors in {dtype_name}"


def _run_llama_cpp(args, source, device, workloads, threads, our_tokens):
    """llama.cpp on the same GGUF, when it can run here: engine_report's llama.cpp keyword
    arguments, and the JSON's token keys (its greedy tokens, and how long they agree)."""
    from tokenpool.bench import engine_bench, llama_cpp_reference

    skipped = llama_cpp_reference.skip_reason(source, device, args.no_llama_cpp, workloads)
    lcpp = None if skipped else llama_cpp_reference.bench_llama_cpp(
        source, workloads, args.new_tokens, threads)
    keys = dict(llama_cpp=lcpp.results if lcpp else [],
                llama_cpp_threads=lcpp.threads if lcpp else None,
                llama_cpp_info=lcpp.info if lcpp else None, llama_cpp_skipped=skipped)
    tokens = lcpp.tokens if lcpp else {}
    return keys, {
        "llama_cpp_tokens": {str(b): t for b, t in tokens.items()},
        "llama_cpp_agreement": {str(b): engine_bench.leading_agreement(our_tokens[b][0], t)
                                for b, t in tokens.items()}}


def _bench_hf(fleet, spec, dtype, device, workloads, new_tokens):
    from tokenpool.bench import hf_reference
    from tokenpool.models import resolve_source

    print("tokenpool: loading the HF transformers reference", file=sys.stderr, flush=True)
    model = hf_reference.load_hf_model(resolve_source(spec.source, fleet.base_dir), dtype, device)
    return hf_reference.bench_hf(model, workloads, new_tokens)


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


def _at_least_two(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None
    if value < 2:
        raise ValueError(f"must be at least 2 (one prefill token plus decode), got {text!r}")
    return value
