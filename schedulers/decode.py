"""Token-level decode: weighted round robin with SLO-derived time quotas (DESIGN §3.2).

A decode worker holds its requests in FCFS order. At the start of each round they are cut
into batches, one model each (a model whose requests do not fit the KV budget becomes
several batches), and every batch gets a quota from `round_quotas`. Each batch then takes one
turn: its KV comes back if it was swapped out, the model is switched in (prefetched during
the previous turn, the last turn of a round included), it decodes for its quota, and its KV
is swapped out if other batches share the round. A request that arrives mid-round joins its
model's turn if that is still ahead, else waits for the next round.

A request whose model no worker holds goes to the worker whose next round would then have
the lowest alpha: with TBT SLOs tight, a decode worker fits only a few batches a round, so
what balances load is the number and weight of the models each worker serves.

A real worker times its turns; each worker keeps a smoothed ratio of measured to predicted
step time (`slowdown`). A worker's rounds are planned with it, admission asks for the measured
alpha (`alpha_with(..., measured=True)`), and placement ranks workers by the profile's: an
idle worker is never measured again, so ranking by measured steps would starve one once seen
slow.
"""

from __future__ import annotations

import math
import random

from tokenpool.schedulers.cost import CostModel
from tokenpool.schedulers.decode_batches import (
    DecodeRequest, DecodeWorker, Turn, join_turn, live_turn, measured_slowdown, next_model,
    next_round_alpha, plan_round)
