"""Layer-parallel calibration over torch.distributed (started by torchrun): each rank owns a contiguous range of
decoder layers, reaches its range's full-precision inputs by running the float layers before it, calibrates its
range, and rank 0 gathers every layer's state. Backend by device: gloo (cpu), nccl (cuda), hccl (npu)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import FlatQuantError

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun set up (RANK/WORLD_SIZE/MASTER_ADDR in the environment); returns the rank
    info and this rank's device (cuda:LOCAL_RANK / npu:LOCAL_RANK on accelerators)."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise FlatQuantError("--distributed needs torchrun: `torchrun --nproc_per_node N -m core quantize ... "
                             "--distributed` (RANK and WORLD_SIZE are not set).")
    backend = BACKENDS.get(device.type, "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type == "npu":
        device = torch.device("npu", local)
        torch.npu.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), backend), device


def layer_range(num_layers: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, balanced ranges; earlier ranks get the extra layer (they also run fewer float layers first)."""
    base, extra = divmod(num_layers, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_to_main(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` on rank 0 (in rank order); [] elsewhere. Objects are pickled by torch.distributed
    between our own ranks only."""
    import torch.distributed as dist

    if info.world == 1:
        return [obj]
    out = [None] * info.world if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def finish(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
