"""A decode worker's state, how a round is cut into batches, what a round costs (its turns'
quotas, its alpha), and how a worker's measured steps correct the cost model's (pure: the
decode policy calls them with its own state)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.quota import ALPHA_FLOOR, round_alpha, round_quotas

# The cost model is fitted on an idle machine; a loaded one (the frontend and its clients
# share the CPUs, a GPU shares its host) steps slower. Each measured turn moves a worker's
# slowdown this far towards what it saw, within SLOWDOWN_RANGE so one stalled turn cannot
# close the worker to new requests for long.
SLOWDOWN_SMOOTHING = 0.2
SLOWDOWN_RANGE = (0.5, 4.0)


@dataclass(slots=True)
class DecodeRequest:
    request_id: str
    model: str
    context: int  # prompt plus tokens so far
    tbt_slo: float
    resident: bool = True  # its KV is on the worker, not swapped out


@dataclass(frozen=True, slots=True)
class Turn:
    model: str
    request_ids: tuple[str, ...]
    quota_s: float


@dataclass(slots=True)
class DecodeWorker:
    worker: int
    requests: dict[str, DecodeRequest] = field(default_factory=dict)  # insertion = FCFS
    turns: list[Turn] = field(default_factory=list)  # what is left of the current round
    model: str | None = None
    alpha: float = 0.0  # of the last round: > 1 means overloaded
    turn_s: float = 0.0  # the last round's longest quota: one turn, not preempted
    tokens: dict[str, int] = field(default_factory=dict)  # KV tokens held per model
    counts: dict[str, int] = field(default_factory=dict)  # requests held per model
    tbt: dict[str, float] = field(default_factory=dict)  # per model: its requests' tightest
    kv_bytes: int = 0  # KV bytes of all its requests, kept up to date (checked every turn)
    slowdown: float = 1.0  # measured over predicted step time, smoothed over its turns


@dataclass(slots=True)
class Batch:
    """A batch of a round in the making: one model's requests, in FCFS order."""

    model: str
    requests: list[DecodeRequest]
    tokens: int  # their context, summed
    tbt_slo: float  # the tightest of theirs


def fcfs_batches(requests: Iterable, kv_capacity_tokens: Callable[[str], int],
                 max_batch_size: int) -> list[Batch]:
    """FCFS per model, cut where the KV budget or the batch size would be exceeded."""
    open_batch: dict[str, Batch] = {}
    batches: list[Batch] = []
    for r in requests:
        model = r.model
        batch = open_batch.get(model)
        if batch is None or len(batch.requests) >= max_batch_size or \
                batch.tokens + r.context > kv_capacity_tokens(model):
            batch = open_batch[model] = Batch(model, [], 0, r.tbt_slo)
            batches.append(batch)
        batch.requests.append(r)
        batch.tokens += r.context
        if r.tbt_slo < batch.tbt_slo:
            batch.tbt_slo = r.tbt_slo
    return batches


def plan_round(w: DecodeWorker, cost: CostModel, q_max_s: float,
               max_batch_size: int) -> list[Turn]:
    """`w`'s next round: its requests cut into batches, each a turn with its quota (none: it
    holds no requests). Sets the round's alpha and longest quota on `w`."""
    batches = fcfs_batches(w.requests.values(), cost.kv_capacity_tokens, max_batch_size)
    if not batches:
        return []
    # In round order, not a set's: string hashes differ between processes, and so would
    # the last bit of a float sum taken in hash order.
    models = list(dict.fromkeys(b.model for b in batches))
    switch = sum(cost.switch_time(m) for m in models) \
        if len(models) > 1 or w.model not in models else 0.0
    # A turn decodes for its quota in seconds, so steps slower than the profile's give
    # fewer tokens and gaps `slowdown` times the planned ones: plan with the steps as
    # this worker's turns have lately run. A worker never measured plans by the profile.
    step_time, slowdown = cost.decode_step_time, w.slowdown
    steps = [step_time(b.model, len(b.requests), b.tokens) * slowdown for b in batches]
    quotas = round_quotas(steps, [b.tbt_slo for b in batches], switch, q_max_s)
    w.alpha = quotas.alpha
    w.turn_s = max(quotas.quotas)
    return [Turn(b.model, tuple(r.request_id for r in b.requests), q)
            for b, q in zip(batches, quotas.quotas)]


