"""Streams and events by integer id. On a machine without CUDA every verb is a no-op and
copies run in program order, so the same graph runs (and is tested) on a CPU."""
from __future__ import annotations

import contextlib

import torch

from kvc.ir.ops import COMPUTE, OFFLOAD, PREFETCH


class StreamSet:
    def __init__(self, device: torch.device, num_events: int):
        self.cuda = device.type == "cuda"
        if self.cuda:
            with torch.cuda.device(device):
                compute = torch.cuda.current_stream(device)
                self.streams = {COMPUTE: compute,
                                PREFETCH: torch.cuda.Stream(device),
                                OFFLOAD: torch.cuda.Stream(device)}
                self.events = [torch.cuda.Event() for _ in range(num_events)]
        else:
            self.streams, self.events = {}, []

    def use(self, stream: int):
        """Context in which copies are issued on `stream`."""
        if not self.cuda or stream == COMPUTE:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.streams[stream])

    def record(self, stream: int, event: int) -> None:
        if self.cuda:
            self.events[event].record(self.streams[stream])

    def wait(self, stream: int, event: int) -> None:
        if self.cuda:
            self.streams[stream].wait_event(self.events[event])

    def synchronize(self) -> None:
        """Block the host until every stream's work is done (before freeing what they copy)."""
        for stream in self.streams.values():
            stream.synchronize()

    def keep_alive(self, t: torch.Tensor, stream: int) -> None:
        """A tensor made on the compute stream and read on another must not be reused early."""
        if self.cuda and stream != COMPUTE:
            t.record_stream(self.streams[stream])
