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
from kvc.ir.plan import WEIGHT_SLOTS, Plan, streamed_prefix
from kvc.runtime.pinned import check_host_memory, pinned_empty
from kvc.runtime.streams import StreamSet

# set on a streamed parameter: its true values, a view into its layer's CPU pool
_SOURCE_ATTR = "_kvc_weight_source"
# set on a parameter placed in a pool before the model was materialised (place_streamed): the
# whole pool, which the WeightStreamer then adopts instead of allocating and copying
_POOL_ATTR = "_kvc_weight_pool"


def _layer_module(root: torch.nn.Module, layer: int) -> torch.nn.Module:
    try:
        return root.get_submodule(f"layers.{layer}")
    except AttributeError:
        raise KvcError(f"weight streaming: the model has no module layers.{layer}") from None


def streamed_parameters(layer: torch.nn.Module, fraction: float) -> list:
    """The parameters of `layer` that stream for `fraction` of its elements: the largest first
    (ties by name), as kvc.ir.plan.streamed_prefix rounds the scheduler's fraction."""
    named = sorted(layer.named_parameters(), key=lambda kv: (-kv[1].numel(), kv[0]))
    k = streamed_prefix([p.numel() for _, p in named], fraction)
    return [p for _, p in named[:k]]


def _streamed_layout(plan: Plan, root: torch.nn.Module):
    """{layer: its streamed parameters, in pool order}, their dtype and sizes (elements)."""
    params: dict[int, list] = {}
    dtype = None
    for i in plan.streamed_layers:
        plist = streamed_parameters(_layer_module(root, i), plan.weights_streamed[i])
        if not plist:
            raise KvcError(f"weight streaming: layers.{i} has no parameters")
        kinds = {p.dtype for p in plist} | ({dtype} if dtype is not None else set())
        if len(kinds) != 1:
            raise KvcError(f"weight streaming: layers.{i} mixes parameter dtypes "
                           f"{sorted(map(str, kinds))}")
        dtype, params[i] = plist[0].dtype, plist
    sizes = {i: sum(p.numel() for p in plist) for i, plist in params.items()}
    return params, dtype or torch.float32, sizes


def place_streamed(plan: Plan, device: torch.device):
    """For kvc.models.build_model(place=...): before the model is materialised, one pinned pool
    for the plan's streamed parameters, laid out as the WeightStreamer lays them out, and each
    of them placed as a view in it. The model is then built (weights drawn or loaded) with the
    streamed parameters already in host memory: the GPU never holds more than the resident
    weights, and the host never holds a second copy. Returns the function build_model calls on
    the meta model; it returns {id(param): its CPU view}."""
    device = torch.device(device)

    def place(root: torch.nn.Module) -> dict[int, torch.Tensor]:
        params, dtype, sizes = _streamed_layout(plan, root)
        total = sum(sizes.values())
        check_host_memory(total * torch.empty((), dtype=dtype).element_size())
        flat = pinned_empty((total,), dtype, device)
        views, off = {}, 0
        for plist in params.values():
            for p in plist:
                views[id(p)] = flat[off:off + p.numel()].view(p.shape)
                setattr(p, _POOL_ATTR, flat)
                off += p.numel()
        return views

    return place


def _placed_pool(params: dict[int, list], sizes: dict[int, int]):
    """The pool place_streamed put these parameters in, if they all sit in it where this
    streamer would put them; else None."""
    flat = None
    for plist in params.values():
        for p in plist:
            pool = getattr(p, _POOL_ATTR, None)
            if pool is None or (flat is not None and pool is not flat):
                return None
            flat = pool
    if flat is None or flat.numel() != sum(sizes.values()):
        return None
    off = 0
    for plist in params.values():
        for p in plist:
            if p.data_ptr() != flat[off:].data_ptr():
                return None
            off += p.numel()
    return flat


class WeightStreamer:
    def __init__(self, plan: Plan, root: torch.nn.Module, device: torch.device):
        self.plan, self.device = plan, torch.device(device)
        self.layers = plan.streamed_layers
        params, dtype, sizes = _streamed_layout(plan, root)
        placed = _placed_pool(params, sizes)
        if placed is not None:  # built in place (place_streamed): adopt the pool, copy nothing
            self.flat = placed
        else:
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
                    if placed is None:
                        # a streamer built on this model before left the true values in its pool
                        src = getattr(p, _SOURCE_ATTR, None)
                        pool[off:off + p.numel()].copy_((p.detach() if src is None else src).reshape(-1))
                    layout.append((p, off, p.numel()))
                    off += p.numel()
            for p, off, n in layout:
                setattr(p, _SOURCE_ATTR, pool[off:off + n].view(p.shape))
                if hasattr(p, _POOL_ATTR):
                    delattr(p, _POOL_ATTR)  # adopted (or superseded): a later streamer copies
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
