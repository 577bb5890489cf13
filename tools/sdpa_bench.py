"""Decode attention by scaled_dot_product_attention backend, as kvc calls it: one query token
against a token-major cache view ([max_tokens, b, heads, hd] sliced to the context and
transposed), the context one token longer every step.

    python tools/sdpa_bench.py            # on the GPU machine; prints a markdown table

For each backend and shape it reports, per call (a sync after each):
- `new ms`: the context length never seen before, as in decoding (cuDNN builds an execution
  graph per shape and stride: this is where that build shows);
- `seen ms`: the same lengths again (every backend's steady cost);
- `max|d|`: the largest difference from the math backend in fp32, over those calls.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
# (label, batch, query heads per KV head, KV heads, head dim, first context)
SHAPES = [("opt-6.7b b8", 8, 1, 32, 128, 512), ("opt-6.7b b32", 32, 1, 32, 128, 1024),
          ("llama-3-8b b32 (GQA, stacked)", 32, 4, 8, 128, 2048)]


def calls(q, k, v, lengths, backend):
    """Per-call ms (synced) and the outputs, one call per context length."""
    out, ms = [], []
    with sdpa_kernel(backend):
        for n in lengths:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            o = F.scaled_dot_product_attention(q, k[:n].permute(1, 2, 0, 3), v[:n].permute(1, 2, 0, 3))
            torch.cuda.synchronize()
            ms.append((time.perf_counter() - t0) * 1e3)
            out.append(o)
    return ms, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16, help="decode steps (new lengths) per shape")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.float16
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| shape | backend | new ms | seen ms | max abs diff vs math fp32 |")
    print("|---|---|---|---|---|")
    g = torch.Generator(dev).manual_seed(0)
    for label, b, groups, kv_heads, hd, ctx in SHAPES:
        rows = ctx + args.steps
        k = torch.randn(rows, b, kv_heads, hd, device=dev, generator=g).to(dt)
        v = torch.randn(rows, b, kv_heads, hd, device=dev, generator=g).to(dt)
        # GQA as kvc runs it: the query heads of a KV head stacked as query rows
        q = torch.randn(b, kv_heads, groups, hd, device=dev, generator=g).to(dt)
        lengths = list(range(ctx + 1, rows + 1))
        _, exact = calls(q.float(), k.float(), v.float(), lengths, SDPBackend.MATH)
        for name, backend in BACKENDS.items():
            try:
                new, out = calls(q, k, v, lengths, backend)
                seen, _ = calls(q, k, v, lengths, backend)
            except RuntimeError as e:  # a backend that does not take this shape or dtype
                print(f"| {label} | {name} | n/a | n/a | {str(e).splitlines()[0][:60]} |")
                continue
            diff = max((o.float() - e).abs().max().item() for o, e in zip(out, exact))
            mid = lambda xs: sorted(xs)[len(xs) // 2]
            print(f"| {label} | {name} | {mid(new):.3f} | {mid(seen):.3f} | {diff:.2e} |")


if __name__ == "__main__":
    main()
