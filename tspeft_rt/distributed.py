"""Training on several processes under `torchrun`: PyTorch DDP or FSDP2, and the RNG plan that keeps both exact.

    torchrun --standalone --nproc-per-node 2 -m tspeft_rt.cli train run.yaml                        # DDP
    torchrun --standalone --nproc-per-node 8 -m tspeft_rt.cli train run.yaml --set distributed=fsdp  # FSDP2

Every process takes its slice of the same global batch (`Trainer._micro_batches`) and scales its loss by
world / global target tokens, so the *mean* of the processes' gradients is the one-process gradient.

- **ddp**: every process holds the whole model; `DistributedDataParallel` averages the gradients.
- **fsdp**: PyTorch's FSDP2 (`fully_shard`) shards the frozen base weights of every decoder layer (the
  classes the model lists in `_no_split_modules`) and of the rest of the model across the processes and
  gathers a layer's weights only for its forward and backward. The adapter weights and thresholds are
  small and stay whole on every process (`ignored_params`): `average_gradients` averages their gradients
  once per step, so the optimizer, the τ controller, checkpoints and export are the same code as with one
  process.

On GPUs each process takes the GPU `LOCAL_RANK` and collectives run on NCCL; the statistics kept on the
host (loss sums, gate counts, log-ratios) go over a gloo group beside it, since NCCL takes device tensors
only.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tspeft_rt.errors import ConfigError


@dataclass
class Dist:
    """This process's place in the run; `host_group` carries the host-side statistics."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    host_group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """One process (no torchrun), or one of WORLD_SIZE: NCCL with the GPU `LOCAL_RANK` when CUDA is
    available, else gloo; either way a gloo group for the host-side statistics."""
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before NCCL: its communicators bind to the current device
    if world <= 1:
        return Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(dist.get_rank(), dist.get_world_size(), device, dist.new_group(backend="gloo"))


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed every RNG a step draws from (adapter dropout, on the CPU and all GPUs) from (seed, step, rank):
    each process has its own dropout stream, and a resumed run draws what the uninterrupted one drew, on
    any device, with no RNG state in the checkpoint."""
    torch.manual_seed(random.Random(f"{seed}:{step}:{rank}").getrandbits(63))


def shard_base(model: nn.Module, adapter_params: list[nn.Parameter], device: torch.device) -> None:
    """FSDP2 over the frozen base: each decoder layer, then the root (embeddings, norm, head), sharded
    across the processes; `adapter_params` moved to `device` and kept whole on every process."""
    from torch.distributed.fsdp import fully_shard

    kinds = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    if not blocks:
        raise ConfigError(f"distributed fsdp: {type(model).__name__} names no decoder layer class "
                          "(_no_split_modules) to shard by; use distributed: ddp", "distributed")
    for p in adapter_params:
        p.data = p.data.to(device)
    ignored = set(adapter_params)
    for block in blocks:
        fully_shard(block, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """The mean over processes of the gradients of `params` (the adapter under FSDP), in one all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))
