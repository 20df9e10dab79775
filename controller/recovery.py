"""A dead worker's requests (DESIGN §7): each starts again from its prompt plus the tokens its
client already has, or, once lost too often, ends with an explicit error.

The policy hears of every lost request as finished, so it forgets the request wherever it
held it (a prefill queue, a decode batch, a turn still to come, host slabs of the dead
worker), then gets it again as a new request: its prompt is the old prompt plus those tokens,
its budget what is left of max_tokens. A worker recomputes their KV in one prefill
(`JobInput.resumed`) and goes on from the next token, so the client sees a pause, never a
repeated or a missing token. Only the scheduler's view is a longer prompt: the engine keeps
prompt and output apart, so usage counts, stop strings and the detokenizer run on as before.

Bounds: a request survives MAX_RETRIES losses; the next ends it with an error. Each try ends
when its job does or when its worker is reported lost, which every pool bounds (LocalPool
rebuilds the worker at once; RayPool waits at most `restart_timeout_s` for the actor).
"""

from __future__ import annotations

from tokenpool.schedulers.types import DecodeDone, Job, Prefill, PrefillDone, RequestInfo

MAX_RETRIES = 2


def finished_results(worker: int, job: Job | None, lost: list[str], requests: dict) -> list:
    """Results that tell the policy each lost request finished: a PrefillDone for those the
    dead job was prefilling (the policy still waits on that unit), a zero-step DecodeDone for
    the rest (decoding there, or swapped out there)."""
    prefilling = {rid for unit in (job.units if job else ()) if type(unit) is Prefill
                  for rid in unit.request_ids}
    results = []
    for rid in lost:
        model = requests[rid].arrival.info.model
        if rid in prefilling:
            results.append(PrefillDone(worker, model, (rid,), (rid,)))
        else:
            results.append(DecodeDone(worker, model, (rid,), 0, (rid,)))
    return results


def retry_info(tracked, page_names=None) -> RequestInfo:
    """The request as the policy sees its next try: the tokens streamed so far are prompt,
    and so are named with it (`page_names`, a PageNamer; None: as on the first try)."""
    info, done = tracked.arrival.info, len(tracked.resumed)
    names = info.page_hashes
    prompt = tracked.arrival.prompt
    if page_names is not None and prompt is not None:
        names = page_names.extended(info.model, names, (*prompt[0], *tracked.resumed))
    return RequestInfo(info.request_id, info.model, info.prompt_len + done, tracked.admitted,
                       info.max_tokens - done, names)


def give_up_message(worker: int, error: str) -> str:
    return (f"worker {worker} failed ({error}); the request was lost with a worker "
            f"{MAX_RETRIES + 1} times and is not retried again")
