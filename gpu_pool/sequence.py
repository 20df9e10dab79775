"""One request's state inside an engine. No torch at run time: the scheduler reads it too."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenpool.sampling import SamplingParams

if TYPE_CHECKING:
    import torch


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # KV pages on the host; resumes as a decode once they are back
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    detokenizer: object | None = None  # models.IncrementalDetokenizer when text is wanted
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    num_computed: int = 0  # leading tokens whose KV is in its pages
    num_cached: int = 0  # prompt tokens whose KV came from the prefix cache at admission
    page_names: list[int] = field(default_factory=list)  # prefix names of its full pages
    num_named: int = 0  # leading pages of its table that carry their name in the cache

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending(self) -> int:
        """Tokens to compute before it samples again: 1 for a decode, more mid-prompt."""
        return self.num_tokens - self.num_computed

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids
