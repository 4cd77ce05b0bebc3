"""AdapterDrop (Rücklé et al., EMNLP 2021): adapter-like modules left out of the lowest transformer layers.

Two uses, for every :class:`~xlpeft.methods.adapters.HookedAdapter` (MAD-X adapters, Compacter,
parallel adapters and MAM's parallel adapter):

* **training** (``--set adapter_drop=N``, a field of each of those methods' configs): *robust*
  AdapterDrop (§3 of the paper): at every optimizer step the module is skipped in the lowest ``k``
  layers, ``k`` drawn uniformly from ``0..N``, so the trained module still works when the lowest
  layers are dropped at inference. ``k`` comes from a generator seeded by the run's ``seed``
  (the same draws on every data-parallel rank); its state and the current ``k`` are part of the
  trainable's checkpointed state, so a resumed run draws what the uninterrupted one drew.
  Only the module being trained is dropped; modules applied below it (a frozen language adapter)
  are not.
* **inference** (``xlpeft compose ... --adapter-drop N``, ``compose(..., adapter_drop=N)``): every
  adapter-like module of the composition skips the lowest ``N`` layers. The number is recorded in
  the composition (``xlpeft_composition.json``), so a saved composed model reloads the same.

What it saves: a skipped site runs none of the module's computation. The paper's inference
speed-up (its Table 1) comes mainly from *multi-task parallel inference*, where the base's lower
layers run once for many task adapters; with one composition the saving is the skipped adapters'
own cost only.

Not covered: LoRA and (IA)³ change or scale base weights (merged, they cost nothing at inference,
so dropping them saves nothing), and prefixes change attention rather than adding a module
after a sub-layer; the paper defines AdapterDrop for bottleneck adapters. MAM's prefix part is
therefore never dropped, only its parallel adapter. An embedding-level invertible adapter is not
part of any layer and is never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.methods.base import ModuleTrainable, Phase

GENERATOR_KEY, K_KEY = "adapter_drop.generator", "adapter_drop.k"
"""The trainable-state entries AdapterDrop adds (the generator's state, the current step's k)."""


def check_train_drop(n: int, num_layers: int) -> None:
    """``adapter_drop`` may drop at most ``layers - 1`` layers, as the paper's robust training keeps the top one.

    Raises:
        ConfigError: ``n`` exceeds ``num_layers - 1``.
    """
    if n > num_layers - 1:
        raise ConfigError(f"`adapter_drop` should be at most {num_layers - 1} (the base has {num_layers} layers and "
                          f"AdapterDrop keeps the top one); got {n}")


class DropTrainable(ModuleTrainable):
    """A :class:`ModuleTrainable` whose module skips the lowest ``k ~ U{0..max_drop}`` layers in each training step."""

    def __init__(self, module: nn.Module, detach: Callable[[], None], phase: Phase, stem: str, max_drop: int,
                 seed: int) -> None:
        super().__init__(module, detach, phase, stem)
        self.max_drop = max_drop
        self.generator = torch.Generator().manual_seed(seed + 7919)  # its own stream: masking and data keep theirs

    def _draw(self) -> None:
        self.module.step_drop = int(torch.randint(0, self.max_drop + 1, (1,), generator=self.generator))

    def begin_phase(self, phase: Phase) -> list[nn.Parameter]:
        self._draw()  # the first step's k
        return super().begin_phase(phase)

    def after_step(self, phase: Phase, step: int) -> None:
        self._draw()  # the next step's k, drawn now so a checkpoint written after this step holds it

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.module.state_dict(), GENERATOR_KEY: self.generator.get_state(),
                K_KEY: torch.tensor(self.module.step_drop)}

    def resume_phase(self, phase: Phase, state: dict[str, torch.Tensor]) -> list[nn.Parameter]:
        state = dict(state)
        generator, k = state.pop(GENERATOR_KEY, None), state.pop(K_KEY, None)
        if generator is None or k is None:
            raise XlpeftError("the checkpoint holds no AdapterDrop state (it was written with adapter_drop=0); "
                              "resume with the settings it was started with")
        self.module.load_state_dict(state, strict=True)
        self.generator.set_state(generator)
        self.module.step_drop = int(k)
        self.module.train()
        return list(self.module.parameters())

    def close(self) -> None:
        self.module.step_drop = 0
        super().close()


def set_inference_drop(modules: Iterable[nn.Module], n: int, num_layers: int) -> int:
    """Make every adapter-like module among ``modules`` skip the lowest ``n`` layers; returns how many there were.

    Raises:
        XlpeftError: ``n`` is negative or larger than the number of layers, or ``n`` > 0 and no module is adapter-like.
    """
    from xlpeft.methods.adapters import HookedAdapter

    if not 0 <= n <= num_layers:
        raise XlpeftError(f"--adapter-drop should be between 0 and {num_layers} (the base's layers); got {n}")
    hooked = [m for m in modules if isinstance(m, HookedAdapter)]
    if n and not hooked:
        raise XlpeftError(f"--adapter-drop {n}: the composition holds no adapter-like module (adapter, compacter, "
                          "parallel, mam) to drop; leave it out")
    for module in hooked:
        module.drop_below = n
    return len(hooked)
