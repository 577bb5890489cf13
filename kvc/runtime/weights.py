"""WeightStreamer: the weights of the Plan's weight-streamed layers live in pinned CPU memory.

Per streamed layer, one flat CPU pool holds the layer's streamed parameters back to back (all
of them, or the largest ones for a fraction: `streamed_parameters`; the rest stay on the GPU) (one
large contiguous copy per layer and step: DESIGN.md, "Weights on CPU are pinned and streamed
in large contiguous copies"); pinned only on CUDA, where it makes the copy a DMA. The layers'
pools are consecutive slices of one allocation (`flat`), pinned once with exactly its bytes
(kvc.runtime.pinned): one pinned block per layer would each be rounded up, 1.23 GB to 2 GB
for an OPT-30B layer. Two GPU
weight slots, each sized for the largest streamed layer, take turns: the k-th streamed layer
uses slot k % 2 (`Plan.weight_slot`, which the streams pass asks too).

At construction every parameter of a streamed layer is copied into its pool and its `.data`
is re-pointed to a view into the layer's slot, at the same offset as in the pool. The traced
graphs read parameters through the module tree (`call_module` / `get_attr`), so they need no
rewrite: whatever `prefetch_weights` last copied into the slot is what the layer computes
with, and the streams pass orders that copy before the layer's first node and the next
refill of the slot after its last.

One WeightStreamer owns a model's streamed layers: the model's parameters point into its
slots from then on (a ReferenceDecoder on the same module object would read the slots too).
A second one built on the same model copies from the first one's pools (each streamed
parameter keeps a view of its true values there), then takes the parameters over.
"""
from __future__ import annotations

import torch

from kvc.errors import KvcError
from kvc.plan import WEIGHT_SLOTS, Plan, streamed_prefix
from kvc.runtime.pinned import check_host_memory, pinned_empty
from kvc.runtime.streams import StreamSet

# set on a streamed parameter: its true values, a view into its layer's CPU pool
_SOURCE_ATTR = "_kvc_weight_source"


def _layer_module(root: torch.nn.Module, layer: int) -> torch.nn.Module:
    try:
        return root.get_submodule(f"layers.{layer}")
    except AttributeError:
        raise KvcError(f"weight streaming: the model has no module layers.{layer}") from None


def streamed_parameters(layer: torch.nn.Module, fraction: float) -> list:
    """The parameters of `layer` that stream for `fraction` of its elements: the largest first
    (ties by name), as kvc.plan.streamed_prefix rounds the scheduler's fraction."""
    named = sorted(layer.named_parameters(), key=lambda kv: (-kv[1].numel(), kv[0]))
    k = streamed_prefix([p.numel() for _, p in named], fraction)
    return [p for _, p in named[:k]]


class WeightStreamer:
    def __init__(self, plan: Plan, root: torch.nn.Module, device: torch.device):
        self.plan, self.device = plan, torch.device(device)
        self.layers = plan.streamed_layers
        params: dict[int, list] = {}
        dtype = None
        for i in self.layers:
            plist = streamed_parameters(_layer_module(root, i), plan.weights_streamed[i])
            if not plist:
                raise KvcError(f"weight streaming: layers.{i} has no parameters")
            kinds = {p.dtype for p in plist} | ({dtype} if dtype is not None else set())
            if len(kinds) != 1:
                raise KvcError(f"weight streaming: layers.{i} mixes parameter dtypes "
                               f"{sorted(map(str, kinds))}")
            dtype, params[i] = plist[0].dtype, plist
        dtype = dtype or torch.float32
        sizes = {i: sum(p.numel() for p in plist) for i, plist in params.items()}
        check_host_memory(sum(sizes.values()) * torch.empty((), dtype=dtype).element_size())
        self.flat = pinned_empty((sum(sizes.values()),), dtype, self.device)
        self.pools: dict[int, torch.Tensor] = {}
        layouts: dict[int, list] = {}
        start = 0
        for i, plist in params.items():
            pool = self.flat[start:start + sizes[i]]
            start += sizes[i]
            layout, off = [], 0
            with torch.no_grad():
                for p in plist:
                    # a streamer built on this model before left the true values in its pool
                    src = getattr(p, _SOURCE_ATTR, None)
                    pool[off:off + p.numel()].copy_((p.detach() if src is None else src).reshape(-1))
                    layout.append((p, off, p.numel()))
                    off += p.numel()
            for p, off, n in layout:
                setattr(p, _SOURCE_ATTR, pool[off:off + n].view(p.shape))
            self.pools[i], layouts[i] = pool, layout
        size = max(sizes.values(), default=0)
        n_slots = min(WEIGHT_SLOTS, len(self.layers))
        self.slots = torch.empty((n_slots, size), dtype=dtype, device=self.device)
        for i, layout in layouts.items():
            slot = self.slots[plan.weight_slot(i)]
            for p, off, n in layout:
                p.data = slot[off:off + n].view(p.shape)

    @property
    def nbytes(self) -> int:
        """Host bytes of the weights' pool (counted with the cache pools against host memory)."""
        return self.flat.nbytes

    def prefetch(self, streams: StreamSet, stream: int, layer: int) -> None:
        pool = self.pools[layer]
        with streams.use(stream):
            self.slots[self.plan.weight_slot(layer)][:pool.numel()].copy_(pool, non_blocking=True)
