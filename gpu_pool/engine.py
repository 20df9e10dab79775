"""A continuous-batching engine for one model on one device.

`step()` is three calls, as in nano-vllm and vLLM v1: schedule a batch (new prompts and
running decodes together), run it, and postprocess the sampled tokens. Sequences join and
leave between steps. When pages run short, the newest running sequence is preempted and later
recomputed from its prompt plus the tokens it already produced.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from dataclasses import dataclass

import torch

from tokenpool.errors import (ConfigError, EmptyPromptError, InvalidSamplingError,
                             PromptTooLongError)
from tokenpool.gpu_pool.cpu_ops import paged_attention_kernel
from tokenpool.gpu_pool.device import DTYPES, dtype_name, resolve_device, resolve_dtype
from tokenpool.gpu_pool.kv_cache import PagedKVCache
from tokenpool.gpu_pool.llama import LlamaForward, LlamaWeights, RotaryTable
from tokenpool.gpu_pool.model_runner import ModelRunner, StepBatch
from tokenpool.gpu_pool.sequence import Sequence, SeqStatus
from tokenpool.memory.block_manager import BLOCK_SIZE, BlockManager
from tokenpool.models.config import ModelConfig
from tokenpool.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class EngineConfig:
    device: str = "cpu"
    dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    kv_cache_bytes: int = 1 << 30
    max_model_len: int | None = None  # defaults to the model's context length
    seed: int = 0  # for requests that bring no seed of their own
    fused_kernels: bool = True  # CPU: compiled paged decode attention (falls back if unbuildable)

    def __post_init__(self):
        # Checked when the fleet file loads, long before a checkpoint is read.
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be auto or one of {', '.join(DTYPES)}; "
                              f"got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | None while running
    logprobs: tuple = ()  # TokenLogprobs per new token when asked for
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


class LLMEngine:
    def __init__(self, model_config: ModelConfig, weights: dict[str, torch.Tensor],
                 config: EngineConfig = EngineConfig(), tokenizer=None):
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        mc = model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        page_bytes = PagedKVCache.page_bytes(mc.num_hidden_layers, mc.num_key_value_heads,
                                             mc.head_dim, self.dtype)
        num_pages = max(1, config.kv_cache_bytes // page_bytes)
        self.max_model_len = min(self.max_model_len, num_pages * BLOCK_SIZE)
        self.blocks = BlockManager(num_pages)
        kv = PagedKVCache(mc.num_hidden_layers, num_pages, mc.num_key_value_heads, mc.head_dim,
                          self.dtype, self.device)
        self.weights = LlamaWeights.from_hf(mc, weights, self.dtype, self.device)
        rope = RotaryTable(mc.head_dim, mc.rope_theta, self.max_model_len, self.dtype,
                           self.device)
        kernel = paged_attention_kernel() if self.device.type == "cpu" and config.fused_kernels \
            else None
        self.runner = ModelRunner(LlamaForward(mc, self.weights, rope), kv, self.device, kernel)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(config.seed)

    @classmethod
    def from_checkpoint(cls, checkpoint, config: EngineConfig = EngineConfig()) -> "LLMEngine":
        return cls(checkpoint.config, checkpoint.weights, config, checkpoint.tokenizer)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    # -- requests -------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                    request_id: str | None = None) -> str:
        """Queue a request; raises a typed InvalidRequestError and changes nothing if bad."""
        self._validate(prompt_ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        seq = Sequence(request_id, list(prompt_ids), params, self._generator(params),
                       self._detokenizer(params))
        self.waiting.append(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.seq_id == request_id:
                    queue.remove(seq)
                    self._finish(seq)
                    return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_used_pages(self) -> int:
        return self.blocks.num_used

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise EmptyPromptError()
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(len(prompt_ids), self.max_model_len - 1)
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidSamplingError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidSamplingError(
                f"max_tokens={params.max_tokens} plus the prompt's {len(prompt_ids)} tokens "
                f"exceeds the context of {self.max_model_len}", "max_tokens")
        if params.stop and self.tokenizer is None:
            raise InvalidSamplingError("stop strings need an engine with a tokenizer", "stop")

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.greedy:
            return None
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
        return torch.Generator().manual_seed(seed)

    def _detokenizer(self, params: SamplingParams):
        if self.tokenizer is None:
            return None
        from tokenpool.models.detokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, stop=params.stop,
                                      skip_special_tokens=params.skip_special_tokens)

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self._schedule()
        if not batch:
            return []
        tokens, logprobs = self.runner.run(batch)
        return self._postprocess(batch, tokens, logprobs)

    def _schedule(self) -> StepBatch:
        decodes = self._reserve_decodes()
        prefills = self._admit_prefills(len(decodes))
        self.running = decodes + prefills
        tables = {s.seq_id: self.blocks.block_table(s.seq_id) for s in self.running}
        return StepBatch(tuple(prefills), tuple(decodes), tables)

    def _reserve_decodes(self) -> list[Sequence]:
        """Give every running sequence a slot for one more token, preempting the newest."""
        pending = list(self.running)
        kept: list[Sequence] = []
        while pending:
            seq = pending.pop(0)
            while not self.blocks.can_grow(seq.seq_id, seq.num_tokens) and pending:
                self._preempt(pending.pop())
            if self.blocks.can_grow(seq.seq_id, seq.num_tokens):
                self.blocks.grow(seq.seq_id, seq.num_tokens)
                kept.append(seq)
            else:
                self._preempt(seq)
        return kept

    def _admit_prefills(self, num_running: int) -> list[Sequence]:
        budget = self.config.max_num_batched_tokens - num_running
        admitted: list[Sequence] = []
        while self.waiting and num_running + len(admitted) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # A prompt longer than the budget still runs, alone, so nothing waits forever.
            if seq.num_tokens > budget and (admitted or num_running):
                break
            if not self.blocks.can_grow(seq.seq_id, seq.num_tokens):
                break
            self.waiting.popleft()
            self.blocks.grow(seq.seq_id, seq.num_tokens)
            seq.status = SeqStatus.RUNNING
            admitted.append(seq)
            budget -= seq.num_tokens
        return admitted

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        self.num_preemptions += 1
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def _postprocess(self, batch: StepBatch, tokens: list[int], logprobs: list):
        outputs = []
        for seq, token, lp in zip(batch.sequences, tokens, logprobs):
            seq.output_ids.append(token)
            text, reason = self._check_finish(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq)
            outputs.append(RequestOutput(
                seq.seq_id, (token,), text, reason is not None, reason,
                (lp,) if lp is not None else (), len(seq.prompt_ids), len(seq.output_ids)))
        return outputs

    def _check_finish(self, seq: Sequence, token: int) -> tuple[str, str | None]:
        p = seq.params
        stop_ids = p.stop_token_ids if p.ignore_eos else \
            p.stop_token_ids + self.model_config.eos_token_ids
        if token in stop_ids:
            return self._flush(seq), "stop"
        text = seq.detokenizer.add(token) if seq.detokenizer is not None else ""
        if seq.detokenizer is not None and seq.detokenizer.stop_hit is not None:
            return text, "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return text + self._flush(seq), "length"
        return text, None

    @staticmethod
    def _flush(seq: Sequence) -> str:
        return seq.detokenizer.finish() if seq.detokenizer is not None else ""

    def _finish(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED

    def next_token_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits after `prompt_ids`, through the same paged prefill path as serving."""
        self._validate(prompt_ids, SamplingParams(max_tokens=1))
        seq = Sequence("__logits__", list(prompt_ids), SamplingParams(max_tokens=1), None)
        if not self.blocks.can_grow(seq.seq_id, seq.num_tokens):
            raise RuntimeError("not enough free KV pages to score this prompt now")
        table = self.blocks.grow(seq.seq_id, seq.num_tokens)
        try:
            return self.runner.logits(StepBatch((seq,), (), {seq.seq_id: table}))[0]
        finally:
            self.blocks.free(seq.seq_id)

    # -- convenience --------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[list[int]]:
        """Run prompts to completion; returns each one's generated token ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        result: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                result[out.request_id].extend(out.new_token_ids)
        return [result[i] for i in ids]
