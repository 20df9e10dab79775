"""What the edge needs to know of each served model, without touching a worker."""

from __future__ import annotations

from dataclasses import dataclass

from tokenpool.memory.block_manager import BLOCK_SIZE
from tokenpool.schedulers.types import SLO


@dataclass(frozen=True, slots=True)
class ModelCard:
    id: str
    tokenizer: object  # models.Tokenizer
    max_model_len: int  # prompt plus generated tokens
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    slo: SLO
    created: int  # unix time the server loaded it (OpenAI's `created`)


def build_catalog(fleet, models, created: int) -> dict[str, ModelCard]:
    """One card per fleet model; `models` is the fleet's gpu_pool.fleet_weights.FleetModels."""
    cards = {}
    for spec in fleet.models:
        layout = models.layouts[spec.id]
        config = layout.config
        kv_tokens = fleet.engine.kv_cache_bytes // layout.page_shape.page_bytes * BLOCK_SIZE
        limit = min(fleet.engine.max_model_len or config.max_position_embeddings,
                    config.max_position_embeddings, kv_tokens)
        cards[spec.id] = ModelCard(spec.id, models.tokenizers[spec.id], limit, config.vocab_size,
                                   tuple(config.eos_token_ids), fleet.slo_of(spec.id), created)
    return cards
