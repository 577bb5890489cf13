"""Lowering: a model and a Plan -> the executable prefill and decode-step GraphModules.

Both phases are traced and rewritten by the same pass pipeline; the result is plain fx code
(`gm.code`) whose hash identifies the compiled artifact.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.fx

from kvc.passes.pipeline import run_pipeline
from kvc.ir.plan import Plan
from kvc.compiler.trace import trace_step


@dataclass
class Lowered:
    prefill: torch.fx.GraphModule
    decode: torch.fx.GraphModule
    num_events: int

    @property
    def code(self) -> str:
        return (f"# ---- prefill ----\n{self.prefill.code.strip()}\n\n"
                f"# ---- decode step ----\n{self.decode.code.strip()}\n")

    @property
    def code_hash(self) -> str:
        return hashlib.sha256(self.code.encode()).hexdigest()


def lower(model: torch.nn.Module, plan: Plan) -> Lowered:
    prefill = run_pipeline(trace_step(model, prefill=True), plan)
    decode = run_pipeline(trace_step(model, prefill=False), plan)
    return Lowered(prefill, decode, decode.meta["kvc"]["num_events"])
