"""Random MLM batches on a tiny base, shared by the sparse fine-tuning tests."""

import torch

from xlpeft.data.mlm import mask_tokens
from xlpeft.training import mlm_loss


def random_batches(base, seed=0):
    """Endless (4, 16) batches of random token ids (no special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(5, len(base.tokenizer), (4, 16), generator=gen)


def masked_loss(base, seed=1):
    """ids -> MLM loss with 30% of positions masked by its own seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(ids):
        inputs, labels = mask_tokens(ids, base.tokenizer, 0.3, gen)
        return mlm_loss(base, inputs, labels)
    return loss_fn
