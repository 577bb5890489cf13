"""Several GPUs (issue 18): one process per GPU under torch.distributed, the batch split by rows.

Each rank (one process, one GPU, its own PCIe link) decodes `share(b)` = ceil(b / world)
consecutive rows of the batch, with the weights replicated and its own pinned pools, so every
link carries its own rows' cache and no layer waits on another GPU. After each step the ranks
all-gather the last position's logits ([rows, vocab]), and every rank chooses the whole batch's
tokens the same way (greedy, sampling from the same seed, EOS and stop strings): the ranks
stay in step, return the same tokens, and those are the tokens one process decodes.

Why rows and not token ranges: a row split moves the same bytes per link as a token split,
but needs no collective per layer (one per step, outside the CUDA graphs), no replicated
projections and MLP, and no merge of partial attention; it cannot split a batch of one row
(a long single context), which a token split could.

The job is torch.distributed's: started by torchrun (or `kvc run --nproc N`, which starts
torchrun), its environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT) or a process group
the caller initialised; NCCL between GPUs, gloo between CPU processes. Across hosts it is the
same code, given a multi-host torchrun (untested here).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvc.errors import KvcError


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job: `world` processes, this one `rank`, and how the
    work is split: "rows" of each batch, or "tokens" of each offloaded layer's context."""

    world: int = 1
    rank: int = 0
    split: str = "rows"

    @property
    def single(self) -> bool:
        return self.world == 1

    @property
    def splits_rows(self) -> bool:
        return self.world > 1 and self.split == "rows"

    @property
    def splits_tokens(self) -> bool:
        return self.world > 1 and self.split == "tokens"

    def bounds(self, n: int, rank: int) -> tuple[int, int]:
        """A token split: rank `rank`'s share [a, b) of n tokens (contiguous, sizes within one)."""
        return n * rank // self.world, n * (rank + 1) // self.world

    def merge(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """A token split's attention: every rank's part (out [..., hd], lse [...], float32)
        gathered (one all-gather) and merged exactly by log-sum-exp, the same on every rank."""
        from kvc.models.attend import merge_all

        both = self.gather_stacked(torch.cat([out, lse[..., None]], -1))
        return merge_all(both[..., :-1], both[..., -1])[0]

    def gather_stacked(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` stacked along a new dim 0, in rank order."""
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        return torch.stack(parts)

    def same(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank (a token split's chosen tokens: every rank computed
        them alike; this makes sure they decode the same sequence)."""
        if self.single:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        dist.broadcast(x, src=0)
        return x

    def share(self, batch: int) -> int:
        """Rows (or tokens) per rank, rounded up: the last ranks' short shares of a row split
        are padded with copies."""
        return -(-batch // self.world)

    def rows(self, batch: int) -> slice:
        """This rank's rows of a batch padded to world * share(batch) (a token split: all)."""
        if not self.splits_rows:
            return slice(0, batch)
        k = self.share(batch)
        return slice(self.rank * k, (self.rank + 1) * k)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """A row split: every rank's `x` (the same shape on each), concatenated along dim 0 in
        rank order (a token split's ranks all hold the whole batch: `x` as it is)."""
        if not self.splits_rows:
            return x
        return self.gather_stacked(x).flatten(0, 1)

    def broadcast(self, obj):
        """Rank 0's `obj` (a picklable value) on every rank."""
        if self.single:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Ranks()


def env_world() -> int:
    """The world size torchrun announced (1: none)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise KvcError(f"WORLD_SIZE = {os.environ['WORLD_SIZE']!r}: expected an integer "
                       "(torchrun sets it)") from None


def env_rank() -> int:
    """This process's rank as torchrun announced it (0 outside a job)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def join(device: torch.device | None) -> tuple[Ranks, torch.device | None]:
    """This process's place in a torch.distributed job, and the device it should use.

    Outside a job (no WORLD_SIZE > 1, no initialised group): a single rank and `device` as
    given. Inside one: the default process group (initialised here from torchrun's
    environment if the caller has not: NCCL for CUDA, gloo for CPU), and on a GPU machine
    the rank's own GPU, cuda:LOCAL_RANK, unless `device` names one."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and env_world() == 1:
        return SINGLE, device
    if not dist.is_available():
        raise KvcError("this torch build has no torch.distributed; kvc cannot run several processes")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise KvcError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} "
                           "CUDA device(s); start at most that many processes per host")
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        near = gpu_cpus(device)
        if near:  # the rank's threads, and the pinned pools they first touch, on its GPU's node
            os.sched_setaffinity(0, (near & os.sched_getaffinity(0)) or near)
    if not initialised:
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if key not in os.environ:
                raise KvcError(f"WORLD_SIZE is {env_world()} but {key} is not set: start the job "
                               "with torchrun --nproc-per-node N (or kvc run --nproc N)")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _made.append(True)
        atexit.register(_leave)
    return Ranks(dist.get_world_size(), dist.get_rank()), device


def parse_cpulist(text: str) -> set[int]:
    """A kernel CPU list ("0-15,32-47") as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def gpu_cpus(device: torch.device, sysfs: str = "/sys") -> set[int] | None:
    """The CPUs of the NUMA node a GPU hangs off, on a host with several nodes (None: one
    node, or the kernel does not say): where a rank's pinned pools should live."""
    root = Path(sysfs)
    if len(list((root / "devices/system/node").glob("node[0-9]*"))) < 2:
        return None
    props = torch.cuda.get_device_properties(device)
    bus, dev = getattr(props, "pci_bus_id", None), getattr(props, "pci_device_id", None)
    if bus is None or dev is None:
        return None
    name = f"{int(getattr(props, 'pci_domain_id', 0) or 0):04x}:{int(bus):02x}:{int(dev):02x}.0"
    try:
        cpus = parse_cpulist((root / "bus/pci/devices" / name / "local_cpulist").read_text())
    except (OSError, ValueError):
        return None
    return cpus or None


def finish() -> bool:
    """A job that went well, at its end: every rank waits for the others (a barrier); True
    when this process is a rank of a group kvc made, which the caller then ends at once
    (`os._exit`, kvc.cli): gloo's worker threads torn down at exit can take a finished
    process down ("terminate called without an active exception", about 1 launch in 10 on
    a loaded 2-core machine, with or without destroy_process_group). Not at a failure: the
    others may be inside another collective, and the launcher ends them."""
    import torch.distributed as dist

    if not (_made and dist.is_initialized()):
        return False
    dist.barrier()
    return True


_made: list[bool] = []  # kvc initialised the default group (torchrun's environment)


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
