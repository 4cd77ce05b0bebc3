"""Data parallelism on torch.distributed, for ``torchrun --nproc_per_node=N -m xlpeft train-lang ...``.

Every rank draws the same global batch and masking (same seeds) and trains on its slice of the
rows; gradients of the trainable parameters are averaged after backward, so all ranks keep
identical weights (and LT-SFT picks identical masks). Rank 0 alone talks to MLflow and writes
artifacts and checkpoints. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from xlpeft.errors import XlpeftError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (B, ...) -> (B / world, ...)."""
        if not self.active:
            return batch
        if batch.shape[0] % self.world:
            raise XlpeftError(f"batch size {batch.shape[0]} is not divisible by the {self.world} processes; "
                              f"pass --batch-size as a multiple of {self.world}")
        return batch[self.rank::self.world]

    def sync_grads(self, params: list[nn.Parameter]) -> None:
        """Average gradients over ranks (one flat all-reduce per call)."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def same_everywhere(self, tensor: torch.Tensor, what: str) -> None:
        """Fail loudly if ranks disagree (e.g. on an LT-SFT mask)."""
        if not self.active:
            return
        checksum = torch.tensor([float(tensor.double().sum()), float(tensor.numel())], dtype=torch.float64)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, checksum)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise XlpeftError(f"data-parallel ranks disagree on {what}; this is a bug, please report it")

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        """Wait for every rank, then leave the process group; exiting with it alive can abort gloo's threads."""
        if self.active and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def init_from_env(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size())


def local_device(name: str) -> torch.device:
    """``auto`` on a multi-GPU torchrun picks this rank's GPU (LOCAL_RANK)."""
    if name == "auto" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    from xlpeft.training import pick_device

    return pick_device(name)
