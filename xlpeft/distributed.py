"""Data parallelism on torch.distributed, for ``torchrun --nproc_per_node=N -m xlpeft train-lang ...``.

Every rank draws the same global batch and masking (same seeds) and trains on its slice of the
rows. N ranks compute exactly what one process computes on the same global batch: each rank's
loss is its *sum* of cross-entropy divided by the labelled positions of the whole global
micro-batch (which every rank can count, since it holds the whole batch), and gradients are
*summed* across ranks. Averaging per-rank means instead would weight a rank's positions by
1/its own count, not 1/the global count. All ranks keep identical weights (and LT-SFT picks
identical masks); each rank gets its own dropout stream (:meth:`Dist.seed_dropout`). Rank 0
alone talks to MLflow and writes artifacts and checkpoints. gloo on CPU, NCCL on GPU.
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

    def sync_grads(self, params: list[nn.Parameter], loss: float | None = None) -> float | None:
        """Sum gradients (and the step's partial loss) over ranks, in one flat all-reduce.

        Summing is right because each rank's loss is already divided by the global count of
        labelled positions (see the module docstring). Returns the summed loss (None if not given).
        """
        if not self.active:
            return loss
        grads = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else (params[0].device if params else torch.device("cpu"))
        parts = [g.reshape(-1).float() for g in grads]
        parts.append(torch.tensor([0.0 if loss is None else loss], device=device))
        flat = torch.cat(parts)
        torch.distributed.all_reduce(flat)  # SUM
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return None if loss is None else float(flat[-1])

    def seed_dropout(self, seed: int, step: int = 0) -> None:
        """Give this rank its own global RNG stream (dropout); rank 0 keeps a single process's stream.

        Call after the trainable modules are initialised (which must be identical on every rank);
        the data-order and masking generators are separate and stay shared. On resume (``step`` >
        0) the checkpoint restored rank 0's stream everywhere, so the other ranks re-seed from
        (seed, rank, step): distinct streams again, though not the ones an uninterrupted run had.
        """
        if self.rank > 0:
            torch.manual_seed((seed * 1_000_003 + self.rank) * 1_000_033 + step)

    def same_everywhere(self, tensor: torch.Tensor, what: str) -> None:
        """Fail loudly if ranks disagree (e.g. on an LT-SFT mask)."""
        if not self.active:
            return
        checksum = torch.tensor([float(tensor.double().sum()), float(tensor.numel())], dtype=torch.float64)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, checksum)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise XlpeftError(f"data-parallel ranks disagree on {what}; this is a bug, please report it")

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (same shape and dtype everywhere); CPU in, CPU out, also under NCCL."""
        if not self.active:
            return tensor
        nccl = torch.distributed.get_backend() == "nccl"
        moved = tensor.cuda() if nccl else tensor.clone()
        torch.distributed.broadcast(moved, src=0)
        return moved.cpu() if nccl else moved

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
