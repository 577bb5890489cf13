"""Plans of bench rows: the card's preset with this run's host costs, and the offloading
modes' GPU budget at a grid point."""
from __future__ import annotations

import math

import torch

from kvc.api import assemble, make_plan, resolve
from kvc.compiler.lowering import lower
from kvc.config import load_config
from kvc.models import preset
from kvc.planner import cost

from . import env
from .env import GEN_LEN


def offload_budget_gb(spec, hw, batch: int, s_max: int) -> float:
    """A GPU budget with room for the weights, the staging buffers, workspace and margin, and
    half a layer's KV cache more: no layer's cache fits, every mode streams all of it."""
    t = cost.memory_terms(spec, hw, batch, s_max, env.DTYPE_NAME, 2, True)
    need = t["weights_gb"] + t["staging_gb"] + t["workspace_gb"] + t["margin_gb"]
    return math.ceil((need + 0.5 * t["layer_kv_gb"]) * 1000) / 1000


def planned(name, mode, batch, context, hw_name, budget, fraction=None, extra=()):
    """(plan, resolved config) of one bench row: the card's preset with this run's host costs,
    planned for the row's contexts (max_context = context + GEN_LEN: residency and memory at
    the row's longest context, as every bench row before plans covered every context)."""
    overrides = [f"hardware={hw_name}", f"schedule.mode={mode}",
                 f"workload.batch_size={batch}", f"workload.prompt_len={context}",
                 f"workload.gen_len={GEN_LEN}", f"workload.max_context={context + GEN_LEN}",
                 f"hardware.gpu_mem_gb={budget}", *env.HOST_OVERRIDES, *extra]
    if fraction is not None:
        overrides.append(f"schedule.recompute_fraction={fraction}")
    r = resolve(load_config({"model": {"preset": name, "dtype": env.DTYPE_NAME}}, overrides))
    return make_plan(r), r


def point_budget_gb(spec, name, hw_name, batch, context) -> float:
    """The offloading modes' GPU budget at a grid point (offload_budget_gb on the preset)."""
    hw = resolve(load_config({"model": {"preset": name}}, [f"hardware={hw_name}", *env.HOST_OVERRIDES])).hardware
    return offload_budget_gb(spec, hw, batch, context + GEN_LEN)


def compiled(model, spec, mode, batch, context, hw_name, budget, fraction=None, extra=(), edit=None):
    """(compiled module, resolved config) of one bench row; `edit` (Plan -> Plan), if given,
    changes the plan before it is lowered (an experiment's variant of what make_plan chose)."""
    plan, r = planned(spec_name(spec), mode, batch, context, hw_name, budget, fraction, extra)
    if edit is not None:
        plan = edit(plan)
    return assemble(lower(model, plan), plan, spec, env.DTYPE, torch.device(env.DEVICE)), r


_names: dict = {}


def spec_name(spec) -> str:
    return _names[id(spec)]


def get_spec(name):
    spec = preset(name)
    _names[id(spec)] = name
    return spec
