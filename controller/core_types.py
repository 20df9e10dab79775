"""What goes into the controller core and what comes out of it, besides the workers' protocol
(gpu_pool/protocol.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tokenpool.sampling import SamplingParams
from tokenpool.schedulers.types import SLO, RequestInfo


@dataclass(frozen=True, slots=True)
class Arrival:
    """A request at the door: what the policy sees of it, and what a worker needs to start
    it (`prompt`: its token ids and sampling parameters; None in simulation)."""

    info: RequestInfo
    slo: SLO
    prompt: tuple[tuple[int, ...], SamplingParams] | None = None


@dataclass(frozen=True, slots=True)
class WorkerLost:
    """A worker died during a job. `streamed`: every request whose client is still waiting
    -> the tokens that client has; a request not in it has had its end (or was cancelled)."""

    worker: int
    error: str
    streamed: Mapping[str, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class WorkerJoined:
    """A worker takes jobs: back after a failure (restarted, perhaps on another node), or
    up for the first time after the core asked the pool to grow."""

    worker: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """Admission's answer to a request it sheds: the request's first and only event."""

    request_id: str
    reason: str
    retry_after_s: float


@dataclass(frozen=True, slots=True)
class Failed:
    """The request ends with an error (its client gets it as its final event)."""

    request_id: str
    message: str


@dataclass(slots=True)  # not frozen: one is built per step, and frozen init costs twice
class CoreStep:
    """What one step decided: jobs to start, events for clients, requests now forgotten,
    and how the pool changes."""

    jobs: list  # gpu_pool.protocol.JobInput
    events: list  # Rejected | Failed
    ended: list[str]
    scale: list = field(default_factory=list)  # schedulers.scaling Grow | Retire, for the pool


@dataclass(slots=True)
class Tracked:
    """A request the core holds, until the policy has forgotten it."""

    arrival: Arrival
    admitted: float  # on the core's clock
    worker: int | None = None  # where its state lives, once a job took it
    decoding: bool = False  # past prefill
    retries: int = 0  # times it was started again after losing its worker
    resumed: tuple[int, ...] = ()  # the tokens its client had when it was last retried
