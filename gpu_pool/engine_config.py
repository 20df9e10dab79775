"""The engine's settings (the `engine:` block of a fleet file) and its per-step output."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenpool.errors import ConfigError
from tokenpool.memory.quant_formats import check_mode

# The dtypes an engine runs in, by name; gpu_pool/device.py maps them to torch's. Names only
# here, so that reading a fleet file does not load torch.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    device: str = "cpu"
    dtype: str = "auto"
    # none: weights in `dtype` (a GGUF's quantized tensors dequantized); native: a GGUF's
    # quantized tensors kept as stored; int8 / int4: quantized once at load (quant_formats.py)
    quantization: str = "none"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    kv_cache_bytes: int = 1 << 30
    max_model_len: int | None = None  # defaults to the model's context length
    seed: int = 0  # for requests that bring no seed of their own
    fused_kernels: bool = True  # CPU: compiled paged decode attention (falls back if unbuildable)
    # Full KV pages named by their prefix and kept after their requests end, so a prompt
    # that repeats a cached prefix computes only the rest (memory/prefix_cache.py).
    prefix_caching: bool = True
    # A prompt longer than a step's token budget is computed in chunks that share steps with
    # running decodes; off: it runs alone in one step.
    chunked_prefill: bool = True
    # The most prompt tokens one prompt computes in a step (0: as many as the step's budget
    # leaves). A step's time grows with its chunk, and streams wait for the step, so this
    # bounds their gaps even where no decode of the prompt's own model is in the step.
    prefill_chunk_tokens: int = 0

    def __post_init__(self):
        # Checked when the fleet file loads, long before a checkpoint is read.
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype must be auto or one of {', '.join(DTYPE_NAMES)}; "
                              f"got {self.dtype!r}")
        check_mode(self.quantization)
        if self.prefill_chunk_tokens < 0:
            raise ConfigError(f"prefill_chunk_tokens must be >= 0, got "
                              f"{self.prefill_chunk_tokens}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
