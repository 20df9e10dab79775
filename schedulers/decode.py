"""Token-level decode: weighted round robin with SLO-derived time quotas (DESIGN §3.2).

A decode worker holds its requests in FCFS order. At the start of each round they are cut
into batches, one model each (a model whose requests do not fit the KV budget becomes
several batches), and every batch gets a quota from `round_quotas`. Each batch then takes one
turn: its KV comes back if it was swapped out, the model is switched in (prefetched during
the previous turn), it decodes for its quota, and its KV is swapped out if other batches
share the round. Requests that arrive mid-round wait for the next round.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.quota import Q_MAX_S, round_quotas
from tokenpool.schedulers.choices import candidates
from tokenpool.schedulers.types import Decode, Job, Prefetch, SwapIn, SwapOut, Switch


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
    round_s: float = 0.0  # the last round's decode time (its quotas summed)
    tokens: dict[str, int] = field(default_factory=dict)  # KV tokens held per model


class WeightedRoundRobinDecode:
    def __init__(self, workers: list[int], cost: CostModel, q_max_s: float = Q_MAX_S,
                 max_batch_size: int = 256, seed: int = 0):
        self.cost = cost
        self.q_max_s = q_max_s
        self.max_batch_size = max_batch_size
        self.workers = {w: DecodeWorker(w) for w in workers}
        # Indexes that keep placement O(1) in the number of workers:
        self.holders: dict[str, set[int]] = {}  # model -> workers holding its requests
        self.upcoming: dict[str, set[int]] = {}  # model -> workers with its turn still ahead
        self.active: set[int] = set()  # workers with any request
        self._all = list(self.workers.values())
        self._rng = random.Random(seed)

    # -- placement ---------------------------------------------------------------------------

    def place(self, request_id: str, model: str, context: int, tbt_slo: float,
              local: int | None = None) -> int:
        """Give a prefilled request to a decode worker; returns the worker.

        `local`: the worker that prefilled it, when it also decodes (colocated roles): the KV
        is already there. Otherwise prefer a worker already decoding the model with KV room
        (no extra switch per round), the least loaded of those; else the least loaded worker.
        Its KV arrives through the host, as a swap-in on its first turn.
        """
        if local in self.workers:
            self._add(self.workers[local], DecodeRequest(request_id, model, context, tbt_slo))
            return local
        capacity = self.cost.kv_capacity_tokens(model)

        def fitting(ids) -> list[DecodeWorker]:
            return [self.workers[i] for i in sorted(ids)
                    if self.workers[i].tokens.get(model, 0) + context <= capacity]

        # A batch of the model still to take its turn this round: the request joins it and
        # decodes within this round instead of waiting for the next one.
        upcoming = fitting(self.upcoming.get(model, ()))
        choices = upcoming or fitting(self.holders.get(model, ())) or \
            candidates(self._all, self._rng)
        target = min(choices, key=lambda w: (w.alpha, len(w.requests), w.worker))
        self._add(target, DecodeRequest(request_id, model, context, tbt_slo, resident=False))
        if upcoming:
            self._join_turn(target, model, request_id)
        return target.worker

    def _add(self, w: DecodeWorker, r: DecodeRequest) -> None:
        w.requests[r.request_id] = r
        w.tokens[r.model] = w.tokens.get(r.model, 0) + r.context
        self.holders.setdefault(r.model, set()).add(w.worker)
        self.active.add(w.worker)

    def _remove(self, w: DecodeWorker, request_id: str) -> None:
        r = w.requests.pop(request_id)
        left = w.tokens[r.model] - r.context
        if left:
            w.tokens[r.model] = left
        else:
            del w.tokens[r.model]
            self.holders[r.model].discard(w.worker)
            if not self.holders[r.model]:
                del self.holders[r.model]
        if not w.requests:
            self.active.discard(w.worker)

    @staticmethod
    def _join_turn(w: DecodeWorker, model: str, request_id: str) -> None:
        i = next(i for i, t in enumerate(w.turns) if t.model == model)
        turn = w.turns[i]
        w.turns[i] = Turn(model, turn.request_ids + (request_id,), turn.quota_s)

    # -- rounds and turns --------------------------------------------------------------------

    def next_job(self, worker: int) -> Job | None:
        w = self.workers[worker]
        if not w.turns:
            w.turns = self._new_round(w)
            for turn in w.turns:
                self.upcoming.setdefault(turn.model, set()).add(worker)
        if not w.turns:
            return None
        while w.turns:
            turn = self._live(w, w.turns.pop(0))
            if not any(t.model == turn.model for t in w.turns):
                ahead = self.upcoming[turn.model]
                ahead.discard(worker)
                if not ahead:
                    del self.upcoming[turn.model]
            if turn.request_ids:
                return Job(worker, tuple(self._turn_units(w, turn)))
        # The round's remaining turns all ended early: the next round starts now.
        return self.next_job(worker) if w.requests else None

    @staticmethod
    def _live(w: DecodeWorker, turn: Turn) -> Turn:
        """The turn without requests that ended outside it since the round began (on a
        colocated worker a prefill job steps the model's running requests too)."""
        requests = w.requests
        if all(r in requests for r in turn.request_ids):
            return turn
        return Turn(turn.model, tuple(r for r in turn.request_ids if r in requests),
                    turn.quota_s)

    def _new_round(self, w: DecodeWorker) -> list[Turn]:
        batches = self._batches(w)
        if not batches:
            return []
        models = {m for m, _ in batches}
        switch = sum(self.cost.switch_time(m) for m in models) \
            if len(models) > 1 or w.model not in models else 0.0
        steps = [self.cost.decode_step_time(m, len(b), sum(r.context for r in b))
                 for m, b in batches]
        slos = [min(r.tbt_slo for r in b) for _, b in batches]
        quotas = round_quotas(steps, slos, switch, self.q_max_s)
        w.alpha = quotas.alpha
        w.round_s = sum(quotas.quotas)
        return [Turn(m, tuple(r.request_id for r in b), q)
                for (m, b), q in zip(batches, quotas.quotas)]

    def _batches(self, w: DecodeWorker) -> list[tuple[str, list[DecodeRequest]]]:
        """FCFS per model, cut where the KV budget or the batch size would be exceeded."""
        open_batch: dict[str, list[DecodeRequest]] = {}
        tokens: dict[str, int] = {}
        batches: list[tuple[str, list[DecodeRequest]]] = []
        for r in w.requests.values():
            batch = open_batch.get(r.model)
            capacity = self.cost.kv_capacity_tokens(r.model)
            if batch is None or len(batch) >= self.max_batch_size or \
                    tokens[r.model] + r.context > capacity:
                batch = open_batch[r.model] = []
                tokens[r.model] = 0
                batches.append((r.model, batch))
            batch.append(r)
            tokens[r.model] += r.context
        return batches

    def _turn_units(self, w: DecodeWorker, turn: Turn) -> list:
        units: list = []
        requests = w.requests
        # At the turn's end the batch's KV goes to host slabs only if other batches of the
        # round need the room (DESIGN §3.2); usually every batch's KV fits at once.
        swap_out = bool(w.turns) and self._kv_overcommitted(w)
        away = []
        for request_id in turn.request_ids:
            r = requests[request_id]
            if not r.resident:
                away.append(request_id)
            r.resident = not swap_out
        if away:
            units.append(SwapIn(w.worker, turn.model, tuple(away)))
        if w.model != turn.model:
            units.append(Switch(w.worker, turn.model))
            w.model = turn.model
        for t in w.turns:
            if t.model != turn.model:
                units.append(Prefetch(w.worker, t.model))
                break
        units.append(Decode(w.worker, turn.model, turn.request_ids, turn.quota_s))
        if swap_out:
            units.append(SwapOut(w.worker, turn.model, turn.request_ids))
        return units

    def _kv_overcommitted(self, w: DecodeWorker) -> bool:
        """Whether the KV of all the worker's requests exceeds the device's KV region."""
        used = sum(self.cost.kv_bytes(model, tokens) for model, tokens in w.tokens.items())
        return used > self.cost.kv_capacity_bytes

    # -- results -----------------------------------------------------------------------------

    def decoded(self, worker: int, request_ids: tuple[str, ...], steps: int,
                finished: tuple[str, ...]) -> None:
        w = self.workers[worker]
        done = set(finished)
        for request_id in request_ids:
            if request_id in done:
                self._remove(w, request_id)
            else:
                r = w.requests[request_id]
                r.context += steps
                w.tokens[r.model] += steps
