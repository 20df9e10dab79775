"""KV handoffs between Ray workers that leave the serving process out of the data path.

A prefill actor puts each exported request's KV array into its node's object store and sends
the controller only the reference; the controller hands that reference on with the decode
job, and the decode actor reads the array itself: from its own node's store without a copy,
or pulled once by Ray's object manager from the prefill node. The serving process moves a
few hundred bytes per handoff instead of the KV twice (in from one actor, out to the other).

The object belongs to the prefill actor. If that actor dies before the decode actor reads
it, the read fails once Ray has noticed the death (a read just before that still gets the
intact bytes) and the request is recomputed from its tokens, as a handoff without KV is.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from tokenpool.gpu_pool.protocol import JobDone, JobInput

log = logging.getLogger(__name__)


def kv_by_reference(ray, done: JobDone) -> JobDone:
    """`done` with each handoff's KV array replaced by a reference to it in the object store."""
    if not done.handoffs:
        return done
    handoffs = {rid: dataclasses.replace(h, kv=ray.put(h.kv)) if h.num_pages else h
                for rid, h in done.handoffs.items()}
    return dataclasses.replace(done, handoffs=handoffs)


def kv_resolved(ray, job: JobInput) -> JobInput:
    """`job` with each handoff's KV read back from the object store; a handoff whose KV is
    lost (its exporter died) goes on without pages, so it is recomputed."""
    if not job.handoffs:
        return job
    handoffs = {}
    for rid, handoff in job.handoffs.items():
        kv = handoff.kv
        if isinstance(kv, ray.ObjectRef):
            try:
                kv = ray.get(kv)
            except ray.exceptions.RayError as exc:
                log.warning("request %s: its handed-off KV is lost (%s); recomputing it",
                            rid, type(exc).__name__)
                kv = np.empty((0, handoff.page_shape.page_bytes), dtype=np.uint8)
        handoffs[rid] = dataclasses.replace(handoff, kv=kv)
    return dataclasses.replace(job, handoffs=handoffs)
