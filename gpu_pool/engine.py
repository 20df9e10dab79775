"""A continuous-batching engine for one model on one device.

`step()` is three calls, as in nano-vllm and vLLM v1: schedule a batch (new prompts and
running decodes together), run it, and postprocess the sampled tokens. Sequences join and
leave between steps. When pages run short, the newest running sequence is preempted: its KV
pages are swapped out to host slabs when there is room there (and swapped back in before new
prompts are admitted), else it is recomputed later from its prompt plus its tokens so far.
"""

from __future__ import annotations

import itertools
from collections import deque

import torch

from tokenpool.errors import EmptyPromptError, InvalidSamplingError, PromptTooLongError
from tokenpool.gpu_pool import kv_handoff
from tokenpool.gpu_pool.cpu_ops import paged_attention_kernel
from tokenpool.gpu_pool.device import dtype_name, resolve_device, resolve_dtype
from tokenpool.gpu_pool.engine_config import EngineConfig
from tokenpool.gpu_pool.protocol import RequestOutput
from tokenpool.gpu_pool.kv_swap import KVSwapper
from tokenpool.gpu_pool.llama import LlamaForward, LlamaWeights, RotaryTable
from tokenpool.gpu_pool.model_runner import ModelRunner, StepBatch
from tokenpool.gpu_pool.sequence import Sequence, SeqStatus
from tokenpool.gpu_pool.weights import bind_llama, is_tied, pack_llama
from tokenpool.gpu_pool.worker_memory import EngineMemory, ModelLayout, WorkerMemory
from tokenpool.memory.block_manager import BLOCK_SIZE, BlockManager
from tokenpool.memory.config import MemoryConfig
from tokenpool.models.config import ModelConfig
from tokenpool.sampling import SamplingParams


class LLMEngine:
    """The requests of one model on one worker, stepped while the model is switched in.

    Built alone (`LLMEngine(config, weights, ...)`) it gets a private arena holding its KV and
    its weights. A `Worker` instead builds one engine per model over shared memory and binds
    each engine's weights on `switch`.
    """

    def __init__(self, model_config: ModelConfig, weights: dict[str, torch.Tensor] | None,
                 config: EngineConfig = EngineConfig(), tokenizer=None, *,
                 memory: EngineMemory | None = None, model_id: str = "model"):
        self.config = config
        self.model_id = model_id  # the fleet's id: handoffs only move between engines of one
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        mc = model_config
        own_weights = None
        if memory is None:
            memory, own_weights = self._private_memory(weights)
        self.memory = memory
        self.blocks = BlockManager(memory.pages)
        self.swapper = None if memory.swap_kv is None else KVSwapper(
            memory.kv, self.blocks, memory.swap_kv, BlockManager(memory.swap_pages))
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings, memory.pages.capacity * BLOCK_SIZE)
        rope = RotaryTable(mc.head_dim, mc.rope_theta, self.max_model_len, self.dtype,
                           self.device)
        kernel = paged_attention_kernel() if self.device.type == "cpu" and config.fused_kernels \
            else None
        self.forward = LlamaForward(mc, rope, memory.scratch)
        self.forward.weights = own_weights
        self.runner = ModelRunner(self.forward, memory.kv, self.device, kernel)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(config.seed)

    def _private_memory(self, weights: dict[str, torch.Tensor] | None
                        ) -> tuple[EngineMemory, LlamaWeights]:
        """A one-model arena: `kv_cache_bytes` of KV slabs and one slot with these weights."""
        if weights is None:
            raise ValueError("a standalone engine needs weights (or a worker's memory)")
        layout = ModelLayout.of(self.model_id, self.model_config, self.dtype,
                                tied=is_tied(self.model_config, weights))
        self._worker_memory = WorkerMemory([layout], self.device, MemoryConfig(prefetch=False),
                                           self.config.kv_cache_bytes, num_slots=1)
        slot = self._worker_memory.slots[0][: layout.index.nbytes]
        pack_llama(self.model_config, weights, layout.index, slot)
        bound = bind_llama(self.model_config, layout.index, slot)
        return self._worker_memory.engine_memory(self.model_id), bound

    def bind(self, weights: LlamaWeights | None) -> None:
        """Point the model at weights in a worker's slot (None: the model is switched out)."""
        self.forward.weights = weights

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
        seq = self._take(request_id)
        if seq is not None:
            self._finish(seq)
        return seq is not None

    def _take(self, request_id: str) -> Sequence | None:
        """Remove the request from whichever queue holds it."""
        for queue in (self.waiting, self.running, self.swapped):
            for seq in queue:
                if seq.seq_id == request_id:
                    queue.remove(seq)
                    return seq
        return None

    def export_sequence(self, request_id: str) -> kv_handoff.SequenceHandoff:
        """Hand the request to another engine of this model (prefill here, decode there):
        its KV is copied to one host array, its pages freed, and it leaves this engine."""
        seq = self._take(request_id)
        if seq is None:
            raise KeyError(f"request {request_id!r} is not in this engine")
        handoff = kv_handoff.export_from(self, seq)
        self._finish(seq)
        return handoff

    def import_sequence(self, handoff: kv_handoff.SequenceHandoff) -> None:
        """Take over a request another engine of this model exported; it resumes decoding
        with its KV in place (see kv_handoff.import_into for when pages are short)."""
        kv_handoff.import_into(self, handoff)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

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
        self._swap_in_ready()
        decodes = self._reserve_decodes()
        # Swapped-out sequences come back before new prompts start, so none starves.
        prefills = [] if self.swapped else self._admit_prefills(len(decodes))
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
        """Swap the sequence's KV out to the host if there is room, else recompute it later."""
        self.num_preemptions += 1
        seq.num_preemptions += 1
        if self.swapper is not None and self.swapper.can_swap_out(seq.seq_id):
            self._swap_out(seq)
            return
        self.blocks.free(seq.seq_id)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def _swap_out(self, seq: Sequence) -> int:
        moved = self.swapper.swap_out(seq.seq_id)
        seq.status = SeqStatus.SWAPPED
        self.swapped.appendleft(seq)
        return moved

    def _swap_in_ready(self) -> None:
        """Bring swapped sequences back, oldest first, while pages (and one to grow) allow."""
        while self.swapped and len(self.running) < self.config.max_num_seqs:
            seq = self.swapped[0]
            if not self.swapper.can_swap_in(seq.seq_id, headroom=1):
                break
            self.swapped.popleft()
            self.swapper.swap_in(seq.seq_id)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)

    def swap_out(self, request_ids: list[str] | None = None) -> int:
        """Move running requests' KV to host slabs (all of them by default); bytes moved.

        Used at the end of a model's turn when another batch needs the device pages. The
        requests resume, swapped back in, on a later step of this engine.
        """
        if self.swapper is None:
            return 0
        wanted = None if request_ids is None else set(request_ids)
        moved = 0
        for seq in list(self.running):
            if (wanted is None or seq.seq_id in wanted) and self.swapper.can_swap_out(seq.seq_id):
                self.running.remove(seq)
                moved += self._swap_out(seq)
        return moved

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
        if self.swapper is not None:
            self.swapper.drop(seq.seq_id)
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
