"""Shared helpers for tests that build kvc models."""
import dataclasses
from pathlib import Path

import torch
import yaml

from kvc.hardware import HardwareConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "hardware"


def hw(name: str, **kw) -> HardwareConfig:
    """A packaged hardware preset (conf/hardware/<name>.yaml) with fields replaced."""
    base = HardwareConfig.from_dict(yaml.safe_load((CONF / f"{name}.yaml").read_text()))
    return dataclasses.replace(base, **kw)


@torch.no_grad()
def perturb_small_params(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random biases and norm scales: the builder zeroes biases and sets norms to 1, which
    would hide a bias or norm that a recompute clone dropped."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        elif p.dim() == 1:  # norm weights
            p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)
    return model


def guard_a_slow_lane(monkeypatch, seconds: float) -> None:
    """An auto plan's lane, every CPU part `seconds` slower, under a guard of short rounds (2 steps of each arm, 6 in use): what the guard must drop
    (kvc.runtime.lane_guard)."""
    import time

    from kvc.runtime import cpu_attention, lane_guard

    monkeypatch.setattr(lane_guard, "BLOCK", 2)
    monkeypatch.setattr(lane_guard, "EVERY", 6)
    real = cpu_attention.partial_attention

    def slow_part(*a, **k):
        time.sleep(seconds)
        return real(*a, **k)
    monkeypatch.setattr(cpu_attention, "partial_attention", slow_part)
