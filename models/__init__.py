"""tokenpool.models: checkpoints (HF layout and GGUF), tokenizers and streaming detokenization."""

from tokenpool.models.checkpoint import Checkpoint, load_checkpoint
from tokenpool.models.config import ModelConfig
from tokenpool.models.detokenizer import IncrementalDetokenizer
from tokenpool.models.locate import resolve_source, smollm2_gguf_path
from tokenpool.models.synth import parse_shape, write_synthetic_checkpoint
from tokenpool.models.tokenizer import Tokenizer

__all__ = [
    "Checkpoint",
    "IncrementalDetokenizer",
    "ModelConfig",
    "Tokenizer",
    "load_checkpoint",
    "parse_shape",
    "resolve_source",
    "smollm2_gguf_path",
    "write_synthetic_checkpoint",
]