from tokenpool.schedulers.quota import ALPHA_FLOOR, Q_MAX_S
from tokenpool.schedulers.choices import candidates
from tokenpool.schedulers.types import (
    Decode, Job, Prefetch, RequestInfo, SwapIn, SwapOut, Switch)


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
        self.draining: set[int] = set()  # what they hold runs there; nothing new comes
        self.pen: list[DecodeRequest] = []  # prefilled while no worker took new requests
        # Spill hot models off overloaded holders, once a worker joined the pool: a fixed
        # pool measured better keeping them where they are (docs/elastic.md, "Spill").
        self.spill = False
        self._all = list(self.workers.values())
        self._rng = random.Random(seed)

    # -- membership (the elastic pool; protocol.Scheduler) -----------------------------------

    def add_worker(self, worker: int) -> None:
        self.draining.discard(worker)
        if worker not in self.workers:
            self.workers[worker] = DecodeWorker(worker)
            self.spill = True
        self._refresh()
        pen, self.pen = self.pen, []
        for r in pen:
            self.place(r.request_id, r.model, r.context, r.tbt_slo)

    def drain_worker(self, worker: int) -> None:
        if worker in self.workers:
            self.draining.add(worker)
            self._refresh()

    def remove_worker(self, worker: int) -> None:
        """Forget `worker`. Requests still there never decoded there (the core reports the
        others finished first): their KV is with the controller, so they go elsewhere."""
        w = self.workers.pop(worker, None)
        if w is None:
            return
        self.draining.discard(worker)
        self._refresh()
        left = list(w.requests.values())
        for r in left:
            self._remove(w, r.request_id)
        for model in [m for m, ids in self.upcoming.items() if worker in ids]:
            self.upcoming[model].discard(worker)
            if not self.upcoming[model]:
                del self.upcoming[model]
        for r in left:
            self.place(r.request_id, r.model, r.context, r.tbt_slo)

    def _refresh(self) -> None:
        self._all = [w for w in self.workers.values() if w.worker not in self.draining]

    def load(self, worker: int) -> float:
        """The alpha of a round of `worker`'s current requests, without the 0.5 floor, at
        its measured step times (0: it holds none)."""
        w = self.workers.get(worker)
        if w is None or not w.tokens:
            return 0.0
        return next_round_alpha(w, self.cost, self.q_max_s, w.slowdown, 0.0)

    # -- placement ---------------------------------------------------------------------------

    def place(self, request_id: str, model: str, context: int, tbt_slo: float,
              local: int | None = None) -> int | None:
        """Give a prefilled request to a decode worker; returns the worker.

        `local`: the worker that prefilled it, when it also decodes (colocated roles): the KV
        is already there. Otherwise prefer a worker already decoding the model with KV room
        (no extra batch per round); else the worker whose next round, with this request,
        would have the lowest alpha. Its KV arrives through the host, as a swap-in on its
        first turn. None: no worker takes new requests (all draining or down); it waits.

        Once workers have joined (`spill`), a holder whose next round with the request would
        miss its TBT SLO (alpha > 1) gives way to the lightest worker, if that one's would
        not: else the workers there first keep every model they hold, and one that joins
        gets none of them.
        """
        if local in self.workers:
            self._add(self.workers[local], DecodeRequest(request_id, model, context, tbt_slo))
            return local
        # A batch of the model still to take its turn this round: the request joins it and
        # decodes within this round instead of waiting for the next one.
        upcoming = self._fitting(self.upcoming.get(model), model, context)
        held = upcoming or self._fitting(self.holders.get(model), model, context)
        choices = held or candidates(self._all, self._rng)
        if not choices:
            self.pen.append(DecodeRequest(request_id, model, context, tbt_slo, resident=False))
            return None
        if len(choices) == 1:
            target = choices[0]
        else:
            target = min(choices, key=lambda w: (self._alpha_with(w, model, context, tbt_slo),
                                                 len(w.requests), w.worker))
        if held and self.spill and self._alpha_with(target, model, context, tbt_slo) > 1.0:
            lighter = min(candidates(self._all, self._rng), key=lambda w: (
                self._alpha_with(w, model, context, tbt_slo), len(w.requests), w.worker))
            if self._alpha_with(lighter, model, context, tbt_slo) <= 1.0:
                target, upcoming = lighter, []
        self._add(target, DecodeRequest(request_id, model, context, tbt_slo, resident=False))
        if upcoming:
            join_turn(target, model, request_id)
        return target.worker

    def _fitting(self, ids: set[int] | None, model: str, context: int) -> list[DecodeWorker]:
        """The workers `ids` whose KV room for `model` takes `context` more tokens."""
        if not ids:
            return []
        capacity = self.cost.kv_capacity_tokens(model)
        workers, draining = self.workers, self.draining
        return [workers[i] for i in (sorted(ids) if len(ids) > 1 else ids)
                if workers[i].tokens.get(model, 0) + context <= capacity
                and i not in draining]

    def alpha_with(self, worker: int, req: RequestInfo, tbt_slo: float,
                   measured: bool = False, floor: float = ALPHA_FLOOR) -> float:
        """The next-round alpha of `worker` with prefilled `req` added; 0 if it decodes not.
        `measured`: with step times as the worker's turns have lately run, not as profiled.
        `floor=0`: below the 0.5 floor too, to compare lightly loaded workers."""
        w = self.workers.get(worker)
        if w is None:
            return 0.0
        return self._alpha_with(w, req.model, req.prompt_len + 1, tbt_slo,
                                w.slowdown if measured else 1.0, floor)

    def predicted_alpha(self, req: RequestInfo, tbt_slo: float,
                        worker: int | None = None) -> float:
        """Admission's alpha for `req`: the next round's of `worker` (colocated roles: where
        it would prefill, and so decode), else of the best decode worker, with step times as
        each worker's turns have lately run."""
        if worker is not None and worker in self.workers:
            return self.alpha_with(worker, req, tbt_slo, measured=True)
        return min((self.alpha_with(w.worker, req, tbt_slo, measured=True) for w in self._all),
                   default=math.inf)

    def slowdown(self, worker: int) -> float:
        """How much slower than the cost model `worker` has been stepping: measured on its
        decode turns; 1 for a worker that does not decode (prefill-only)."""
        w = self.workers.get(worker)
        return 1.0 if w is None else w.slowdown

    def _alpha_with(self, w: DecodeWorker, model: str, context: int, tbt_slo: float,
                    slowdown: float = 1.0, floor: float = ALPHA_FLOOR) -> float:
        """The alpha of the worker's next round if it also held this request."""
        return next_round_alpha(w, self.cost, self.q_max_s, slowdown, floor,
                                (model, context, tbt_slo))

    def _add(self, w: DecodeWorker, r: DecodeRequest) -> None:
        w.requests[r.request_id] = r
        w.tokens[r.model] = w.tokens.get(r.model, 0) + r.context
        w.counts[r.model] = w.counts.get(r.model, 0) + 1
        w.tbt[r.model] = min(w.tbt.get(r.model, r.tbt_slo), r.tbt_slo)
        w.kv_bytes += self.cost.kv_bytes(r.model, r.context)
        self.holders.setdefault(r.model, set()).add(w.worker)
        self.active.add(w.worker)

    def _remove(self, w: DecodeWorker, request_id: str) -> None:
        r = w.requests.pop(request_id)
        left = w.tokens[r.model] - r.context
        w.counts[r.model] -= 1
        w.kv_bytes -= self.cost.kv_bytes(r.model, r.context)
        if w.counts[r.model]:
            w.tokens[r.model] = left
        else:
            del w.tokens[r.model], w.counts[r.model], w.tbt[r.model]
            self.holders[r.model].discard(w.worker)
            if not self.holders[r.model]:
                del self.holders[r.model]
        if not w.requests:
            self.active.discard(w.worker)

    # -- rounds and turns --------------------------------------------------------------------

    def next_job(self, worker: int) -> Job | None:
        w = self.workers[worker]
        turns = w.turns
        if not turns:
            turns = w.turns = plan_round(w, self.cost, self.q_max_s, self.max_batch_size)
            if not turns:
                return None
            upcoming = self.upcoming
            for turn in turns:
                upcoming.setdefault(turn.model, set()).add(worker)
        while turns:
            turn = live_turn(w, turns.pop(0))
            model = turn.model
            for t in turns:
                if t.model == model:
                    break
            else:  # the model's last turn of the round
                ahead = self.upcoming[model]
                ahead.discard(worker)
                if not ahead:
                    del self.upcoming[model]
            if turn.request_ids:
                return Job(worker, tuple(self._turn_units(w, turn)))
        # The round's remaining turns all ended early: the next round starts now.
        return self.next_job(worker) if w.requests else None

    def _turn_units(self, w: DecodeWorker, turn: Turn) -> list:
        units: list = []
        requests, worker, model = w.requests, w.worker, turn.model
        # At the turn's end the batch's KV goes to host slabs only if other batches of the
        # round need the room (DESIGN §3.2); usually every batch's KV fits at once.
        swap_out = bool(w.turns) and w.kv_bytes > self.cost.kv_capacity_bytes
        away = []
        for request_id in turn.request_ids:
            r = requests[request_id]
            if not r.resident:
                away.append(request_id)
            r.resident = not swap_out
        if away:
            units.append(SwapIn(worker, model, tuple(away)))
        if w.model != model:
            units.append(Switch(worker, model))
            w.model = model
        upcoming = next_model(w, model)
        if upcoming is not None:
            units.append(Prefetch(worker, upcoming))
        units.append(Decode(worker, model, turn.request_ids, turn.quota_s))
        if swap_out:
            units.append(SwapOut(worker, model, turn.request_ids))
        return units

    # -- results -----------------------------------------------------------------------------

    def decoded(self, worker: int, request_ids: tuple[str, ...], steps: int,
                finished: tuple[str, ...], seconds: float = 0.0) -> None:
        """A turn's result; `seconds` (0: not measured) is what its `steps` took."""
        w = self.workers[worker]
        if seconds > 0.0 and steps:
            w.slowdown = measured_slowdown(w, request_ids, seconds / steps,
                                           self.cost.decode_step_time)
        done = set(finished)
        requests = w.requests
        grown: dict[str, int] = {}  # tokens added per model (a turn's requests share one)
        for request_id in request_ids:
            if request_id in done:
                self._remove(w, request_id)
            else:
                r = requests[request_id]
                r.context += steps
                grown[r.model] = grown.get(r.model, 0) + steps
        for model, tokens in grown.items():
            w.tokens[model] += tokens
            w.kv_bytes += self.cost.kv_bytes(model, tokens)