def next_round_alpha(w: DecodeWorker, cost: CostModel, q_max_s: float,
                     slowdown: float = 1.0, floor: float = ALPHA_FLOOR,
                     joining: tuple[str, int, float] | None = None) -> float:
    """The alpha of `w`'s next round, one batch per model of its current requests, with
    step times `slowdown` times the profile's; `joining` (model, context, TBT SLO): as if it
    also held that request. Not its last round's alpha, which is stale (an emptied worker
    keeps the alpha of its last busy round). `w` must hold a request or be joined by one."""
    model, context, tbt_slo = joining or (None, 0, 0.0)
    step_time = cost.decode_step_time
    steps, slos = [], []
    for m, tokens in w.tokens.items():
        count, tbt = w.counts[m], w.tbt[m]
        if m == model:
            count, tokens, tbt = count + 1, tokens + context, min(tbt, tbt_slo)
        steps.append(step_time(m, count, tokens) * slowdown)
        slos.append(tbt)
    models = list(w.tokens)
    if model is not None and model not in w.tokens:
        steps.append(step_time(model, 1, context) * slowdown)
        slos.append(tbt_slo)
        models.append(model)
    # A lone model switches in once, not every round.
    switch = sum(map(cost.switch_time, models)) if len(models) > 1 else 0.0
    return round_alpha(steps, slos, switch, q_max_s, floor)


def smoothed_slowdown(current: float, measured_step_s: float, predicted_step_s: float) -> float:
    """`current` moved towards one turn's measured/predicted step time, within the range."""
    low, high = SLOWDOWN_RANGE
    seen = min(max(measured_step_s / predicted_step_s, low), high)
    return current + SLOWDOWN_SMOOTHING * (seen - current)


def measured_slowdown(w: DecodeWorker, request_ids: tuple[str, ...], step_s: float,
                      decode_step_time: Callable[[str, int, int], float]) -> float:
    """`w`'s slowdown after a turn of `request_ids` whose steps took `step_s` each; as it
    was if none of them is left to predict the step time from."""
    batch = [w.requests[r] for r in request_ids if r in w.requests]
    if not batch:
        return w.slowdown
    predicted = decode_step_time(batch[0].model, len(batch), sum(r.context for r in batch))
    return smoothed_slowdown(w.slowdown, step_s, predicted)


def join_turn(w: DecodeWorker, model: str, request_id: str) -> None:
    i = next(i for i, t in enumerate(w.turns) if t.model == model)
    turn = w.turns[i]
    w.turns[i] = Turn(model, turn.request_ids + (request_id,), turn.quota_s)


def live_turn(w: DecodeWorker, turn: Turn) -> Turn:
    """The turn without requests that ended outside it since the round began: a unit
    runs only its own requests, but requests lost with a dead worker are reported
    finished at once, whatever turn they were to decode in."""
    requests = w.requests
    if all(r in requests for r in turn.request_ids):
        return turn
    return Turn(turn.model, tuple(r for r in turn.request_ids if r in requests),
                turn.quota_s)


def next_model(w: DecodeWorker, current: str) -> str | None:
    """The model to prefetch during a turn of `current`: the next other model of this
    round, else the one the next round most likely opens with (rounds are FCFS, so the
    model of the oldest other request). Without the latter, every round boundary would
    pay a whole switch in the open."""
    for t in w.turns:
        if t.model != current:
            return t.model
    for r in w.requests.values():
        if r.model != current:
            return r.model
    return None
