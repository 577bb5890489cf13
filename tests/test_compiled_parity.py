"""Compiled schedules against the reference decoder (fp32, CPU): the same tokens, logits within
1e-5, for every family variant, every mode, every forced fraction in {0, 1/s, 0.5, 1-1/s, 1},
several prompt lengths and batch sizes, plus a hypothesis property test.

Speed: a lowered graph's code depends on the plan only through the mode, act_chunks and
whether any token is ever recomputed (fraction > 0), never through the fraction's value or
the prompt / generation lengths (test_lowered_code_ignores_fraction_value checks it), so
lowerings are cached on that key and each case runs with its own exact Plan.
"""
from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvc.compiler.lowering import lower
from kvc.models import build_model, preset
from kvc.runtime.reference import ReferenceDecoder
from kvc.ir.modes import NAMES as MODES
from kvc.ir.plan import Plan, forced_plan
from kvc.api import assemble
from kvc_fixtures import perturb_small_params

ATOL = 1e-5
GEN = 10
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

VARIANTS = {
    "tiny-opt": preset("tiny-opt"),
    "tiny-opt-post-ln": replace(preset("tiny-opt"), do_layer_norm_before=False),
    "tiny-llama": preset("tiny-llama"),
    "tiny-llama-gqa": preset("tiny-llama-gqa"),
    "tiny-qwen2": replace(preset("tiny-llama-gqa"), model_type="qwen2", attention_bias=True),
    "tiny-llama3-rope": replace(preset("tiny-llama"), rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
}
SHAPES = [(1, 5), (3, 7), (2, 16)]  # (batch, prompt length)


pytestmark = pytest.mark.usefixtures("one_thread")


def fractions(s: int) -> list[float]:
    return sorted({0.0, 1 / s, 0.5, 1 - 1 / s, 1.0})


@lru_cache(maxsize=None)
def model(name: str):
    """Dummy weights, plus random biases and norm scales: the builder zeroes biases and sets
    norms to 1, which would hide a bias or norm the recompute clone dropped."""
    spec = VARIANTS[name]
    m = perturb_small_params(build_model(spec, "cpu", torch.float32, seed=0))
    return spec, m


@lru_cache(maxsize=None)
def lowered(name: str, mode: str, recomputes: bool, act_chunks: int):
    spec, m = model(name)
    return lower(m, forced_plan(mode, spec.num_layers, 8, 8, 64, 0.5 if recomputes else 0.0,
                                act_chunks=act_chunks))


@lru_cache(maxsize=None)
def reference(name: str, batch: int, prompt: int, gen: int, seed: int = 0):
    spec, m = model(name)
    ids = torch.randint(0, spec.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    return ids, *ReferenceDecoder(m, spec).generate(ids, gen, return_logits=True)


def run(name: str, plan: Plan, batch: int, prompt: int, gen: int, seed: int = 0):
    spec, m = model(name)
    low = lowered(name, plan.mode, plan.forced_fraction > 0, plan.act_chunks)
    cm = assemble(low, plan, spec, torch.float32, torch.device("cpu"))
    ids, ref_tokens, ref_logits = reference(name, batch, prompt, gen, seed)
    try:
        tokens, logits = cm.generate(ids, gen, return_logits=True)
    finally:
        cm.close()
    return tokens, logits, ref_tokens, ref_logits


def check(name, mode, fraction, batch, prompt, gen=GEN, act_chunks=3, seed=0):
    spec = VARIANTS[name]
    plan = forced_plan(mode, spec.num_layers, prompt, gen, 64, fraction, act_chunks=act_chunks)
    tokens, logits, ref_tokens, ref_logits = run(name, plan, batch, prompt, gen, seed)
    where = f"{name} {mode} fraction={fraction:.3f} b={batch} s={prompt} chunks={act_chunks}"
    assert torch.equal(tokens, ref_tokens), f"tokens differ: {where}"
    err = (logits - ref_logits.float()).abs().max().item()
    assert err <= ATOL, f"logits off by {err:.2e}: {where}"


@pytest.mark.parametrize("batch,prompt", SHAPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_every_fraction(name, mode, batch, prompt):
    for fraction in fractions(prompt):
        check(name, mode, fraction, batch, prompt)


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-opt-post-ln"])
def test_parity_long_decode(name):
    """32 decode steps: l = round(f * s) moves as s grows, the chunks re-split every step."""
    for fraction in (1 / 3, 0.5):
        check(name, "pipelined", fraction, batch=2, prompt=3, gen=33, act_chunks=4)


def test_parity_mixed_residency():
    spec, _ = model("tiny-llama")
    for resident in ((True, False), (False, True)):
        plan = replace(forced_plan("pipelined", 2, 7, GEN, 64, 0.5, act_chunks=2), resident=resident)
        low = lower(model("tiny-llama")[1], plan)
        cm = assemble(low, plan, spec, torch.float32, torch.device("cpu"))
        ids, ref_tokens, ref_logits = reference("tiny-llama", 3, 7, GEN)
        tokens, logits = cm.generate(ids, GEN, return_logits=True)
        assert torch.equal(tokens, ref_tokens)
        assert (logits - ref_logits).abs().max().item() <= ATOL


def test_runtime_reuse_across_calls():
    """A CompiledModel keeps its pools between calls of one batch size and rebuilds for another."""
    spec, _ = model("tiny-llama")
    plan = forced_plan("pipelined", spec.num_layers, 7, GEN, 64, 0.5, act_chunks=2)
    cm = assemble(lowered("tiny-llama", "pipelined", True, 2), plan, spec, torch.float32, "cpu")
    for batch in (3, 3, 1, 3):
        ids, ref_tokens, _ = reference("tiny-llama", batch, 7, GEN)
        assert torch.equal(cm.generate(ids, GEN), ref_tokens)
    cm.close()


def _code(low) -> str:
    # each trace of one model object numbers its RoPE constant anew (_tensor_constant0, 1, ...):
    # see test_passes.py::test_retracing_a_model_gives_the_same_code
    return re.sub(r"_tensor_constant\d+", "_tensor_constant", low.code)


def test_lowered_code_ignores_fraction_value():
    """What makes the lowering cache above sound."""
    spec, m = model("tiny-llama")
    codes = {_code(lower(m, forced_plan("pipelined", spec.num_layers, p, n, 64, f, act_chunks=3)))
             for p, n, f in ((7, 10, 1 / 7), (16, 10, 0.5), (5, 33, 1.0))}
    assert codes == {_code(lowered("tiny-llama", "pipelined", True, 3))}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["tiny-opt", "tiny-llama-gqa", "tiny-qwen2"]),
       mode=st.sampled_from(["pipelined", "kvpr", "full_offload"]),
       batch=st.integers(1, 3), prompt=st.integers(1, 12),
       fraction=st.floats(0.0, 1.0), act_chunks=st.integers(1, 5))
def test_parity_property(name, mode, batch, prompt, fraction, act_chunks):
    check(name, mode, fraction, batch, prompt, gen=8, act_chunks=act_chunks, seed=prompt)
