"""What the edge needs to know of each served model, without touching a worker."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tokenpool.models.generation_defaults import model_defaults, read_generation_defaults
from tokenpool.sampling import SamplingDefaults
from tokenpool.schedulers.types import SLO


@dataclass(frozen=True, slots=True)
class ModelCard:
    id: str
    tokenizer: object  # models.Tokenizer
    max_model_len: int  # prompt plus generated tokens, as its engines take them
    kv_pages: int  # KV pages of its shape one worker holds (its engines' capacity)
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    slo: SLO
    created: int  # unix time the server loaded it (OpenAI's `created`)
    # What fills a request's omitted sampling values (fleet `defaults:` over the checkpoint's).
    defaults: SamplingDefaults = SamplingDefaults()


def build_catalog(fleet, models, created: int) -> dict[str, ModelCard]:
    """One card per fleet model; `models` is the fleet's gpu_pool.fleet_weights.FleetModels,
    which lays out a worker's memory as its workers do."""
    pages, limits = models.kv_pages(), models.max_model_lens()
    read_defaults = functools.cache(read_generation_defaults)  # aliases share one checkpoint
    cards = {}
    for spec in fleet.models:
        config = models.layouts[spec.id].config
        cards[spec.id] = ModelCard(
            spec.id, models.tokenizers[spec.id], limits[spec.id],
            pages[spec.id], config.vocab_size, tuple(config.eos_token_ids),
            fleet.slo_of(spec.id), created,
            model_defaults(spec.defaults, models.sources[spec.id], read=read_defaults))
    return cards
