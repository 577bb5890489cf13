"""Several processes (issue 18): a batch split by rows across 2 gloo ranks on the CPU decodes
exactly what one process decodes (fp32): the same tokens on every rank, logits within 1e-5,
for an MHA and a GQA family, with a left-padded uneven batch, micro-batches, sampling from a
seed, and EOS stopping (kvc.runtime.parallel)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from kvc.runtime.parallel import Ranks

WORLD, PROMPT, GEN = 2, 9, 8

# (name, family, mode, recompute fraction, batch, micro-batches, padded, generate kwargs, split)
CASES = [
    ("opt-padded-uneven", "tiny-opt", "pipelined", 0.5, 3, 1, True, {}, "rows"),
    ("gqa-micro", "tiny-llama-gqa", "full_offload", 0.0, 4, 2, False, {}, "rows"),
    ("gqa-sampled", "tiny-llama-gqa", "pipelined", 0.5, 3, 1, True,
     {"do_sample": True, "seed": 5, "top_k": 10, "temperature": 0.8, "repetition_penalty": 1.2}, "rows"),
    ("opt-eos", "tiny-opt", "kvpr", 0.4, 5, 1, False, {"eos_token_id": "first-row-step-2"}, "rows"),
    # a token split: every rank decodes every row over its share of each layer's context
    ("opt-tokens-one-row", "tiny-opt", "pipelined", 0.5, 1, 1, False, {}, "tokens"),
    ("gqa-tokens-padded", "tiny-llama-gqa", "kvpr", 0.4, 3, 1, True, {}, "tokens"),
    ("gqa-tokens-micro", "tiny-llama-gqa", "full_offload", 0.0, 4, 2, False, {}, "tokens"),
    ("mistral-w5-tokens", "tiny-mistral-w5", "pipelined", 0.5, 2, 1, True, {}, "tokens"),
    ("gemma2-w5-tokens", "tiny-gemma2-w5", "pipelined", 0.3, 2, 1, False,
     {"do_sample": True, "seed": 3, "top_p": 0.9}, "tokens"),
]


def _spec(family):
    from kvc.models import preset

    if family == "tiny-mistral-w5":
        return replace(preset("tiny-llama-gqa"), model_type="mistral", sliding_window=5)
    if family == "tiny-gemma2-w5":
        return replace(preset("tiny-gemma2"), sliding_window=5)
    return preset(family)


def _inputs(spec, batch, padded):
    ids = torch.randint(1, spec.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :6] = 0
        mask[-1, :2] = 0
    return ids, mask


def _run(case, ranks: Ranks, eos=None, device="cpu"):
    """(tokens, logits) of one case on this process as `ranks` says (fp32 on `device`)."""
    from kvc_fixtures import perturb_small_params

    from kvc.api import assemble
    from kvc.compiler.lowering import lower
    from kvc.ir.plan import forced_plan
    from kvc.models import build_model

    _name, family, mode, fraction, batch, micro, padded, kw, split = case
    spec = _spec(family)
    m = perturb_small_params(build_model(spec, "cpu", torch.float32, seed=0)).to(device)
    plan = forced_plan(mode, spec.num_layers, PROMPT, GEN, 64, fraction, act_chunks=2,
                       micro_batches=micro)
    if not ranks.single:  # a plan is one rank's: a row split's batch is the rank's share
        ranks = replace(ranks, split=split)
        plan = replace(plan, world_size=ranks.world, split=split,
                       batch_size=ranks.share(batch) if split == "rows" else batch)
    cm = assemble(lower(m, plan), plan, spec, torch.float32, torch.device(device), ranks=ranks)
    ids, mask = _inputs(spec, batch, padded)
    kw = dict(kw)
    if "eos_token_id" in kw:
        kw["eos_token_id"] = eos
    try:
        tokens, logits = cm.generate(ids.to(device), GEN, return_logits=True, attention_mask=mask, **kw)
        # the cached tokens this process's GPU side read at the last step, over all units
        read = sum(cm._cache.cached.values()) if cm._cache is not None else 0
        return tokens.cpu(), logits.cpu(), read
    finally:
        cm.close()


def _worker(rank, out, eos, cuda=False, backend="gloo"):
    """One rank: on the CPU, or on cuda:rank (cuda:0 for every rank when `backend` is gloo:
    two processes sharing one GPU, which NCCL refuses)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = "cpu"
    if cuda:
        device = f"cuda:{rank if backend == 'nccl' else 0}"
        torch.cuda.set_device(device)
    # a file store in the test's folder: no port to race other processes for
    dist.init_process_group(backend, init_method=f"file://{out}/store", rank=rank, world_size=WORLD)
    try:
        torch.save({c[0]: _run(c, Ranks(WORLD, rank), eos, device) for c in CASES}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """Every case decoded by one process, and by each of 2 gloo ranks."""
    torch.set_num_threads(1)
    eos_case = next(c for c in CASES if "eos_token_id" in c[7])
    # an EOS id the first row emits at its third step, so rows finish at different steps
    eos = int(_run(eos_case, Ranks())[0][0, PROMPT + 2])
    single = {c[0]: _run(c, Ranks(), eos) for c in CASES}
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(out), eos), nprocs=WORLD, join=True)
    return single, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], eos


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_two_ranks_decode_what_one_process_decodes(ranked, case):
    single, ranks, _ = ranked
    want_tokens, want_logits, want_read = single[case]
    for r, got in enumerate(ranks):
        tokens, logits, _ = got[case]
        assert torch.equal(tokens, want_tokens), f"{case}: rank {r}'s tokens differ from one process's"
        err = (logits - want_logits).abs().max().item()
        assert err <= 1e-5, f"{case}: rank {r}'s logits off by {err:.2e}"
    if "tokens" in case:  # the ranks' shares are the whole context, each about half of it
        reads = [got[case][2] for got in ranks]
        assert sum(reads) == want_read and max(reads) <= want_read // WORLD + 8, reads


