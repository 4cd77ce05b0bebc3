"""Endless, shuffled, resumable batches: MLM blocks (language modules) and encoded examples (task modules).

Both iterators draw one fresh permutation per epoch from their own generator and checkpoint
their position with :meth:`state_dict`, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import torch

from xlpeft.data.tasks import Encoded, collate


class BlockBatches:
    """Endless shuffled batches (B, T) over blocks, one fresh permutation per epoch; resumable.

    The position (epoch permutation + offset) and the generator state are part of
    :meth:`state_dict`, so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.blocks, self.batch_size, self.generator = blocks, batch_size, generator
        self.order: torch.Tensor | None = None
        self.offset = 0

    def __iter__(self) -> BlockBatches:
        return self

    def __next__(self) -> torch.Tensor:
        n = self.blocks.shape[0]
        size = min(self.batch_size, n)
        if self.order is None or self.offset + size > n:
            self.order = torch.randperm(n, generator=self.generator, dtype=torch.int32)  # the int64 permutation's values
            self.offset = 0
        idx = self.order[self.offset:self.offset + size]
        self.offset += size
        return self.blocks[idx]

    def state_dict(self) -> dict[str, torch.Tensor]:
        order = self.order if self.order is not None else torch.empty(0, dtype=torch.long)
        return {"data.order": order, "data.offset": torch.tensor(self.offset), "rng.data": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.order = state["data.order"] if len(state["data.order"]) else None
        self.offset = int(state["data.offset"])
        self.generator.set_state(state["rng.data"])

    def close(self) -> None:
        """Nothing to release (a stream's :meth:`~xlpeft.data.stream.StreamBatches.close` stops its reader)."""


def batches(blocks: torch.Tensor, batch_size: int, generator: torch.Generator) -> BlockBatches:
    """Endless shuffled batches (B, T) over the blocks; each epoch a fresh permutation from ``generator``."""
    return BlockBatches(blocks, batch_size, generator)


class ExampleBatches:
    """Endless shuffled, padded batches of encoded examples; resumable like :class:`BlockBatches`."""

    def __init__(self, enc: Encoded, n: int, batch_size: int, pad_id: int, generator: torch.Generator) -> None:
        self.enc, self.pad_id = enc, pad_id
        self.indices = BlockBatches(torch.arange(n), batch_size, generator)  # shuffles example indices

    def __iter__(self) -> ExampleBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate(self.enc, next(self.indices).tolist(), self.pad_id)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.indices.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.indices.load_state_dict(state)


class SourceBatches:
    """Batches of several source languages, each batch from one source drawn with ``probs``; resumable.

    Multi-source task training (:mod:`xlpeft.multisource`): :attr:`current` is the language of the
    batch just returned, so the loss swaps that language's module in. The draw has its own
    generator, checkpointed with every source's position, so a resumed run (and every data-parallel
    rank, seeded alike) sees the same language at every step.
    """

    def __init__(self, sources: dict[str, ExampleBatches], probs: list[float], generator: torch.Generator) -> None:
        self.sources, self.generator = sources, generator
        self.langs = list(sources)
        self.probs = torch.tensor(probs, dtype=torch.float64)  # (S,)
        self.current: str | None = None

    def __iter__(self) -> SourceBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        i = int(torch.multinomial(self.probs, 1, generator=self.generator))
        self.current = self.langs[i]
        return next(self.sources[self.current])

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"rng.sources": self.generator.get_state()}
        for lang, batches in self.sources.items():
            state.update({f"source.{lang}.{k}": v for k, v in batches.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["rng.sources"])
        for lang, batches in self.sources.items():
            prefix = f"source.{lang}."
            batches.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
