"""Copies of packed weights from host memory into a device's weight slot.

On CPU a copy is one memcpy (torch's copy_ spreads it over the intra-op threads). On CUDA the
host cache is ordinary shared memory, not pinned, so a plain copy would go through the driver's
own small staging buffers. Instead chunks are memcpy'd into two pinned staging buffers in turn
and copied asynchronously on a side stream: the CPU fills one buffer while the DMA engine
drains the other. Events say when a staging buffer may be refilled, and a final event orders
the compute stream after the whole copy without blocking the host.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 32 << 20


class WeightCopier:
    def __init__(self, device: torch.device, chunk_bytes: int = CHUNK_BYTES):
        self.device = device
        self.chunk_bytes = chunk_bytes
        self._cuda = _CudaStaging(device, chunk_bytes) if device.type == "cuda" else None

    def copy(self, src: torch.Tensor, dst: torch.Tensor):
        """Copy host uint8 `src` into device uint8 `dst` (same size).

        Returns when the host side is done. On CUDA the device copies may still be in flight:
        it returns an event that compute must wait on (`wait`) before reading `dst`.
        """
        if src.numel() != dst.numel():
            raise ValueError(f"copy of {src.numel()} B into {dst.numel()} B")
        if self._cuda is None:
            dst.copy_(src)
            return None
        return self._cuda.copy(src, dst)

    def wait(self, done) -> None:
        """Order the current compute stream after a copy (no host blocking)."""
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)


class _CudaStaging:
    def __init__(self, device: torch.device, chunk_bytes: int):
        self.stream = torch.cuda.Stream(device)
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True)
                        for _ in range(2)]
        self.freed = [torch.cuda.Event() for _ in range(2)]

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> torch.cuda.Event:
        chunk = self.buffers[0].numel()
        # The side stream must not overwrite a slot the compute stream may still be reading.
        self.stream.wait_stream(torch.cuda.current_stream(dst.device))
        for i, start in enumerate(range(0, src.numel(), chunk)):
            n = min(chunk, src.numel() - start)
            k = i % 2
            self.freed[k].synchronize()  # the DMA from this buffer two chunks ago has finished
            self.buffers[k][:n].copy_(src[start:start + n])
            with torch.cuda.stream(self.stream):
                dst[start:start + n].copy_(self.buffers[k][:n], non_blocking=True)
                self.freed[k].record(self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        return done
