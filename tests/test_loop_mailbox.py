"""The hand-off from controller threads to the event loop, and the merge of queued events."""

import asyncio
import threading

from tokenpool.controller.serving_types import TokenEvent
from tokenpool.proxy.loop_mailbox import LoopMailbox


def test_events_from_many_threads_arrive_in_each_threads_order():
    async def main():
        box = LoopMailbox(asyncio.get_running_loop())
        queues = [asyncio.Queue() for _ in range(4)]

        def produce(q):
            for i in range(500):
                box.post(q, i)

        threads = [threading.Thread(target=produce, args=(q,)) for q in queues]
        for t in threads:
            t.start()
        got = [[await q.get() for _ in range(500)] for q in queues]
        for t in threads:
            t.join()
        return got, [q.qsize() for q in queues]

    got, left = asyncio.run(main())
    assert got == [list(range(500))] * 4
    assert left == [0] * 4


def test_a_burst_wakes_the_loop_once(monkeypatch):
    async def main():
        loop = asyncio.get_running_loop()
        wakes = []
        real = loop.call_soon_threadsafe
        monkeypatch.setattr(loop, "call_soon_threadsafe",
                            lambda cb, *a: (wakes.append(cb), real(cb, *a))[1])
        box, q = LoopMailbox(loop), asyncio.Queue()
        threading.Thread(target=lambda: [box.post(q, i) for i in range(32)]).start()
        items = [await q.get() for _ in range(32)]
        return items, len(wakes)

    items, wakes = asyncio.run(main())
    assert items == list(range(32))
    assert 1 <= wakes < 32


def test_posting_to_a_closed_loop_drops_quietly():
    loop = asyncio.new_event_loop()
    box = LoopMailbox(loop)
    loop.close()
    box.post(asyncio.Queue(), "late")  # the request's reader is gone: nothing to raise to
    box.post(asyncio.Queue(), "later")


def test_followed_by_joins_tokens_and_keeps_the_last_state():
    first = TokenEvent("r", (1, 2), "ab", logprobs=(-0.1, -0.2), num_prompt_tokens=7,
                       num_output_tokens=2, emitted_at=1.0)
    last = TokenEvent("r", (3,), "c", finished=True, finish_reason="stop",
                      logprobs=(-0.3,), num_output_tokens=3, emitted_at=2.0)
    merged = first.followed_by(last)
    assert merged.token_ids == (1, 2, 3) and merged.text == "abc"
    assert merged.logprobs == (-0.1, -0.2, -0.3)
    assert merged.finished and merged.finish_reason == "stop"
    assert merged.num_prompt_tokens == 7 and merged.num_output_tokens == 3
    assert merged.emitted_at == 1.0