def test_eos_finished_rows_early(ranked):
    single, _, eos = ranked
    tokens = single["opt-eos"][0]
    assert tokens.shape[1] <= PROMPT + GEN and (tokens[:, PROMPT:] == eos).any(dim=1).any()


def test_the_single_process_matches_the_reference():
    """What the ranks are held to is itself the reference decoder's (greedy cases)."""
    from kvc_fixtures import perturb_small_params

    from kvc.models import build_model
    from kvc.runtime.reference import ReferenceDecoder

    torch.set_num_threads(1)
    case = CASES[0]
    spec = _spec(case[1])
    m = perturb_small_params(build_model(spec, "cpu", torch.float32, seed=0))
    ids, mask = _inputs(spec, case[4], case[6])
    ref, _ = ReferenceDecoder(m, spec).generate(ids, GEN, return_logits=True, attention_mask=mask)
    assert torch.equal(_run(case, Ranks())[0], ref)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_two_gpu_ranks_decode_what_one_gpu_decodes(tmp_path, backend):
    """The same cases in 2 processes on CUDA (fp32) against one process on cuda:0: over NCCL
    on 2 GPUs, or over gloo with both ranks on one GPU (the CUDA path of a rank, on a
    machine with one GPU)."""
    if not torch.cuda.is_available() or (backend == "nccl" and torch.cuda.device_count() < WORLD):
        pytest.skip(f"needs {'2 CUDA devices' if backend == 'nccl' else 'CUDA'}")
    eos_case = next(c for c in CASES if "eos_token_id" in c[7])
    eos = int(_run(eos_case, Ranks(), device="cuda:0")[0][0, PROMPT + 2])
    single = {c[0]: _run(c, Ranks(), eos, "cuda:0") for c in CASES}
    mp.spawn(_worker, args=(str(tmp_path), eos, True, backend), nprocs=WORLD, join=True)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for name, (want_tokens, want_logits, _) in single.items():
            tokens, logits, _ = got[name]
            assert torch.equal(tokens, want_tokens), f"{name}: GPU rank {r}'s tokens differ"
            err = (logits - want_logits).abs().max().item()
            assert err <= 1e-4, f"{name}: GPU rank {r}'s logits off by {err:.2e}"


def test_rows_and_shares():
    r = Ranks(4, 3)
    assert r.share(30) == 8 and r.rows(30) == slice(24, 32)
    assert Ranks(2, 0).rows(3) == slice(0, 2) and Ranks(2, 1).rows(3) == slice(2, 4)
    assert Ranks().single and Ranks().share(7) == 7
    t = [Ranks(3, r, "tokens") for r in range(3)]
    assert [x.bounds(10, x.rank) for x in t] == [(0, 3), (3, 6), (6, 10)]
    assert t[1].rows(5) == slice(0, 5) and t[2].splits_tokens and not t[2].splits_rows
    x = torch.ones(2, 3)
    assert t[0].gather(x) is x  # a token split's ranks hold every row: nothing to gather


