"""RoPE on recomputed K, as the recompute pass runs it, against other formulations that must
round exactly as HF's `x * cos + rotate_half(x) * sin` (bit for bit, in the model dtype).

    python tools/rope_bench.py            # on the GPU machine; prints a markdown table

The recomputed K of one chunk is token-major memory ([n, b, heads, hd], contiguous) seen as a
[b, n, heads, hd] view; cos/sin are [n, hd] tables whose two halves are equal (HF's
`cat((freqs, freqs))`). Each variant's GPU time (CUDA events, median) is reported with its
equivalent passes over K at the hardware preset's mem_gbps (what cost.ELEMENTWISE_PASSES
charges per recomputed token) and whether it equals the traced formula bit for bit.
"""
from __future__ import annotations

import argparse

import torch

from kvc.config import load_config
from kvc.api import resolve


def traced(x, c, s, half):
    """The model's _rope as the recompute pass leaves it: rotate-half's cat in token-major
    memory (passes/recompute.py), the products and sum on the [b, n, ...] views."""
    xt = x.transpose(0, 1)
    rot = torch.cat((-xt[..., half:], xt[..., :half]), dim=-1).transpose(0, 1)
    return x * c + rot * s


def halves(x, c, s, half):
    """Each output half from its own products: out1 = x1*c - x2*s, out2 = x2*c + x1*s (the
    negation inside HF's product is exact, so its rounding is the same)."""
    x1, x2, c1, s1 = x[..., :half], x[..., half:], c[..., :half], s[..., :half]
    out = torch.cat(((x1 * c1 - x2 * s1).transpose(0, 1), (x2 * c1 + x1 * s1).transpose(0, 1)), -1)
    return out.transpose(0, 1)


def two_products(x, c, s, half):
    """Both full-width products once, then the halves' sum and difference."""
    p, q = x * c, x * s
    out = torch.cat(((p[..., :half] - q[..., half:]).transpose(0, 1),
                     (p[..., half:] + q[..., :half]).transpose(0, 1)), -1)
    return out.transpose(0, 1)


def into_buffer(x, c, s, half):
    """two_products writing both halves into one token-major buffer (no cat)."""
    p, q = x * c, x * s
    out = torch.empty_like(x.transpose(0, 1)).transpose(0, 1)
    torch.sub(p[..., :half], q[..., half:], out=out[..., :half])
    torch.add(p[..., half:], q[..., :half], out=out[..., half:])
    return out


VARIANTS = {"traced (now)": traced, "halves": halves, "two products": two_products,
            "into one buffer": into_buffer}


def gpu_ms(fn, reps=20):
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return sorted(out)[len(out) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per recompute chunk")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.float16
    hw = resolve(load_config({"model": {"preset": "llama-2-7b"}}, ["hardware=h200-pcie5"])).hardware
    n, b, heads, hd = args.tokens, args.batch, 32, 128
    half = hd // 2
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(n, b, heads, hd, device=dev, generator=g).to(dt).transpose(0, 1)  # [b, n, ...] view
    ang = torch.rand(n, half, device=dev, generator=g) * 100
    emb = torch.cat((ang, ang), -1)
    c, s = emb.cos().to(dt)[:, None, :], emb.sin().to(dt)[:, None, :]
    k_bytes = x.numel() * x.element_size()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  K chunk [{n}, {b}, {heads}, {hd}]")
    print("| variant | GPU ms | passes over K at mem_gbps | equal to traced |")
    print("|---|---|---|---|")
    want = traced(x, c, s, half)
    print(f"| copy (2 passes: read + write) | {gpu_ms(lambda: x.clone()):.3f} | "
          f"{gpu_ms(lambda: x.clone()) * 1e-3 * hw.stream_gbps * 1e9 / k_bytes:.1f} | - |")
    for name, fn in VARIANTS.items():
        ms = gpu_ms(lambda: fn(x, c, s, half))
        same = torch.equal(fn(x, c, s, half), want)
        layout = fn(x, c, s, half).transpose(0, 1).is_contiguous()
        print(f"| {name} | {ms:.3f} | {ms * 1e-3 * hw.stream_gbps * 1e9 / k_bytes:.1f} | "
              f"{same}{'' if layout else ' (batch-major out)'} |")


if __name__ == "__main__":
    main()
