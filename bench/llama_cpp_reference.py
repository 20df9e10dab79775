"""The llama.cpp reference for the engine benchmark: the same GGUF, through llama-cpp-python.

Runs only on CPU, on a .gguf source, when `llama_cpp` is importable (the optional `bench`
extra installs it), and at batch 1 only: llama-cpp-python generates one sequence at a time.
llama.cpp uses the same thread count as torch does for our engine (n_threads and
n_threads_batch both), and the same prompt token ids.

Timed as our engine is (engine_bench.py): one greedy generation of exactly N tokens
(temperature 0, so llama.cpp's greedy sampler; `Llama.generate` never stops on EOS by
itself), each token timestamped as the generator yields it.
  ttft_s               time of the first new token - start (prompt eval and one sample)
  prefill_tokens_per_s prompt tokens / ttft_s
  decode_tokens_per_s  (N - 1) / (time of the last token - time of the first)
"""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tokenpool.bench.engine_bench import BatchResult

_WARMUP_TOKENS = 4


@dataclass(frozen=True, slots=True)
class LlamaCppRun:
    results: list[BatchResult]
    threads: int
    info: dict  # version and llama.cpp's system info (the SIMD it was built with)
    tokens: dict[int, list[int]]  # batch size -> the greedy token ids of its one prompt


def skip_reason(source: Path, device, disabled: bool,
                workloads: dict[int, list[list[int]]] | None = None) -> str | None:
    """Why the comparator cannot run here, or None when it can."""
    if disabled:
        return "--no-llama-cpp"
    if workloads is not None and 1 not in workloads:
        return "batch 1 not benchmarked (llama-cpp-python generates one sequence at a time)"
    if not str(device).startswith("cpu"):
        return f"device {device} (llama.cpp is compared on CPU only)"
    if Path(source).suffix.lower() != ".gguf":
        return "the model's source is not a .gguf file"
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp is not installed (pip install 'tokenpool[bench]')"
    return None


def load(path: Path, threads: int, n_ctx: int):
    """The GGUF in llama.cpp: `threads` for decode and prompt eval alike, no GPU layers."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 2048),
                 n_threads=threads, n_threads_batch=threads, n_gpu_layers=0,
                 logits_all=False, verbose=False)


def info() -> dict:
    import llama_cpp

    system = llama_cpp.llama_print_system_info()
    if isinstance(system, bytes):
        system = system.decode(errors="replace")
    return {"version": getattr(llama_cpp, "__version__", "unknown"),
            "system_info": system.strip()}


def timed_generate(llm, prompt: list[int], new_tokens: int) -> tuple[float, list[float],
                                                                     list[int]]:
    """One greedy generation of exactly new_tokens: (start, token times, token ids)."""
    llm.reset()  # n_tokens = 0: no prefix reuse from the previous run; eval clears the KV
    times, tokens = [], []
    start = time.perf_counter()
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter())
        tokens.append(int(token))
        if len(tokens) == new_tokens:
            break
    return start, times, tokens


def bench_prompt(llm, prompt: list[int], new_tokens: int) -> tuple[BatchResult, list[int]]:
    start, times, tokens = timed_generate(llm, prompt, new_tokens)
    ttft = times[0] - start
    decode_time = times[-1] - times[0]
    return BatchResult(
        batch=1,
        decode_tokens_per_s=(new_tokens - 1) / decode_time if decode_time > 0 else 0.0,
        prefill_tokens_per_s=len(prompt) / ttft if ttft > 0 else 0.0,
        ttft_s=ttft,
    ), tokens


def bench_llama_cpp(path: Path, workloads: dict[int, list[list[int]]], new_tokens: int,
                    threads: int) -> LlamaCppRun:
    """Batch 1 of `workloads` (llama.cpp runs no other), after a short warm-up."""
    prompt = workloads[1][0]
    n_ctx = max(512, len(prompt) + new_tokens + 8)
    print("tokenpool: loading the llama.cpp reference", file=sys.stderr, flush=True)
    llm = load(path, threads, n_ctx)
    try:
        timed_generate(llm, prompt[:16], _WARMUP_TOKENS)
        print("tokenpool: bench llama.cpp, batch 1", file=sys.stderr, flush=True)
        result, tokens = bench_prompt(llm, prompt, new_tokens)
    finally:
        if hasattr(llm, "close"):
            llm.close()
    return LlamaCppRun([result], threads, info(), {1: tokens})
