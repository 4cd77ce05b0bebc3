"""Activation checkpointing for the training loop (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").

With the encoder frozen, a module's step is dominated in memory by the encoder's activations, not
by what trains: on the mBERT-base shape at 8 x 256 about 2 GiB of the sparse delta's 4-4.6 GiB
peak (``benchmarks/README.md``). ``--set activation_checkpointing=true`` keeps only each encoder
layer's input in the forward pass and runs the layer again in the backward pass: the activations
of one layer at a time, for about one more forward pass per step.

transformers' own per-layer checkpointing is switched on for the training phases and off after
them (non-reentrant ``torch.utils.checkpoint``, which needs no ``requires_grad`` on a frozen
layer's input, so the embeddings' output is not made to require it). It checkpoints each layer's
``forward``, so xlpeft's hooks on the layer's sub-modules run again in the recomputation, with
the random state of the first run (dropout draws the same masks). Every hook is a function of
its inputs and of the composition's state, except counters that pair a forward pass with its
backward (the sparse delta's entry taps): those ask :func:`recomputing` and count the original
forward only.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import nn

from xlpeft.errors import ConfigError

_depth = 0  # recomputations in progress (the autograd engine runs them one at a time)
_count = 0  # recomputations run in this process, for tests and benchmarks to see checkpointing engaged


def recomputing() -> bool:
    """True inside a checkpointed layer's recomputation in the backward pass (not its original forward)."""
    return _depth > 0


def recompute_count() -> int:
    """How many checkpointed-layer recomputations this process has run."""
    return _count


@contextlib.contextmanager
def _recomputation() -> Iterator[None]:
    global _depth, _count
    _depth += 1
    _count += 1
    try:
        yield
    finally:
        _depth -= 1


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``torch.utils.checkpoint``'s ``context_fn``: (around the original forward, around the recomputation)."""
    return contextlib.nullcontext(), _recomputation()


@contextlib.contextmanager
def checkpointed_activations(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Checkpoint ``model``'s encoder layers while the block runs (in train mode and with gradients only).

    Raises:
        ConfigError: the model's class has no per-layer checkpointing in transformers.
    """
    if not enabled:
        yield
        return
    if not model.supports_gradient_checkpointing:
        raise ConfigError(f"activation_checkpointing=true, but {type(model).__name__} has no activation "
                          "checkpointing in transformers; drop --set activation_checkpointing")
    kwargs = {"use_reentrant": False, "context_fn": _contexts}
    with warnings.catch_warnings():  # later 5.x releases alias this as activation_checkpointing_enable; 5.0 has only it
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()  # non-reentrant checkpoints need no gradient on the embeddings' output
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_disable()
