"""Recompute reads and writes the token-major staging slots without layout copies.

`staged_act` is a transposed [b, n, h] view of the token-major slot; the recompute pass feeds
each projection the contiguous [n, b, h] chunk and transposes its output back, so the GEMM
reads plain memory and K,V come out token-major: put_recomputed's copy into the token-major
K,V slot is then contiguous instead of a transposing copy (passes/recompute.py). Checked on
CPU, during one decode step of a compiled pipelined model that recomputes every cached token.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from kvc.compiler.lowering import lower
from kvc.models import build_model, preset
from kvc.ir.plan import forced_plan
from kvc.api import assemble
from kvc.runtime.offloaded import OffloadedCache

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, BATCH, CHUNKS = 8, 2, 2
VARIANTS = {
    "tiny-opt": preset("tiny-opt"),
    "tiny-opt-post-ln": replace(preset("tiny-opt"), do_layer_norm_before=False),
    "tiny-llama": preset("tiny-llama"),
    "tiny-qwen2": replace(preset("tiny-llama-gqa"), model_type="qwen2", attention_bias=True),
}


def decode_step_layouts(name: str, monkeypatch) -> tuple[list, list]:
    """One prefill and one decode step with every cached token recomputed. Returns, for the
    decode step, (whether each K/V projection's input was contiguous, whether each
    put_recomputed's K and V were token-major, i.e. k.transpose(0, 1) contiguous)."""
    spec = VARIANTS[name]
    model = build_model(spec, "cpu", torch.float32, seed=0)
    plan = forced_plan("pipelined", spec.num_layers, PROMPT, 2, 64, 1.0, act_chunks=CHUNKS)
    cm = assemble(lower(model, plan), plan, spec, torch.float32, torch.device("cpu"))
    decoding, proj_inputs, puts = [False], [], []

    def recording_linear(x, w, b=None):
        if decoding[0] and x.shape[1] > 1:  # [b, 1, h]: this step's own token
            proj_inputs.append(x.is_contiguous())
        return F.linear(x, w, b)

    # passes/flatten.py calls the projections as F.linear: record what the K/V ones are given
    gm = cm.decode_step  # the graph the executor runs (a copy of the lowered one)
    for n in gm.graph.nodes:
        if n.target is F.linear and n.meta["kvc"]["target"].endswith(("k_proj", "v_proj")):
            n.target = recording_linear
    gm.recompile()
    put = OffloadedCache.put_recomputed

    def recording_put(self, k, v, layer, chunk):
        if k.shape[1]:
            puts.append((k.transpose(0, 1).is_contiguous(), v.transpose(0, 1).is_contiguous()))
        return put(self, k, v, layer, chunk)

    monkeypatch.setattr(OffloadedCache, "put_recomputed", recording_put)
    ids = torch.randint(0, spec.vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    try:
        cm.generate(ids, 2, on_token=lambda step, _: decoding.__setitem__(0, step == 0))
    finally:
        cm.close()
    # every offloaded layer recomputed every chunk, K and V each through one projection
    assert len(puts) == spec.num_layers * CHUNKS
    return proj_inputs, puts


@pytest.mark.parametrize("name", list(VARIANTS))
def test_projections_read_the_contiguous_token_major_chunk(name, monkeypatch):
    proj_inputs, _ = decode_step_layouts(name, monkeypatch)
    assert len(proj_inputs) == 2 * VARIANTS[name].num_layers * CHUNKS
    assert all(proj_inputs), "a K/V projection read the transposed [b, n, h] staged view"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_recomputed_kv_reach_the_slot_token_major(name, monkeypatch):
    """put_recomputed copies k.transpose(0, 1) into token-major rows: a contiguous source
    makes it a plain memcpy rather than a transposing elementwise copy."""
    _, puts = decode_step_layouts(name, monkeypatch)
    assert all(k and v for k, v in puts), puts


# --- the rewrite on hand-built K/V subgraphs: same numbers, token-major only where safe -------

class KVSlice(torch.nn.Module):
    """What a K/V subgraph may do after its projection; `kind` picks the variant."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.k_proj, self.v_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, a):
        k = self.k_proj(a)
        v = torch.nn.functional.linear(a, self.v_proj.weight, self.v_proj.bias)
        if self.kind == "rope":  # rotate-half: slices, a negation, a last-dim cat
            k = k.unflatten(-1, (2, 4))
            k = k * 2 + torch.cat((-k[..., 2:], k[..., :2]), dim=-1) * 3
        elif self.kind == "int_index":  # 2-D pieces: dim -1 is the token dim
            k = torch.cat((k[..., 0], k[..., 1]), dim=-1)
        elif self.kind == "cat_tokens":
            k = torch.cat((k, -k), dim=1)
        elif self.kind == "new_axis":
            k = torch.cat((k[:, None], k[:, None]), dim=-1)
        return k, v


@pytest.mark.parametrize("kind,rewritten_cat", [("rope", True), ("int_index", False),
                                                ("cat_tokens", False), ("new_axis", False)])
def test_clone_matches_the_traced_subgraph(kind, rewritten_cat):
    from kvc.passes.recompute import clone_kv_slice

    gm = torch.fx.symbolic_trace(KVSlice(kind))
    act = next(n for n in gm.graph.nodes if n.op == "placeholder")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    slice_nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    k, v = out.args[0]
    with gm.graph.inserting_before(out):
        k2, v2 = clone_kv_slice(gm, slice_nodes, act, {act: act}, k, v, "re0_0", {})
    out.args = ((k, v, k2, v2),)
    gm.recompile()
    names = {n.name for n in gm.graph.nodes}
    assert {"re0_0_tm_act", "re0_0_tm_k_proj", "re0_0_tm_linear"} <= names  # both linear forms
    assert ("re0_0_tm_cat" in names) == rewritten_cat
    x = torch.randn(5, 3, 8).transpose(0, 1)  # like staged_act: a [b, n, h] view of [n, b, h]
    k, v, k2, v2 = gm(x)
    torch.testing.assert_close(k2, k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v2, v, rtol=1e-6, atol=1e-6)
    assert v2.transpose(0, 1).is_contiguous()
    if kind == "rope":
        assert k2.transpose(0, 1).is_contiguous()