def test_merge_all_is_the_softmax_over_every_part():
    from kvc.models.attend import merge_all

    gen = torch.Generator().manual_seed(0)
    scores, v = torch.randn(5, 3, 2, 11, generator=gen), torch.randn(5, 3, 2, 11, 4, generator=gen)
    scores[1, 0] = float("-inf")  # a part with no key for one row
    want = torch.einsum("bhn,bhnd->bhd", torch.cat(list(scores), -1).softmax(-1),
                        torch.cat(list(v), -2))
    lse = scores.logsumexp(-1)
    outs = torch.nan_to_num(torch.einsum("pbhn,pbhnd->pbhd", (scores - lse[..., None]).exp(), v))
    out, total = merge_all(outs, lse)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(total, torch.cat(list(scores), -1).logsumexp(-1))


def test_kvc_run_nproc_2_writes_what_one_process_writes(tmp_path):
    """The whole path: artifacts compiled for parallel.world_size=2 (split by rows, and by
    tokens), `kvc run --nproc 2` (torchrun, 2 gloo processes on the CPU) on a JSONL job of
    mixed prompts, against the same job through a 1-process artifact: the same output lines;
    one summary line, from rank 0."""
    import json
    import subprocess
    import sys

    pytest.importorskip("transformers")
    from text_fixtures import compile_text_artifact

    from kvc.cli import main

    one = compile_text_artifact(tmp_path / "one", batch_size=4, prompt_len=40, gen_len=6)
    records = [{"id": k, "prompt_ids": list(range(3 + 5 * k, 3 + 11 * k + 4))} for k in range(5)]
    records += [{"id": 5, "prompt": "the cat sat on the mat", "stop": "the"},
                {"id": 6, "prompt_ids": [7, 8, 9], "max_new_tokens": 2}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["run", str(one), "--input", str(inp), "--output", str(tmp_path / "one.jsonl"),
                 "--device", "cpu", "--no-progress"]) == 0
    want = (tmp_path / "one.jsonl").read_text().splitlines()
    assert len(want) == len(records)
    for split in ("rows", "tokens"):
        two = compile_text_artifact(tmp_path / split, batch_size=4, prompt_len=40, gen_len=6,
                                    overrides=("parallel.world_size=2", f"parallel.split={split}"))
        out = tmp_path / f"{split}.jsonl"
        done = subprocess.run([sys.executable, "-m", "kvc", "--no-progress", "run", str(two), "--nproc", "2",
                               "--device", "cpu", "--input", str(inp), "--output", str(out)],
                              check=False, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert out.read_text().splitlines() == want, split
        assert not out.with_name(out.name + ".partial").exists()
        assert sum(line.startswith("kvc: 7 prompts") for line in done.stderr.splitlines()) == 1, done.stderr
    # the 2-process artifact in one process: one line naming the world size and how to run it
    bad = subprocess.run([sys.executable, "-m", "kvc", "run", str(two), "--device", "cpu",
                          "--prompt-ids", "1,2,3"], check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "parallel.world_size = 2" in bad.stderr and "--nproc 2" in bad.stderr


def test_a_rank_finds_its_gpus_numa_node(tmp_path, monkeypatch):
    """gpu_cpus reads the GPU's PCI address from torch and its node's CPUs from sysfs; one
    node (or no such file) means nothing to pin."""
    from types import SimpleNamespace

    from kvc.runtime import parallel

    assert parallel.parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    (tmp_path / "devices/system/node/node0").mkdir(parents=True)
    props = SimpleNamespace(pci_bus_id=0x1A, pci_device_id=0, pci_domain_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert parallel.gpu_cpus(torch.device("cuda", 0), str(tmp_path)) is None  # one node
    (tmp_path / "devices/system/node/node1").mkdir()
    assert parallel.gpu_cpus(torch.device("cuda", 0), str(tmp_path)) is None  # no file
    pci = tmp_path / "bus/pci/devices/0000:1a:00.0"
    pci.mkdir(parents=True)
    (pci / "local_cpulist").write_text("16-19,48\n")
    assert parallel.gpu_cpus(torch.device("cuda", 0), str(tmp_path)) == {16, 17, 18, 19, 48}
