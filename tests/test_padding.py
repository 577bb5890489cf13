"""Left-padded batches of mixed-length prompts, the transformers way (kvc.runtime.padding).

- the reference decoder and every compiled schedule against transformers' generate with the
  same attention_mask, for every family (tiny random checkpoints, fp32): the same greedy
  tokens, logits within 1e-4;
- a padded row decodes exactly as that row alone;
- every compiled schedule (modes, recompute fractions, micro-batches, sliding windows)
  against the reference on the padded batch: the same tokens, logits within 1e-5;
- bad masks get one clear error.
"""
from __future__ import annotations

from dataclasses import replace
from functools import cache

import hf_fixtures as hf
import pytest
import torch
from kvc_fixtures import perturb_small_params

from kvc.compiler.lowering import lower
from kvc.errors import KvcError
from kvc.ir.modes import NAMES as MODES
from kvc.ir.plan import forced_plan
from kvc.models import build_model, preset, spec_from_hf_config
from kvc.models.checkpoint import read_config
from kvc.runtime.reference import ReferenceDecoder

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = (11, 4, 1, 8)  # per row: the longest sets the width, one row has a single token
STEPS = 10


def padded(lengths=LENGTHS, vocab=512, seed=3) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (padding id 0) and their attention mask."""
    width, gen = max(lengths), torch.Generator().manual_seed(seed)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = torch.randint(1, vocab, (n,), generator=gen)
        mask[r, width - n:] = 1
    return ids, mask


# --- against transformers ---------------------------------------------------------------------

def _hf_cases() -> dict:
    import transformers

    small = dict(hf.TINY, initializer_range=hf.INIT_STD)
    return {
        **{case: lambda c=case: hf.hf_model(c) for case in ("opt-preln", "opt-350m-shape",
                                                            "llama2-mha", "llama3-gqa", "qwen2")},
        # windows shorter than the prompt: prefill masks them, decode slides them
        "mistral-window": lambda: hf.random_hf_model(transformers.MistralConfig(
            **small, intermediate_size=160, num_key_value_heads=2, sliding_window=6,
            tie_word_embeddings=False)),
        "qwen3": lambda: hf.random_hf_model(transformers.Qwen3Config(
            **small, intermediate_size=160, num_key_value_heads=2, head_dim=32)),
        "gemma2": lambda: hf.random_hf_model(transformers.Gemma2Config(
            **{**small, "num_hidden_layers": 4}, intermediate_size=160, num_key_value_heads=2,
            head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
            final_logit_softcapping=12.0)),
    }


@pytest.mark.parametrize("case", ["opt-preln", "opt-350m-shape", "llama2-mha", "llama3-gqa",
                                  "qwen2", "mistral-window", "qwen3", "gemma2"])
def test_reference_matches_transformers_with_left_padding(case, tmp_path):
    pytest.importorskip("transformers")
    model = _hf_cases()[case]()
    folder = hf.save_checkpoint(model, tmp_path / case)
    spec = spec_from_hf_config(read_config(folder))
    ours = build_model(spec, "cpu", torch.float32, checkpoint=folder)
    ids, mask = padded()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=STEPS,
                             min_new_tokens=STEPS, output_logits=True, return_dict_in_generate=True,
                             eos_token_id=None, pad_token_id=0)
    want_tokens, want_logits = out.sequences, torch.stack(out.logits, dim=1)
    tokens, logits = ReferenceDecoder(ours, spec).generate(ids, STEPS, return_logits=True,
                                                           attention_mask=mask)
    assert torch.equal(tokens, want_tokens), case
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)
    # and every compiled schedule on the same weights, half of each context recomputed
    for mode in MODES:
        cm = _assemble(ours, spec, mode, 0.5)
        try:
            got, got_logits = cm.generate(ids, STEPS, return_logits=True, attention_mask=mask)
        finally:
            cm.close()
        assert torch.equal(got, want_tokens), (case, mode)
        torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=0)


# --- a padded row is the row alone ------------------------------------------------------------

VARIANTS = {
    "tiny-opt": preset("tiny-opt"),
    "tiny-opt-post-ln": replace(preset("tiny-opt"), do_layer_norm_before=False),
    "tiny-llama": preset("tiny-llama"),
    "tiny-llama-gqa": preset("tiny-llama-gqa"),
    "tiny-mistral-w5": replace(preset("tiny-llama-gqa"), model_type="mistral", sliding_window=5),
    "tiny-gemma2": replace(preset("tiny-gemma2"), sliding_window=5),
}


@cache
def model(name: str):
    spec = VARIANTS[name]
    return spec, perturb_small_params(build_model(spec, "cpu", torch.float32, seed=0))


@cache
def reference(name: str, lengths=LENGTHS, steps=STEPS):
    spec, m = model(name)
    ids, mask = padded(lengths, spec.vocab_size)
    return ids, mask, *ReferenceDecoder(m, spec).generate(ids, steps, return_logits=True,
                                                          attention_mask=mask)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_padded_row_decodes_as_the_row_alone(name):
    spec, m = model(name)
    ids, _, tokens, logits = reference(name)
    width = ids.shape[1]
    for r, n in enumerate(LENGTHS):
        alone, alone_logits = ReferenceDecoder(m, spec).generate(ids[r:r + 1, width - n:], STEPS,
                                                                 return_logits=True)
        assert torch.equal(tokens[r, width:], alone[0, n:]), (name, r)
        torch.testing.assert_close(logits[r], alone_logits[0], atol=1e-5, rtol=0)


# --- compiled schedules -----------------------------------------------------------------------

def _assemble(m, spec, mode, fraction, micro_batches=1, act_chunks=2):
    from kvc.api import assemble

    plan = forced_plan(mode, spec.num_layers, max(LENGTHS), STEPS, 64, fraction,
                       act_chunks=act_chunks, micro_batches=micro_batches)
    return assemble(lower(m, plan), plan, spec, torch.float32, torch.device("cpu"))


def _compiled(name, mode, fraction, micro_batches=1, act_chunks=2):
    spec, m = model(name)
    return _assemble(m, spec, mode, fraction, micro_batches, act_chunks)


def _check(name, mode, fraction, micro_batches=1):
    ids, mask, ref_tokens, ref_logits = reference(name)
    cm = _compiled(name, mode, fraction, micro_batches)
    try:
        tokens, logits = cm.generate(ids, STEPS, return_logits=True, attention_mask=mask)
    finally:
        cm.close()
    where = f"{name} {mode} fraction={fraction} m={micro_batches}"
    assert torch.equal(tokens, ref_tokens), where
    err = (logits - ref_logits).abs().max().item()
    assert err <= 1e-5, f"logits off by {err:.2e}: {where}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_schedule_matches_the_reference_on_a_padded_batch(name, mode):
    for fraction in (0.0, 0.5, 1.0):
        _check(name, mode, fraction)


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-opt", "tiny-gemma2"])
def test_micro_batches_with_padding(name):
    """The block schedule splits per-row positions and masks by micro-batch."""
    for mode, fraction in (("pipelined", 0.5), ("full_offload", 0.0), ("gpu_resident", 0.0)):
        _check(name, mode, fraction, micro_batches=2)


def test_common_padding_is_dropped_and_returned():
    """Columns every row pads cost nothing and come back as given."""
    ids, mask = padded((5, 3))
    extra = torch.full((2, 4), 7)
    wide_ids, wide_mask = torch.cat([extra, ids], 1), torch.cat([torch.zeros_like(extra), mask], 1)
    cm = _compiled("tiny-llama", "pipelined", 0.5)
    try:
        got = cm.generate(wide_ids, 6, attention_mask=wide_mask)
        want = cm.generate(ids, 6, attention_mask=mask)
    finally:
        cm.close()
    assert torch.equal(got[:, :4], extra) and torch.equal(got[:, 4:], want)


def test_an_all_ones_mask_is_the_unpadded_call():
    ids, _ = padded((6, 6))
    cm = _compiled("tiny-opt", "pipelined", 0.5)
    try:
        assert torch.equal(cm.generate(ids, 5, attention_mask=torch.ones_like(ids)), cm.generate(ids, 5))
    finally:
        cm.close()


@pytest.mark.parametrize("mask,why", [
    ([[1, 1, 0]], "pads on the right"),
    ([[0, 0, 0]], "no token"),
    ([[1, 2, 1]], r"0 \(padding\) and 1"),
    ([[1, 1]], "shaped like input_ids"),
])
def test_bad_masks_are_refused(mask, why):
    cm = _compiled("tiny-opt", "full_offload", 0.0)
    try:
        with pytest.raises(KvcError, match=why):
            cm.generate(torch.ones((1, 3), dtype=torch.long), 2, attention_mask=torch.tensor(mask))
    finally:
        cm.close()
