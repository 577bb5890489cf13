"""Decoding never runs cuDNN attention (kvc.runtime.attention): cuDNN builds an execution graph
per new shape, and a decode step's context is a new length every step. Checked on the CPU
through the backend flags that scaled_dot_product_attention reads when it picks a kernel:
off inside the compiled model's and the reference decoder's generate, and the caller's
settings back afterwards.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvc.compiler.lowering import lower
from kvc.models import build_model, preset
from kvc.runtime.reference import ReferenceDecoder
from kvc.ir.plan import forced_plan
from kvc.api import assemble

pytestmark = pytest.mark.usefixtures("one_thread")


def flags() -> tuple[bool, bool, bool]:
    b = torch.backends.cuda
    return b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled()


def test_compiled_generate_attends_without_cudnn():
    spec = preset("tiny-opt")
    model = build_model(spec, "cpu", torch.float32, seed=0)
    plan = forced_plan("pipelined", spec.num_layers, 8, 4, 64, 0.5)
    cm = assemble(lower(model, plan), plan, spec, torch.float32, torch.device("cpu"))
    ids = torch.randint(0, spec.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    seen = []
    before = flags()
    try:
        cm.generate(ids, 3, on_token=lambda step, _: seen.append(flags()))
    finally:
        cm.close()
    assert seen == [(False, True, True)] * 3
    assert flags() == before


def test_reference_decoder_attends_without_cudnn(monkeypatch):
    spec = preset("tiny-llama")
    ref = ReferenceDecoder(build_model(spec, "cpu", torch.float32, seed=0), spec)
    seen, sdpa = [], F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(flags())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    ids = torch.randint(0, spec.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    before = flags()
    ref.generate(ids, 3)
    ref.prefill_logits(ids)
    assert len(seen) == spec.num_layers * 4
    assert set(seen) == {(False, True, True)}
    assert flags() == before
