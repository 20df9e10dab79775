"""Session fixtures for the models tests: the real SmolLM2 GGUF, loaded once by us and by HF.

Import the fixtures into a test module with `from fixtures_models import *`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenpool.models import Tokenizer, smollm2_gguf_path
from tokenpool.models.synth import smollm2_tokenizer
from helpers import parse_gguf_once

__all__ = [
    "hf_smollm2_model", "hf_smollm2_tokenizer", "llama_cpp_permute", "smollm2_checkpoint",
    "smollm2_path", "smollm2_tok",
]


@pytest.fixture(scope="session")
def smollm2_path():
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2):
    return smollm2  # conftest's session-wide load


@pytest.fixture(scope="session")
def smollm2_tok() -> Tokenizer:
    return smollm2_tokenizer()


@pytest.fixture(scope="session")
def hf_smollm2_model(hf_smollm2):
    return hf_smollm2  # conftest's session-wide HF reference


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path):
    transformers = pytest.importorskip("transformers")
    with parse_gguf_once():
        return transformers.AutoTokenizer.from_pretrained(
            smollm2_path.parent, gguf_file=smollm2_path.name)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's Q/K permutation (HF half-split rows -> interleaved pairs)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))
