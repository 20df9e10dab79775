"""The HF transformers reference for the engine benchmark: batched `generate`, left-padded.

One greedy generate of exactly N tokens per row (min_new_tokens = max_new_tokens = N), with a
streamer that timestamps every step: `generate` hands it the prompt before the prefill and
then each new batch of tokens as it is made. So, as for our engine:
ttft_s = time of the first new token - start; prefill_tokens_per_s = real (unpadded) prompt
tokens / ttft_s; decode_tokens_per_s = B * (N - 1) / (time of the last token - the first).
(Subtracting a generate(1) run from a generate(N) run instead is dominated by the noise of
two long padded prefills and can even come out negative on a busy machine.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from tokenpool.bench.engine_bench import BatchResult

_PAD_ID = 0  # any id works: padded positions are masked out


def load_hf_model(path: Path, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """AutoModelForCausalLM on the same checkpoint: a .gguf file or an HF-layout directory,
    with transformers' own choice of attention (SDPA where the family supports it: Gemma 2's
    soft-capping is eager only)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype)
    path = Path(path)
    if path.is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.to(device=device, dtype=dtype).eval()


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest prompt on the left; returns (input_ids, attention_mask)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), _PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


class _StepClock:
    """A transformers streamer that only records when each put() arrives (after CUDA work)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def put(self, value) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(model, input_ids: torch.Tensor, mask: torch.Tensor, new_tokens: int
                   ) -> tuple[float, list[float]]:
    """One greedy batched generate of exactly new_tokens per row: (start, token times)."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=_PAD_ID)
    clock = _StepClock(input_ids.device)
    _sync(input_ids.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                             streamer=clock)
    assert out.shape[1] == input_ids.shape[1] + new_tokens, "HF generated a different length"
    return start, clock.times[1:]  # times[0] is the prompt, handed over before the prefill


def bench_batch(model, prompts: list[list[int]], new_tokens: int) -> BatchResult:
    ids, mask = left_pad(prompts, model.device)
    start, token_times = timed_generate(model, ids, mask, new_tokens)
    ttft = token_times[0] - start
    decode_time = token_times[-1] - token_times[0]
    decode_tokens = len(prompts) * (new_tokens - 1)
    return BatchResult(
        batch=len(prompts),
        decode_tokens_per_s=decode_tokens / decode_time if decode_time > 0 else 0.0,
        prefill_tokens_per_s=sum(map(len, prompts)) / ttft,
        ttft_s=ttft,
    )


def bench_hf(model, workloads: dict[int, list[list[int]]], new_tokens: int) -> list[BatchResult]:
    """The same workloads as engine_bench.bench_engine, after a short warm-up."""
    largest = max(workloads.values(), key=len)
    ids, mask = left_pad([p[:16] for p in largest[:2]], model.device)
    timed_generate(model, ids, mask, 4)
    results = []
    for batch, prompts in workloads.items():
        print(f"tokenpool: bench hf, batch {batch}", file=sys.stderr, flush=True)
        results.append(bench_batch(model, prompts, new_tokens))
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
