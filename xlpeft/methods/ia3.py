"""(IA)³ (Liu et al., NeurIPS 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").

"Infused Adapter by Inhibiting and Amplifying Inner Activations": learned vectors rescale, per layer,
the keys and values of self-attention and the FFN's intermediate activation (§3.3):
K <- l_k ⊙ K, V <- l_v ⊙ V, and the input of the FFN's second projection, γ(W1 x) <- l_ff ⊙ γ(W1 x).
``l_k``, ``l_v`` have the attention width (all heads, ``all_head_size``), ``l_ff`` the intermediate
width; all start at 1, so an untrained module is the identity.

Injection is by forward hooks on the key / value projections (the ``query``/``key``/``value`` paths of
the architecture table) and on the ``intermediate`` sub-layer, whose output is the activation. Two (IA)³
modules on one base multiply (their hooks run in turn), and they stack with adapters, which act at
the sub-layer outputs: ``combine="stack"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from xlpeft.config import build, check_fields
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.methods.base import AppliedModule, MethodSpec, ModuleTrainable, Phase
from xlpeft.methods.gates import gate_hook
from xlpeft.models import get_submodule

IA3_SITES = ("key", "value", "intermediate")
"""What (IA)³ rescales: the key and value projections' outputs and the FFN intermediate activation."""
STEM = "ia3"


@dataclass(frozen=True)
class IA3Config:
    """Which activations an (IA)³ module rescales; Liu et al. 2022 rescale all three."""

    target_modules: str = field(default="key,value,intermediate", metadata={
        "help": f"comma-separated subset of {', '.join(IA3_SITES)} (Liu et al. 2022: all three)"})

    def __post_init__(self) -> None:
        names = [n.strip() for n in self.target_modules.split(",")]
        object.__setattr__(self, "target_modules", ",".join(names))
        bad = [n for n in names if n not in IA3_SITES]
        extra = [f"`target_modules` should be a comma-separated subset of {', '.join(IA3_SITES)}; got "
                 f"{self.target_modules!r} (unknown: {', '.join(map(repr, bad))})"] if bad else []
        if not bad and len(set(names)) != len(names):
            extra.append(f"`target_modules` names a site twice: {self.target_modules!r}")
        check_fields(self, extra=extra)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(s for s in IA3_SITES if s in self.target_modules.split(","))


def ia3_targets(base, config: IA3Config) -> list[dict[str, nn.Module]]:
    """Per layer, site -> the module whose output is rescaled (key / value Linear, the intermediate sub-layer).

    Raises:
        XlpeftError: a site is missing on this base (its path in the architecture table resolves to nothing).
    """
    arch = base.arch
    paths = {"key": f"{arch.self_attention}.{arch.key}", "value": f"{arch.self_attention}.{arch.value}",
             "intermediate": arch.intermediate}
    out = []
    for i, layer in enumerate(get_submodule(base.model, arch.layers)):
        sites = {}
        for site in config.sites:
            try:
                sites[site] = get_submodule(layer, paths[site])
            except AttributeError:
                raise XlpeftError(f"(IA)³ target {site!r} ({paths[site]}) is not in layer {i} of this base; "
                                  f"drop it from target_modules or fix xlpeft.models.ARCHITECTURES") from None
        out.append(sites)
    return out


def _width(module: nn.Module) -> int:
    """Output width of a Linear, or of a sub-layer through its one Linear (the intermediate's dense)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise XlpeftError(f"cannot tell the width of {type(module).__name__}: it holds {len(linears)} Linear layers")
    return linears[0].out_features


class IA3Module(nn.Module):
    """All (IA)³ vectors of one module; state keys ``layers.0.key`` (all_head_size,), ``layers.0.intermediate`` (I,)."""

    def __init__(self, config: IA3Config, targets: list[dict[str, nn.Module]]) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            nn.ParameterDict({site: nn.Parameter(torch.ones(_width(m))) for site, m in sites.items()})  # init 1
            for sites in targets)


def attach_ia3(module: IA3Module, targets: list[dict[str, nn.Module]]):
    """Hook the rescaling onto every target (output ⊙ l); returns a function that takes the hooks off."""
    handles = []
    for vectors, sites in zip(module.layers, targets, strict=True):
        for site, target in sites.items():
            handles.append(target.register_forward_hook(gate_hook(
                lambda mod, args, out, v=vectors, s=site: out * v[s].to(out.dtype))))  # (B, T, D) ⊙ (D,)

    def detach() -> None:
        for h in handles:
            h.remove()
        handles.clear()
    return detach


def prepare_ia3(base, config: IA3Config, train_cfg) -> ModuleTrainable:
    """Start training a fresh (IA)³ module on ``base`` (its hooks run after those of modules below)."""
    targets = ia3_targets(base, config)
    module = IA3Module(config, targets).to(next(base.model.parameters()).device)
    return ModuleTrainable(module, attach_ia3(module, targets), Phase("ia3", train_cfg.max_steps), STEM)


def apply_ia3(base, loaded) -> AppliedModule:
    """Rebuild a saved (IA)³ module, load its vectors strictly and hook it onto ``base``, frozen."""
    try:
        config = build(IA3Config, loaded.manifest.config)
    except ConfigError as exc:
        raise XlpeftError(f"ia3 module {loaded.path}: {exc}") from None
    state = loaded.tensors.get(STEM)
    if state is None:
        raise XlpeftError(f"ia3 module {loaded.path} has no {STEM}.safetensors; it is incomplete: retrain or re-convert it")
    targets = ia3_targets(base, config)
    module = IA3Module(config, targets)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise XlpeftError(f"ia3 vectors in {loaded.path} do not fit this base: {str(exc).splitlines()[0]}") from None
    module.to(next(base.model.parameters()).device).eval()
    module.requires_grad_(False)
    return AppliedModule(module, attach_ia3(module, targets), STEM)


def ia3_train_defaults(kind: str) -> dict[str, float]:
    """lr 3e-3: T-Few's (IA)³ recipe (Liu et al. 2022, §3.3 / Appendix: Adafactor, lr 3e-3); no other published default."""
    return {"lr": 3e-3}


SPEC = MethodSpec(
    name="ia3",
    config_cls=IA3Config,
    prepare=prepare_ia3,
    apply=apply_ia3,
    combine="stack",  # hooks rescale activations; two (IA)³ modules multiply, adapters act around them
    help="(IA)³ (Liu et al. 2022): learned vectors rescaling keys, values and the FFN intermediate activation",
    train_defaults=ia3_train_defaults,
    files=(STEM,),
    prepare_checks_base=True,  # what prepare checks against the base (targets, sizes, layers) fails before a run opens
)
