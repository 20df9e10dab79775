"""A continuous-batching engine for one model on one device.

`step()` is three calls, as in nano-vllm and vLLM v1: the scheduler (engine_scheduler.py)
picks a batch of new prompts and running decodes, the model runner runs it, and postprocess
appends the sampled tokens and ends finished requests. Sequences join and leave between
steps. `step(request_ids)` runs only the requests named (see EngineScheduler for how pages
are found for them); the engine makes the KV copies the scheduler books.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection

import torch

from tokenpool.errors import EmptyPromptError, InvalidSamplingError, PromptTooLongError
from tokenpool.gpu_pool import kv_handoff
from tokenpool.gpu_pool.cpu_ops import paged_attention_kernel
from tokenpool.gpu_pool.device import dtype_name, resolve_device, resolve_dtype
from tokenpool.gpu_pool.engine_config import EngineConfig
from tokenpool.gpu_pool.engine_scheduler import EngineScheduler
from tokenpool.gpu_pool.step_batch import StepBatch, SwapOp
from tokenpool.gpu_pool.protocol import RequestOutput
from tokenpool.gpu_pool.rotary import rotary_tables
from tokenpool.gpu_pool.kv_swap import KVSwapper
from tokenpool.gpu_pool.decoder import DecoderForward, DecoderWeights
from tokenpool.gpu_pool.model_runner import ModelRunner
from tokenpool.gpu_pool.prefix_pages import PrefixPages
from tokenpool.gpu_pool.sequence import Sequence
from tokenpool.gpu_pool.weights import bind_weights, is_tied, pack_weights
from tokenpool.gpu_pool.worker_memory import (EngineMemory, ModelLayout, WorkerMemory,
                                              max_model_len)
from tokenpool.memory.block_manager import BlockManager
from tokenpool.memory.config import MemoryConfig
from tokenpool.models.config import ModelConfig
from tokenpool.models.quant_plan import plan_formats, stored_formats
from tokenpool.sampling import SamplingParams


class LLMEngine:
    """The requests of one model on one worker, stepped while the model is switched in.

    Built alone (`LLMEngine(config, weights, ...)`) it gets a private arena holding its KV and
    its weights. A `Worker` instead builds one engine per model over shared memory and binds
    each engine's weights on `switch`.
    """

    def __init__(self, model_config: ModelConfig, weights: dict[str, torch.Tensor] | None,
                 config: EngineConfig = EngineConfig(), tokenizer=None, *,
                 memory: EngineMemory | None = None, model_id: str = "model",
                 weight_bytes: int = 0):
        self.config = config
        self.model_id = model_id  # the fleet's id: handoffs only move between engines of one
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        mc = model_config
        own_weights = None
        self.weight_bytes = weight_bytes  # as packed in a weight slot; a private arena's own
        if memory is None:
            memory, own_weights = self._private_memory(weights)
        self.memory = memory
        blocks = BlockManager(memory.pages)
        host_blocks = None if memory.swap_kv is None else BlockManager(memory.swap_pages)
        prefix = PrefixPages(memory.pages, model_id) if config.prefix_caching else None
        chunk = (config.prefill_chunk_tokens or config.max_num_batched_tokens) \
            if config.chunked_prefill else 0
        self.scheduler = EngineScheduler(blocks, host_blocks, config.max_num_seqs,
                                         config.max_num_batched_tokens, prefix, chunk)
        self.last_step_size = 0  # sequences the last step computed, sampled or mid-prompt
        self.last_step_prompt_tokens = 0  # of which prompt tokens (prefills and their chunks)
        self.swapper = None if host_blocks is None else KVSwapper(
            memory.kv, blocks, memory.swap_kv, host_blocks)
        self.max_model_len = max_model_len(mc, config.max_model_len, memory.pages.capacity)
        kernel = paged_attention_kernel() if self.device.type == "cpu" and config.fused_kernels \
            else None
        self.forward = DecoderForward(
            mc, *rotary_tables(mc, self.max_model_len, self.dtype, self.device), memory.scratch,
            memory.quant_scratch)
        self.forward.weights = own_weights
        self.runner = ModelRunner(self.forward, memory.kv, self.device, kernel)
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(config.seed)

    def _private_memory(self, weights: dict[str, torch.Tensor] | None
                        ) -> tuple[EngineMemory, DecoderWeights]:
        """A one-model arena: `kv_cache_bytes` of KV slabs and one slot with these weights."""
        if weights is None:
            raise ValueError("a standalone engine needs weights (or a worker's memory)")
        tied = is_tied(self.model_config, weights)
        formats = plan_formats(self.model_config, self.config.quantization, tied,
                               stored_formats(weights))
        layout = ModelLayout.of(self.model_id, self.model_config, self.dtype, tied, formats)
        self._worker_memory = WorkerMemory([layout], self.device, MemoryConfig(prefetch=False),
                                           self.config.kv_cache_bytes, num_slots=1)
        self.weight_bytes = layout.index.nbytes
        slot = self._worker_memory.slots[0][: layout.index.nbytes]
        pack_weights(self.model_config, weights, layout.index, slot)
        bound = bind_weights(self.model_config, layout.index, slot)
        return self._worker_memory.engine_memory(self.model_id), bound

    def bind(self, weights: DecoderWeights | None) -> None:
        """Point the model at weights in a worker's slot (None: the model is switched out)."""
        self.forward.weights = weights

    @classmethod
    def from_checkpoint(cls, checkpoint, config: EngineConfig = EngineConfig()) -> "LLMEngine":
        return cls(checkpoint.config, checkpoint.weights, config, checkpoint.tokenizer)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    # The scheduler's state, read by tests and profiling.
    @property
    def blocks(self) -> BlockManager:
        return self.scheduler.blocks

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def swapped(self):
        return self.scheduler.swapped

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # -- requests -------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                    request_id: str | None = None) -> str:
        """Queue a request; raises a typed InvalidRequestError and changes nothing if bad."""
        self._validate(prompt_ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        self.scheduler.add(Sequence(request_id, list(prompt_ids), params,
                                    self._generator(params), self._detokenizer(params)))
        return request_id

    def abort(self, request_id: str) -> bool:
        """End the request at once, freeing its pages; False if this engine does not hold it."""
        seq = self.scheduler.take(request_id)
        if seq is not None:
            self.scheduler.finish(seq)
        return seq is not None

    def holds(self, request_id: str) -> bool:
        return self.scheduler.get(request_id) is not None

    def export_sequence(self, request_id: str) -> kv_handoff.SequenceHandoff:
        """Hand the request to another engine of this model (prefill here, decode there):
        its KV is copied to one host array, its pages freed, and it leaves this engine."""
        seq = self.scheduler.take(request_id)
        if seq is None:
            raise KeyError(f"request {request_id!r} is not in this engine")
        handoff = kv_handoff.export_from(self, seq)
        self.scheduler.finish(seq)
        return handoff

    def import_sequence(self, handoff: kv_handoff.SequenceHandoff) -> None:
        """Take over a request another engine of this model exported; it resumes decoding
        with its KV in place (see kv_handoff.import_into for when pages are short)."""
        kv_handoff.import_into(self, handoff)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

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

    def step(self, request_ids: Collection[str] | None = None) -> list[RequestOutput]:
        """One step of the named requests (None: of all); an output per request that sampled
        a token (a prompt computing a chunk that is not its last has none: `last_step_size`
        says whether the step ran anything).

        Requests named but not held here are ignored; named ones that cannot run now (no
        pages or batch slot) get no output."""
        batch = self.scheduler.schedule(request_ids)
        self._copy(batch.swaps)
        self.last_step_size = len(batch.prefills) + len(batch.decodes)
        self.last_step_prompt_tokens = sum(batch.chunk(i)[1] for i in range(len(batch.prefills)))
        if not batch:
            return []
        tokens, logprobs = self.runner.run(batch)
        self.scheduler.computed(batch)
        return self._postprocess(batch, tokens, logprobs)

    def swap_out(self, request_ids: list[str] | None = None) -> int:
        """Move running requests' KV to host slabs (all of them by default); bytes moved.

        Used at the end of a model's turn when another batch needs the device pages. The
        requests resume, swapped back in, on a later step that runs them.
        """
        if self.swapper is None:
            return 0
        return self._copy(self.scheduler.swap_out(request_ids))

    def _copy(self, swaps: tuple[SwapOp, ...] | list[SwapOp]) -> int:
        return sum(self.swapper.copy(op) for op in swaps)

    def _postprocess(self, batch: StepBatch, tokens: list[int], logprobs: list):
        outputs = []
        for seq, token, lp in zip(batch.sequences, tokens, logprobs):
            seq.output_ids.append(token)
            text, reason = self._check_finish(seq, token)
            if reason is not None:
                self.scheduler.finish(seq)
            outputs.append(RequestOutput(
                seq.seq_id, (token,), text, reason is not None, reason,
                (lp,) if lp is not None else (), len(seq.prompt_ids), len(seq.output_ids),
                seq.num_cached))
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

    def next_token_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits after `prompt_ids`, through the same paged prefill path as serving."""
        return self.prompt_logits(prompt_ids, every_position=False)[-1]

    def prompt_logits(self, prompt_ids: list[int], every_position: bool = True) -> torch.Tensor:
        """[len(prompt_ids), vocab] logits after each prefix of `prompt_ids` (row i scores
        token i + 1), as perplexity needs; through the serving prefill path."""
        self._validate(prompt_ids, SamplingParams(max_tokens=1))
        seq = Sequence("__logits__", list(prompt_ids), SamplingParams(max_tokens=1), None)
        if not self.blocks.can_grow(seq.seq_id, seq.num_tokens):
            raise RuntimeError("not enough free KV pages to score this prompt now")
        table = self.blocks.grow(seq.seq_id, seq.num_tokens)
        try:
            return self.runner.logits(StepBatch((seq,), (), {seq.seq_id: table}), every_position)
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
