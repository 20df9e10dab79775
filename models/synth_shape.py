"""Synthetic model shapes: 'L,H,NH,NKV[,FFN]' parsed and checked. Apart from the checkpoint
writer (synth.py) so that the command line checks a shape without loading torch."""

from __future__ import annotations

SHAPE_FORMAT = "L,H,NH,NKV[,FFN] (layers, hidden size, attention heads, KV heads, FFN size)"
_FFN_RATIO = 1536 / 576  # SmolLM2's intermediate/hidden


def default_intermediate_size(hidden_size: int) -> int:
    return max(64, round(hidden_size * _FFN_RATIO / 64) * 64)


def parse_shape(spec: str) -> dict[str, int]:
    """'L,H,NH,NKV[,FFN]' -> keyword arguments for write_synthetic_checkpoint."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) not in (4, 5):
        raise ValueError(f"shape {spec!r}: expected {SHAPE_FORMAT}, e.g. '4,256,8,2'")
    names = ["num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size"]
    values = {}
    for name, part in zip(names, parts):
        try:
            values[name] = int(part)
        except ValueError:
            raise ValueError(f"shape {spec!r}: {name} must be an integer, got {part!r}") from None
    validate_shape(**values)
    return values


def validate_shape(num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int,
                   intermediate_size: int | None = None) -> None:
    sizes = dict(num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                 num_kv_heads=num_kv_heads)
    if intermediate_size is not None:
        sizes["intermediate_size"] = intermediate_size
    for name, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    if (hidden_size // num_heads) % 2:
        raise ValueError(f"head_dim = hidden_size / num_heads = {hidden_size // num_heads} must be "
                         "even (RoPE rotates pairs)")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
