"""Compacter (Karimi Mahabadi et al., NeurIPS 2021): bottleneck adapters whose projections are PHM layers.

A PHM (parameterised hypercomplex multiplication) layer's weight is a sum of ``n`` Kronecker
products (the paper's Eq. 3-5):

    W = sum_{i=1..n} A_i ⊗ B_i,   A_i (n, n) "slow" weights, B_i (in/n, out/n) "fast" weights,

with ``y = x W + b``. Compacter shares the A_i across all its layers (``shared_phm_rule``) and
factorises each B_i = s_i t_i^T into rank-``phm_rank`` factors (``factorized_phm``; rank 1 is the
paper's Compacter, off gives the plain PHM-Adapter). ``placement=houlsby`` (after attention and
FFN, the default) is Compacter; ``placement=pfeiffer`` (after the FFN only) is Compacter++. The
adapter computation around the bottleneck is the MAD-X adapter's (:func:`~xlpeft.methods.adapters.bottleneck_at`),
so compacters stack with bottleneck adapters exactly as those stack with each other.

Defaults are AdapterHub 1.3.0's ``CompacterConfig`` / ``CompacterPlusPlusConfig`` (``compacter``,
``compacter++``): reduction factor 32, gelu, n = ``phm_dim`` = 4, rank 1, shared rule,
factorised fast weights, rule std 1e-4 (``phm_init_range``), bias on. The paper and AdapterHub
publish one recipe, for task modules; language modules use the same (no Compacter language
adaptation recipe is published).

**AdapterHub names -> xlpeft names** (``{p}`` = ``bert`` / ``roberta``, ``{s}`` = ``attention.output``
-> ``attn`` or ``output`` -> ``ffn``, ``{a}`` = the adapter name; shapes with hidden ``H``, bottleneck ``m``):

=============================================================  ==========================================
``{p}.shared_parameters.{a}.phm_rule``            (n, n, n)      ``phm_rule``
``{p}.shared_parameters.{a}.phm_rule_left/right`` (n,n,1)/(n,1,n) ``phm_rule_left`` / ``phm_rule_right``
``{p}.encoder.layer.{i}.{s}.adapters.{a}.adapter_down.0.W_left``  ``layers.{i}.{site}.down.W_left``  (n, H/n, r)
``... .adapter_down.0.W_right``                                   ``layers.{i}.{site}.down.W_right`` (n, r, m/n)
``... .adapter_down.0.W`` (``factorized_phm_W=False``)             ``layers.{i}.{site}.down.W``       (n, H/n, m/n)
``... .adapter_down.0.b``                                         ``layers.{i}.{site}.down.b``       (m,)
``... .adapter_up.W_left`` / ``W_right`` / ``W`` / ``b``          ``layers.{i}.{site}.up.*``          (n, m/n, r) ...
``... .adapter_down.0.phm_rule`` (``shared_phm_rule=False``)       ``layers.{i}.{site}.down.phm_rule`` (likewise ``up``)
=============================================================  ==========================================

Both compute ``H = sum_i kron(rule_i, W_i)`` (in, out) and ``y = x @ H + b``. AdapterHub's
``scaling`` (1.0 in both presets) multiplies the up-projection's output: a converter folds it into
``up.W_right`` (or ``up.W``) and ``up.b``. Not supported: ``shared_W_phm`` (fast weights shared
across layers), ``learn_phm=False`` (a frozen rule; the weights themselves import fine), and
AdapterHub's layer options beyond ``leave_out`` (which a converter fills with zero up-projections).

**Initialisation differs from AdapterHub's, on purpose.** AdapterHub draws every fast weight with
Xavier-normal (its ``hypercomplex_nonlinearity`` check is always true), the up-projection
included, so its compacter is only near the identity at init; xlpeft zero-initialises the
up-projection's ``W_right`` (``W`` when not factorised) and both biases, so an untrained module is
exactly the identity, like every bottleneck adapter here (LoRA's B = 0 in spirit); gradients still
reach ``W_right`` through the non-zero ``W_left`` and rule. The rule is N(0, ``phm_init_range``)
whether shared or not (AdapterHub uses std 0.01 for an unshared rule).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from xlpeft.config import build, check_fields
from xlpeft.errors import ConfigError
from xlpeft.methods.adapters import (
    PLACEMENTS,
    HookedAdapter,
    bottleneck_at,
    bottleneck_up,
    hook_applied,
    load_hooked,
    prepare_hooked,
)
from xlpeft.methods.base import AppliedModule, MethodSpec, ModuleTrainable
from xlpeft.methods.bottleneck import ACTIVATIONS

STEM = "compacter"


@dataclass(frozen=True)
class CompacterConfig:
    """Hyper-parameters of a Compacter module; defaults are AdapterHub 1.3.0's ``CompacterConfig``."""

    placement: str = field(default="houlsby", metadata={
        "help": "houlsby: after attention and FFN (Compacter); pfeiffer: after the FFN only (Compacter++)",
        "choices": tuple(PLACEMENTS)})
    reduction_factor: float = field(default=32.0, metadata={
        "help": "hidden size / bottleneck width (AdapterHub's Compacter and Compacter++: 32)", "gt": 0.0})
    non_linearity: str = field(default="gelu", metadata={
        "help": "bottleneck activation (AdapterHub's Compacter: gelu)", "choices": tuple(ACTIVATIONS)})
    phm_dim: int = field(default=4, metadata={
        "help": "n, the number of Kronecker products; must divide the hidden size and the bottleneck width "
                "(Karimi Mahabadi et al. 2021: n = 4)", "min": 1})
    phm_rank: int = field(default=1, metadata={"help": "rank of the factorised fast weights (Compacter: 1)", "min": 1})
    shared_phm_rule: bool = field(default=True, metadata={
        "help": "share the slow weights A_i across all layers and projections (Compacter: true)"})
    factorized_phm: bool = field(default=True, metadata={
        "help": "factorise the fast weights B_i into rank-phm_rank factors (true: Compacter; false: PHM-Adapter); "
                "AdapterHub's factorized_phm_W"})
    factorized_phm_rule: bool = field(default=False, metadata={
        "help": "factorise each slow weight A_i into an outer product of two vectors (AdapterHub's option; off)"})
    phm_init_range: float = field(default=1e-4, metadata={
        "help": "std of the normal initialisation of the slow weights (AdapterHub: 1e-4)", "gt": 0.0})
    phm_bias: bool = field(default=True, metadata={"help": "bias terms in the PHM projections (AdapterHub: true)"})
    adapter_drop: int = field(default=0, metadata={
        "help": "robust AdapterDrop in training (Rücklé et al. 2021): each step skips the lowest k layers, "
                "k uniform in 0..N (0: off; at most layers - 1)", "min": 0})

    def __post_init__(self) -> None:
        check_fields(self)

    def width(self, hidden_size: int) -> int:
        """The bottleneck width, as AdapterHub computes it: ``int(hidden // reduction_factor)``, at least 1."""
        return max(1, int(hidden_size // self.reduction_factor))

    def check_fits(self, hidden_size: int) -> None:
        """``phm_dim`` must divide the hidden size and the bottleneck width (each Kronecker factor is (·/n, ·/n)).

        Raises:
            ConfigError: it does not, naming both sizes and a fix.
        """
        width = self.width(hidden_size)
        if hidden_size % self.phm_dim or width % self.phm_dim:
            raise ConfigError(f"`phm_dim` {self.phm_dim} should divide the hidden size ({hidden_size}) and the "
                              f"bottleneck width ({width} = {hidden_size} // reduction_factor {self.reduction_factor:g}); "
                              "choose a phm_dim or reduction_factor that does")


def phm_rule_from(holder: nn.Module) -> torch.Tensor:
    """The slow weights (n, n, n) a PHM holder keeps: ``phm_rule``, or ``phm_rule_left @ phm_rule_right``."""
    if "phm_rule" in holder._parameters:
        return holder.phm_rule
    return torch.bmm(holder.phm_rule_left, holder.phm_rule_right)  # (n, n, 1) @ (n, 1, n) -> (n, n, n)


def add_phm_rule(holder: nn.Module, config: CompacterConfig) -> None:
    """Give ``holder`` its slow weights, drawn from N(0, phm_init_range)."""
    n, std = config.phm_dim, config.phm_init_range
    if config.factorized_phm_rule:
        holder.phm_rule_left = nn.Parameter(torch.randn(n, n, 1) * std)
        holder.phm_rule_right = nn.Parameter(torch.randn(n, 1, n) * std)
    else:
        holder.phm_rule = nn.Parameter(torch.randn(n, n, n) * std)


class PHMLinear(nn.Module):
    """y = x H + b with H = sum_i A_i ⊗ B_i (in, out) (Karimi Mahabadi et al. 2021, Eq. 3).

    ``zero``: the fast weights' output factor (``W_right``, or ``W``) and the bias start at zero,
    so the layer starts as the zero map (an up-projection).
    """

    def __init__(self, in_features: int, out_features: int, config: CompacterConfig, zero: bool) -> None:
        super().__init__()
        n, r = config.phm_dim, config.phm_rank
        p, q = in_features // n, out_features // n
        if config.factorized_phm:
            self.W_left = nn.Parameter(_xavier(torch.empty(n, p, r)))
            self.W_right = nn.Parameter(torch.zeros(n, r, q) if zero else _xavier(torch.empty(n, r, q)))
        else:
            self.W = nn.Parameter(torch.zeros(n, p, q) if zero else _xavier(torch.empty(n, p, q)))
        self.b = nn.Parameter(torch.zeros(out_features)) if config.phm_bias else None
        if not config.shared_phm_rule:
            add_phm_rule(self, config)

    def fast_weights(self) -> torch.Tensor:
        """B_i, (n, in/n, out/n)."""
        if "W" in self._parameters:
            return self.W
        return torch.bmm(self.W_left, self.W_right)  # (n, p, r) @ (n, r, q) -> (n, p, q)

    def weight(self, rule: torch.Tensor | None) -> torch.Tensor:
        """H = sum_i kron(A_i, B_i), (in, out); ``rule`` is the shared A (n, n, n), or None for this layer's own."""
        rule = phm_rule_from(self) if rule is None else rule
        fast = self.fast_weights()
        n, p, q = fast.shape
        # kron(A, B)[a*p + b, c*q + d] = A[a, c] B[b, d]
        return torch.einsum("iac,ibd->abcd", rule, fast).reshape(n * p, n * q)  # (in, out)

    def forward(self, x: torch.Tensor, rule: torch.Tensor | None) -> torch.Tensor:
        y = torch.matmul(x, self.weight(rule))  # (..., out)
        return y if self.b is None else y + self.b


def _xavier(t: torch.Tensor) -> torch.Tensor:
    for i in range(t.shape[0]):  # per Kronecker factor, as AdapterHub's init_W does
        nn.init.xavier_normal_(t[i])
    return t


class PHMBottleneck(nn.Module):
    """x -> up(act(down(x))) with PHM projections; ``up`` starts at zero so a residual around it is the identity."""

    def __init__(self, hidden_size: int, config: CompacterConfig) -> None:
        super().__init__()
        width = config.width(hidden_size)
        self.down = PHMLinear(hidden_size, width, config, zero=False)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.up = PHMLinear(width, hidden_size, config, zero=True)

    def forward(self, x: torch.Tensor, rule: torch.Tensor | None) -> torch.Tensor:
        return self.up(self.act(self.down(x, rule)), rule)  # (..., H)


class CompacterModule(HookedAdapter):
    """All weights of one Compacter module: the shared slow weights and per-layer PHM bottlenecks."""

    def __init__(self, config: CompacterConfig, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        config.check_fits(hidden_size)
        self.config = config
        if config.shared_phm_rule:
            add_phm_rule(self, config)
        sites = PLACEMENTS[config.placement]
        self.layers = nn.ModuleList(
            nn.ModuleDict({s: PHMBottleneck(hidden_size, config) for s in sites}) for _ in range(num_layers)
        )

    def sites(self, layer: int) -> Collection[str]:
        return self.layers[layer].keys()

    def apply_at(self, layer: int, site: str, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module) -> torch.Tensor:
        block = self.layers[layer]
        if site not in block:
            return h
        rule = phm_rule_from(self) if self.config.shared_phm_rule else None  # (n, n, n), shared by every projection
        return bottleneck_at(self.config.placement, lambda z: block[site](z, rule), h, x, layer_norm)

    def fusion_placement(self) -> str:
        return self.config.placement

    def up_at(self, layer: int, site: str, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module) -> torch.Tensor:
        rule = phm_rule_from(self) if self.config.shared_phm_rule else None  # (n, n, n)
        return bottleneck_up(self.config.placement, lambda z: self.layers[layer][site](z, rule), h, x, layer_norm)


def prepare_compacter(base, config: CompacterConfig, train_cfg) -> ModuleTrainable:
    """Start training a fresh Compacter module on ``base``."""
    module = CompacterModule(config, base.hidden_size, len(base.layers))
    return prepare_hooked(base, module, config, train_cfg, STEM, STEM)


def apply_compacter(base, loaded) -> AppliedModule:
    """Rebuild a saved Compacter module, load its weights strictly and hook it onto ``base``, frozen."""
    return hook_applied(base, build_compacter(base, loaded), STEM)


def build_compacter(base, loaded) -> CompacterModule:
    """A saved Compacter module rebuilt, frozen and not hooked: what AdapterFusion fuses."""
    config = build(CompacterConfig, loaded.manifest.config)
    return load_hooked(base, loaded, CompacterModule(config, base.hidden_size, len(base.layers)), STEM, STEM)


def compacter_train_defaults(kind: str) -> dict[str, float]:
    """lr 3e-3, the authors' own (rabeehk/compacter ``seq2seq/configs/compacter.json``, T5-base on GLUE).

    TrainConfig's 1e-4 barely moves the 1e-4-initialised PHM weights in a module's step budget: an English POS
    task module on e5-small reached Brown dev 0.23 in 100 steps at 1e-4, 0.65 at 1e-3 and 0.92 at 3e-3
    (benchmarks/README.md, issue 18; English development data only), and an English MLM module's held-out loss
    fell 6.59 -> 5.80 in 60 steps at 3e-3, to 6.40 at 1e-4.
    """
    return {"lr": 3e-3}


SPEC = MethodSpec(
    name="compacter",
    config_cls=CompacterConfig,
    prepare=prepare_compacter,
    apply=apply_compacter,
    combine="stack",  # a bottleneck adapter: stacks over and under adapters exactly as they do
    help="Compacter (Karimi Mahabadi et al. 2021): adapters with PHM projections, sums of n=4 Kronecker products "
         "with shared slow weights; placement=pfeiffer is Compacter++",
    train_defaults=compacter_train_defaults,
    files=(STEM,),
    build=build_compacter,
    prepare_checks_base=True,  # what prepare checks against the base (targets, sizes, layers) fails before a run opens
)
