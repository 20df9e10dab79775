"""Hands token events from the controller's threads to the event loop, a burst at a time.

The controller calls a request's sink once per token, from the thread that received a step's
outputs: one step of a batch of 32 is 32 calls. `loop.call_soon_threadsafe` per call would
wake the loop (a write to its self-pipe) and schedule a callback per token. The mailbox
queues (queue, event) pairs and wakes the loop only when nothing is pending, so a step's
events cost one wake-up and one callback.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque


class LoopMailbox:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._pending: deque = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, item) -> None:
        """From any thread: `queue.put_nowait(item)` on the loop, in posting order."""
        with self._lock:
            self._pending.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is left to read the queue
            with self._lock:
                self._pending.clear()
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, deque()
            self._scheduled = False
        for queue, item in batch:
            queue.put_nowait(item)

