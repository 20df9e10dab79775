"""A request can end outside its own turn: on a colocated worker a prefill job steps every
running request of its model, so a decoding request may finish during it (the runner then
reports it in that job's results). The policy must forget it everywhere, pending turns of
the round included, and keep scheduling the rest.
"""

from __future__ import annotations

from test_schedulers import cost, req

from tokenpool.schedulers.registry import Roles, make_scheduler
from tokenpool.schedulers.types import SLO, Decode, DecodeDone, Prefill, PrefillDone


def units_of(jobs, kind):
    return [u for job in jobs for u in job.units if type(u) is kind]


def test_a_finish_reported_by_a_prefill_job_drops_the_request_from_pending_turns():
    s = make_scheduler("token-level", Roles((0,), (0,)), cost(), lambda m: SLO(10, 0.1),
                       q_max_s=0.05)
    for i, model in enumerate(["a", "b", "a"]):
        s.add_request(req(i, model), 0.0)
    # Prefill everything (one group per model); then a round holds turns for a and b.
    while True:
        (job,) = s.schedule({0}, 0.1)
        prefills = units_of([job], Prefill)
        if not prefills:
            break
        s.update([PrefillDone(0, u.model, u.request_ids, ()) for u in prefills], 0.1)
    (turn,) = units_of([job], Decode)
    # The first turn runs; meanwhile (as a colocated prefill would) the other pending
    # request of a later turn is reported finished with zero steps.
    s.update([DecodeDone(0, turn.model, turn.request_ids, 3, ())], 0.2)
    later = "r1" if turn.model == "a" else "r0"  # a request of the other model's turn
    s.update([DecodeDone(0, "b" if later == "r1" else "a", (later,), 0, (later,))], 0.2)
    seen = set()
    for t in range(20):  # the rest is served; nothing names the finished request again
        jobs = s.schedule({0}, 0.3 + t)
        for u in units_of(jobs, Decode):
            assert later not in u.request_ids
            seen.update(u.request_ids)
            s.update([DecodeDone(0, u.model, u.request_ids, 1, u.request_ids)], 0.3 + t)
        if not s.num_unfinished():
            break
    assert s.num_unfinished() == 0
