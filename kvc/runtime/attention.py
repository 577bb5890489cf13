"""The attention kernels kvc lets scaled_dot_product_attention pick.

Every decode step attends over a context one token longer than the last. cuDNN's attention
(PyTorch's first choice for fp16 on Hopper) builds an execution graph for each new shape and
caches it, so in decoding it builds one every step: a miss every step, for every sequence
length never seen before in the process (`tools/sdpa_bench.py` measures the build against
the kernels that need none). The flash and memory-efficient kernels take any length as it
comes. Compiled models, the reference decoder and the profiler all run inside `backends()`,
so they compute with the same kernels, and the cost model is fitted to the kernels that run.
On the CPU nothing changes: cuDNN is not a CPU backend.
"""
from __future__ import annotations

from torch.nn.attention import SDPBackend, sdpa_kernel

# in priority order: flash where it applies (fp16/bf16), then memory-efficient (fp32 too),
# math last (anything)
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def backends():
    """Context manager (or decorator): scaled_dot_product_attention inside it never uses cuDNN."""
    return sdpa_kernel(BACKENDS, set_priority=True)
