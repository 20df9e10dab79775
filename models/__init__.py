"""tokenpool.models: checkpoints (HF layout and GGUF), tokenizers and streaming detokenization."""

import importlib

# Names resolve on first use (PEP 562): importing a light submodule (families, config) must
# not pull in torch through checkpoint, or every CLI `--help` waits for it.
_HOME = {
    "Checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "ModelConfig": "config",
    "IncrementalDetokenizer": "detokenizer",
    "resolve_source": "locate", "smollm2_gguf_path": "locate",
    "parse_shape": "synth_shape", "write_synthetic_checkpoint": "synth",
    "Tokenizer": "tokenizer",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


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
