"""Device and dtype resolution: the one place that asks what the hardware can do."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from tokenpool.errors import ConfigError
from tokenpool.gpu_pool.engine_config import DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """bfloat16 GEMMs beat float32 only with AVX512-BF16 or AMX (7x slower with AVX2 alone)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda[:N], got {name!r}")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' picks the fastest dtype that keeps accuracy: bf16 on GPUs and capable CPUs."""
    if name == "auto":
        if device.type == "cuda" or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    if name == "float16" and device.type == "cpu":
        raise ConfigError("float16 is not supported on cpu; use float32 or bfloat16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (for reports and cache keys)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
