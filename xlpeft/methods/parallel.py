"""Parallel adapters (He et al., ICLR 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").

A bottleneck reads the sub-layer's *input* ``x`` rather than its output, and its scaled output is
added beside the sub-layer's (the paper's Eq. 8 with scaling ``s``, its "scaled PA"):

    h <- h + s * up(act(down(x))),   then the model computes LN(h + x),

with ``h`` the sub-layer's dense+dropout output and ``x`` its input (the residual stream, which
for the FFN is the attention block's output). He et al. find the FFN placement with s = 4 best;
that is the default, as AdapterHub 1.3.0's ``ParBnConfig`` (``par_bn``): FFN only, reduction
factor 2, relu, scaling 4.0, ``init_weights="mam_adapter"`` (down: PyTorch's Linear default,
Kaiming-uniform with a = sqrt(5); up and both biases zero), so an untrained module is the identity.

Matches AdapterHub's ``ParallelAdapter`` computation for one adapter: its ``pre_forward`` feeds the
sub-layer input to the bottleneck, ``forward`` scales the up-projection by ``scaling``, and
``post_forward`` adds the sub-layer output and applies LN(· + x). Parameter names
(``{p}`` = ``bert``/``roberta``, ``{a}`` the adapter name)::

    {p}.encoder.layer.{i}.output.adapters.{a}.adapter_down.0.weight / .bias  ->  layers.{i}.ffn.down.weight / .bias
    {p}.encoder.layer.{i}.output.adapters.{a}.adapter_up.weight / .bias      ->  layers.{i}.ffn.up.weight / .bias
    (attention.output.adapters -> layers.{i}.attn.*, with mh_adapter=True)

and AdapterHub's float ``scaling`` is this config's ``scaling`` (not folded into the weights).

Composition (``combine="stack"``): every module at a site adds its own ``s * A(x)`` to ``h`` after
the modules below it have acted, so parallel adapters of two modules sum (both read ``x``), and a
parallel adapter over a sequential one adds to the output that one produced. (AdapterHub's
``Stack`` of two parallel adapters keeps only the last one's output; xlpeft does not copy that.)
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from xlpeft.config import build, check_fields
from xlpeft.methods.adapters import HookedAdapter, apply_hooked, prepare_hooked
from xlpeft.methods.base import AppliedModule, MethodSpec, ModuleTrainable
from xlpeft.methods.bottleneck import ACTIVATIONS, Bottleneck

STEM = "parallel"
PARALLEL_PLACEMENTS = {"ffn": ("ffn",), "attn": ("attn",), "both": ("attn", "ffn")}
"""Where the parallel adapters sit: beside the FFN (He et al. 2022's best), beside attention, or both."""


@dataclass(frozen=True)
class ParallelConfig:
    """Hyper-parameters of a parallel-adapter module; defaults are AdapterHub 1.3.0's ``ParBnConfig`` (He et al. 2022)."""

    placement: str = field(default="ffn", metadata={
        "help": "ffn (beside the FFN, He et al. 2022's best), attn (beside self-attention) or both",
        "choices": tuple(PARALLEL_PLACEMENTS)})
    reduction_factor: float = field(default=2.0, metadata={
        "help": "hidden size / bottleneck width (AdapterHub's par_bn: 2)", "gt": 0.0})
    non_linearity: str = field(default="relu", metadata={
        "help": "bottleneck activation (AdapterHub's par_bn: relu)", "choices": tuple(ACTIVATIONS)})
    scaling: float = field(default=4.0, metadata={
        "help": "s in h + s * A(x) (He et al. 2022: 4 for the FFN parallel adapter)", "gt": 0.0})
    adapter_drop: int = field(default=0, metadata={
        "help": "robust AdapterDrop in training (Rücklé et al. 2021): each step skips the lowest k layers, "
                "k uniform in 0..N (0: off; at most layers - 1)", "min": 0})

    def __post_init__(self) -> None:
        check_fields(self)


def parallel_bottleneck(hidden_size: int, reduction_factor: float, non_linearity: str) -> Bottleneck:
    """A bottleneck initialised as AdapterHub's ``mam_adapter``: down Kaiming-uniform (a = sqrt 5), the rest zero."""
    block = Bottleneck(hidden_size, reduction_factor, non_linearity)  # up and biases already zero
    nn.init.kaiming_uniform_(block.down.weight, a=math.sqrt(5))
    return block


class ParallelModule(HookedAdapter):
    """Per-layer parallel bottlenecks: ``h + s * A(x)`` at each placed site."""

    def __init__(self, config: ParallelConfig, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.config = config
        sites = PARALLEL_PLACEMENTS[config.placement]
        self.layers = nn.ModuleList(
            nn.ModuleDict({s: parallel_bottleneck(hidden_size, config.reduction_factor, config.non_linearity)
                           for s in sites})
            for _ in range(num_layers)
        )

    def sites(self, layer: int) -> Collection[str]:
        return self.layers[layer].keys()

    def apply_at(self, layer: int, site: str, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module) -> torch.Tensor:
        block = self.layers[layer]
        if site not in block:
            return h
        return h + self.config.scaling * block[site](x)  # (B, T, H): reads the sub-layer input, adds beside its output


def prepare_parallel(base, config: ParallelConfig, train_cfg) -> ModuleTrainable:
    """Start training a fresh parallel-adapter module on ``base``."""
    module = ParallelModule(config, base.hidden_size, len(base.layers))
    return prepare_hooked(base, module, config, train_cfg, STEM, STEM)


def apply_parallel(base, loaded) -> AppliedModule:
    """Rebuild a saved parallel-adapter module, load its weights strictly and hook it onto ``base``, frozen."""
    config = build(ParallelConfig, loaded.manifest.config)
    return apply_hooked(base, loaded, ParallelModule(config, base.hidden_size, len(base.layers)), STEM, STEM)


SPEC = MethodSpec(
    name="parallel",
    config_cls=ParallelConfig,
    prepare=prepare_parallel,
    apply=apply_parallel,
    combine="stack",  # added at the same sites as bottleneck adapters, after the modules below
    help="parallel adapters (He et al. 2022): a bottleneck reading the FFN input, s=4 times its output added "
         "beside the FFN's",
    files=(STEM,),
    prepare_checks_base=True,  # what prepare checks against the base (targets, sizes, layers) fails before a run opens
)
