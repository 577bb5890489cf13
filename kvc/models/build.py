"""Building a model: on the meta device first, then materialised straight on the target
device in the target dtype, so a 13 GB model never makes a CPU round trip: dummy weights are
filled in place by a generator on that device, checkpoint weights are copied in one tensor at
a time. `device="meta"` stops after the first step (the compiler traces meta models).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kvc.dtypes import torch_dtype
from kvc.errors import KvcError
from kvc.models.checkpoint import load_checkpoint
from kvc.models.spec import Family, ModelSpec
from kvc.progress import bar

INIT_STD = 0.02  # HF's initializer_range default: dummy logits look like an untrained model's


def _check_room(nbytes: int, device: torch.device, spec: ModelSpec) -> None:
    """KvcError when the weights cannot fit where they are about to be made: host memory
    available (MemAvailable) for the CPU, free device memory for a GPU."""
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                room = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return
        where = "host memory available"
    elif device.type == "cuda":
        room, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    else:
        return
    if nbytes > room:
        raise KvcError(f"the model's weights need {nbytes / 1e9:.1f} GB, {room / 1e9:.1f} GB is {where} "
                       f"({spec.num_layers} layers, hidden {spec.hidden_size}); stream weights from "
                       "the CPU (schedule.weight_stream_fraction) or use a machine with more memory")


@torch.no_grad()
def _init_dummy(model: nn.Module, device: torch.device, seed: int) -> None:
    # one generator on the device, parameters visited in a fixed order: the same (seed,
    # device) always gives the same weights
    gen = torch.Generator(device=device).manual_seed(seed)
    seen: set[int] = set()
    total = len({id(p) for p in model.parameters()})
    with bar("kvc: making dummy weights", total=total, unit="tensor") as counter:
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue  # a tied lm_head is the embedding, already filled
                seen.add(id(p))
                if name == "bias":
                    p.zero_()
                elif isinstance(module, (nn.Linear, nn.Embedding)):
                    if p.device == device:
                        p.normal_(0.0, INIT_STD, generator=gen)
                    else:  # placed in host memory (build_model place=): drawn on the device,
                        # from the same generator, so the weights do not depend on placement
                        p.copy_(torch.empty_like(p, device=device).normal_(0.0, INIT_STD, generator=gen))
                else:
                    p.fill_(1.0)  # norm scales
                counter.update()


def _materialize(model: nn.Module, device: torch.device, views: dict) -> None:
    """to_empty, except that the parameters in `views` take those tensors as their storage."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            data = views[id(p)] if id(p) in views else torch.empty_like(p, device=device)
            new = nn.Parameter(data, requires_grad=p.requires_grad)
            new.__dict__.update(p.__dict__)  # what place() marked it with
            module._parameters[name] = new
        for name, b in module.named_buffers(recurse=False):
            module._buffers[name] = torch.empty_like(b, device=device)


def build(family: Family, spec: ModelSpec, device: torch.device | str = "cpu",
          dtype: torch.dtype | str = torch.float16, seed: int = 0,
          checkpoint: str | Path | None = None, place=None) -> nn.Module:
    """A decoder for `spec` on `device` in `dtype`, in eval mode.

    checkpoint=None: dummy weights, normal(0, 0.02) for matrices, ones for norms, zero biases,
    deterministic for (seed, device). Otherwise the HF checkpoint folder's weights.
    device="meta": shapes only, nothing initialised or loaded (for tracing).
    `place(meta_model) -> {id(param): tensor}`: parameters to materialise in those tensors
    instead of on `device` (kvc.runtime.weights.place_streamed: weight-streamed layers straight
    into their pinned host pool, so a model larger than the GPU can be built).
    """
    device, dtype = torch.device(device), torch_dtype(dtype)
    with torch.device("meta"):
        model = family.model_class(spec)
    # inference only: no autograd state on a 13 GB model
    model = model.to(dtype).eval().requires_grad_(False)
    if device.type == "meta":
        return model
    views = place(model) if place is not None else {}
    # what is about to be allocated on `device` (placed parameters live in their own pools,
    # checked where those are made): refused here, not by the OS's OOM killer halfway through
    need = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in views)
    _check_room(need, device, spec)
    if views:
        _materialize(model, device, views)
    else:
        model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each module its own new tensor, untying them
    model.init_buffers()
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, family)
    else:
        _init_dummy(model, device, seed)
    return model
