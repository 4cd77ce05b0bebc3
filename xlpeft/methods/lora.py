"""LoRA (Hu et al., ICLR 2022, "LoRA: Low-Rank Adaptation of Large Language Models") and DoRA (Liu et al., ICML 2024).

A module adds a low-rank delta to chosen ``nn.Linear`` weights of the frozen encoder:
W = W0 + (alpha / r) · B A, with A (r, in) and B (out, r); B starts at 0, so an untrained module
is the identity. With ``use_dora`` (DoRA, "Weight-Decomposed Low-Rank Adaptation"), the merged weight
is split into a magnitude and a direction, W = m · (W0 + s·BA) / ||W0 + s·BA||_row, m initialised to
the row norms of W0; the norm is detached in the forward pass (DoRA §4.3), as peft's ``use_dora`` does.

* **Targets** (``target_modules``): comma-separated *site* names of the architecture table
  (:data:`SITES`: ``query``, ``key``, ``value`` of self-attention, ``attn_output``, ``intermediate``,
  ``ffn_output``: the one ``nn.Linear`` of each sub-layer) or shell-style globs over them
  (``*_output``); ``all-linear`` is every ``nn.Linear`` inside the transformer layers (never the MLM
  head or a classifier). ``layers`` restricts them to some layers (``0-5,8``).
* **Training** is unmerged: a forward hook on each target Linear adds s·B(A(dropout(x))) to its output.
* **Applying a saved module** merges it into the weights in place by default (``merge=True``): inference
  costs what the bare base costs, and a Sum with LT-SFT deltas is literally θ0 + δ_sft + BA. The merged
  delta is a dense :class:`~xlpeft.methods.sft.delta.SparseDelta` (every index of each target weight),
  so removal is SparseDelta's bit-exact revert, which also handles deltas applied after it (they are
  taken off and put back on). ``merge=False`` (or ``apply_lora(..., merge=False)``) applies it by hooks
  instead, for the merged/unmerged latency comparison.

Merging keeps a copy of every target weight (what SparseDelta's revert restores): for mBERT's query/value, 24
matrices of 768 x 768, about 57 MB in fp32. DoRA is not additive: its merged delta is computed against the
weights it is merged into, so a DoRA merged over an sft delta and left on when that delta is removed first keeps
the rescaling it had over θ0 + δ (plain LoRA has no such caveat: B·A does not depend on the weights).

``combine="sum"``: a LoRA is a dense low-rank delta; it sits in a Sum with sft modules and other LoRAs
and in a Stack under or over adapters.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.config import build, check_fields
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.methods.base import MethodSpec, ModuleTrainable, Phase
from xlpeft.methods.deltas import lora_merge_own, lora_weight_delta
from xlpeft.methods.gates import gate_hook
from xlpeft.models import ArchSpec, get_submodule

SITES = ("query", "key", "value", "attn_output", "intermediate", "ffn_output")
"""The Linear layers of a transformer layer, named by the architecture table (:class:`~xlpeft.models.ArchSpec`)."""
ALL_LINEAR = "all-linear"
STEM = "lora"


def site_paths(arch: ArchSpec) -> dict[str, str]:
    """Site -> path of the module holding it, relative to a layer (the projections, or a sub-layer)."""
    attn = arch.self_attention
    return {"query": f"{attn}.{arch.query}", "key": f"{attn}.{arch.key}", "value": f"{attn}.{arch.value}",
            "attn_output": arch.attn_output, "intermediate": arch.intermediate, "ffn_output": arch.ffn_output}


def layer_linears(layer: nn.Module, arch: ArchSpec) -> dict[str, tuple[str, nn.Linear]]:
    """Site -> (path relative to the layer, the ``nn.Linear``): a sub-layer's site is its one direct Linear child."""
    out: dict[str, tuple[str, nn.Linear]] = {}
    for site, path in site_paths(arch).items():
        try:
            module = get_submodule(layer, path)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            out[site] = (path, module)
            continue
        linears = [(n, m) for n, m in module.named_children() if isinstance(m, nn.Linear)]
        if len(linears) == 1:
            out[site] = (f"{path}.{linears[0][0]}", linears[0][1])
    return out


def parse_targets(text: str, sites: tuple[str, ...] = SITES) -> tuple[str, ...]:
    """The sites a ``target_modules`` value names, in table order.

    Raises:
        ConfigError: an entry is neither ``all-linear`` nor a site name or glob matching one.
    """
    chosen: set[str] = set()
    for entry in (e.strip() for e in text.split(",")):
        matched = set(sites) if entry == ALL_LINEAR else set(fnmatch.filter(sites, entry))
        if not matched:
            raise ConfigError(f"`target_modules` entry {entry!r} matches no site; expected site names or globs over "
                              f"{', '.join(sites)} (or {ALL_LINEAR}), comma-separated, e.g. --set target_modules=query,value")
        chosen |= matched
    return tuple(s for s in sites if s in chosen)


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``0-5,8`` -> (0, 1, 2, 3, 4, 5, 8); None: every layer.

    Raises:
        ConfigError: the value is not comma-separated indices or ranges.
    """
    if text is None:
        return None
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ConfigError(f"`layers` should be comma-separated layer indices or ranges such as 0-5,8; got {text!r}")
        out.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return tuple(sorted(out))


@dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of a LoRA module (Hu et al. 2022): r 8, alpha 16 on query/value, as peft's defaults."""

    r: int = field(default=8, metadata={"help": "rank of the delta B·A (Hu et al. 2022; peft default 8)", "min": 1})
    alpha: float = field(default=16.0, metadata={"help": "scale numerator: the delta is (alpha / r)·B·A", "gt": 0.0})
    dropout: float = field(default=0.0, metadata={
        "help": "dropout on the LoRA branch's input in training, in [0, 1) (peft's default 0; Hu et al. use 0.1 "
                "for GPT-2 only)"})
    target_modules: str = field(default="query,value", metadata={
        "help": f"comma-separated sites or globs over {', '.join(SITES)}; {ALL_LINEAR}: every Linear in the layers "
                "(never the MLM head or classifier). Hu et al. 2022: query,value"})
    layers: str | None = field(default=None, metadata={"help": "layers to adapt, e.g. 0-5,8 (None: all)"})
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA (Liu et al. 2024): a learned magnitude per output row over the direction W0 + s·BA"})
    merge: bool = field(default=True, metadata={
        "help": "apply a saved module merged into the weights (fast inference, exact Sum with sft deltas) "
                "instead of by hooks; training is always by hooks"})

    def __post_init__(self) -> None:
        extra = []
        if not 0.0 <= self.dropout < 1.0:
            extra.append(f"`dropout` should be in [0, 1); got {self.dropout!r}")
        try:
            object.__setattr__(self, "target_modules", ",".join(e.strip() for e in self.target_modules.split(",")))
            parse_targets(self.target_modules)
            parse_layers(self.layers)
        except ConfigError as exc:
            extra.append(str(exc))
        check_fields(self, extra=extra)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraPair(nn.Module):
    """The LoRA weights of one Linear: A (r, in), B (out, r) and, with DoRA, the magnitude m (out,)."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, weight: torch.Tensor | None) -> None:
        super().__init__()
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))  # B = 0: the identity at init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft initialise A
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.magnitude = None
        if config.use_dora:  # m = ||W0||_row, so that m / ||W0 + s·0|| = 1 at init
            self.magnitude = nn.Parameter(torch.linalg.norm(weight.detach().float(), dim=1).to(weight.dtype)
                                          if weight is not None else torch.ones(out_features))

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, in)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W0 + s·BA, or with DoRA m · (W0 + s·BA) / ||W0 + s·BA||_row: what the Linear computes with."""
        merged = weight + self.delta_weight()  # (out, in)
        if self.magnitude is None:
            return merged
        return (self.magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged

    def forward(self, x: torch.Tensor, out: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """The Linear's output ``out`` (..., out) for input ``x`` (..., in), with this delta added."""
        h = self.dropout(x)
        lora = F.linear(F.linear(h, self.lora_A.to(h.dtype)), self.lora_B.to(h.dtype)) * self.scaling  # (..., out)
        if self.magnitude is None:
            return out + lora
        weight = linear.weight
        norm = torch.linalg.norm(weight + self.delta_weight().detach(), dim=1).detach()  # (out,) DoRA §4.3
        scale = (self.magnitude / norm).to(out.dtype)  # (out,)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = out - linear.bias if linear.bias is not None else out  # W x: (..., out)
        else:  # as peft: the base term of DoRA's rescaling sees the dropped-out input
            base = F.linear(h, weight.to(h.dtype))
        return out + (scale - 1) * base + scale * lora


class LoraModule(nn.Module):
    """All LoRA weights of one module: ``layers.<i>.<site>`` pairs; state keys ``layers.0.query.lora_A``."""

    def __init__(self, config: LoraConfig, targets: dict[int, dict[str, nn.Linear]], init_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({
            str(i): nn.ModuleDict({site: LoraPair(lin.in_features, lin.out_features, config,
                                                  lin.weight if init_weights else None)
                                   for site, lin in sites.items()})
            for i, sites in targets.items()})

    def pairs(self) -> list[tuple[int, str, LoraPair]]:
        return [(int(i), site, pair) for i, block in self.layers.items() for site, pair in block.items()]


def resolve_targets(base, config: LoraConfig) -> dict[int, dict[str, tuple[str, nn.Linear]]]:
    """Layer index -> site -> (parameter path of the Linear from the model root, the Linear) on ``base``.

    Raises:
        XlpeftError: a ``target_modules`` entry or a ``layers`` index matches nothing on this base, or
            ``all-linear`` meets a Linear the architecture table does not name.
    """
    arch, layers = base.arch, get_submodule(base.model, base.arch.layers)
    wanted_layers = parse_layers(config.layers)
    if wanted_layers is not None and wanted_layers[-1] >= len(layers):
        raise XlpeftError(f"`layers` {config.layers!r} names layer {wanted_layers[-1]} but this base has {len(layers)} "
                          f"(0-{len(layers) - 1}); pass --set layers=0-{len(layers) - 1} or fewer")
    out: dict[int, dict[str, tuple[str, nn.Linear]]] = {}
    for i, layer in enumerate(layers):
        if wanted_layers is not None and i not in wanted_layers:
            continue
        found = layer_linears(layer, arch)
        if ALL_LINEAR in config.target_modules.split(","):
            known = {id(lin) for _, lin in found.values()}
            stray = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and id(m) not in known]
            if stray:
                raise XlpeftError(f"{ALL_LINEAR}: layer {i} has Linear layers the architecture table does not name "
                                  f"({', '.join(stray)}); add them to xlpeft.models.ARCHITECTURES or list sites")
        for entry in config.target_modules.split(","):
            if not any(site in found for site in parse_targets(entry)):
                raise XlpeftError(f"`target_modules` entry {entry!r} matches no nn.Linear on this base "
                                  f"(layer {i} has {', '.join(found) or 'none'}); pick sites this base has")
        out[i] = {site: (f"{arch.layers}.{i}.{found[site][0]}", found[site][1])
                  for site in parse_targets(config.target_modules) if site in found}
    return out


def attach_lora(base, module: LoraModule, paths: dict[int, dict[str, tuple[str, nn.Linear]]]):
    """Hook ``module`` onto its target Linears (unmerged); returns a function that takes the hooks off."""
    handles = []
    for i, site, pair in module.pairs():
        linear = paths[i][site][1]
        handles.append(linear.register_forward_hook(gate_hook(lambda mod, args, out, p=pair: p(args[0], out, mod))))

    def detach() -> None:
        for h in handles:
            h.remove()
        handles.clear()
    return detach


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare_lora(base, config: LoraConfig, train_cfg) -> ModuleTrainable:
    """Start training a fresh LoRA module on ``base`` (by hooks, over whatever is applied below)."""
    paths = resolve_targets(base, config)
    module = LoraModule(config, {i: {s: lin for s, (_, lin) in sites.items()} for i, sites in paths.items()})
    module.to(_device(base.model))
    return ModuleTrainable(module, attach_lora(base, module, paths), Phase("lora", train_cfg.max_steps), STEM)


class AppliedLora:
    """A saved LoRA applied (:class:`~xlpeft.methods.base.Applied`): merged into the weights, or by hooks.

    Merged, it is a dense :class:`~xlpeft.methods.sft.delta.SparseDelta` (W_merged - W at every index of
    each target weight), so ``remove()`` is SparseDelta's bit-exact revert, in any order relative to other deltas.
    """

    def __init__(self, base, module: LoraModule, paths, merge: bool) -> None:
        self.module, self.model, self.merged = module, base.model, merge
        self._delta = self._detach = None
        if merge:
            self._delta = merged_delta(module, paths)
            self._delta.apply(base.model)
        else:
            self._detach = attach_lora(base, module, paths)

    def remove(self) -> None:
        if self._delta is not None:
            self._delta.revert(self.model)
            self._delta = None
        if self._detach is not None:
            self._detach()
            self._detach = None

    def modules(self) -> list[nn.Module]:
        return [] if self.merged else [self.module]

    def saved_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {} if self.merged else {STEM: self.module.state_dict()}  # merged: the checkpoint holds it


@torch.no_grad()
def merged_delta(module: LoraModule, paths):
    """The dense delta W_merged - W of every target weight, as a SparseDelta over all its indices."""
    from xlpeft.methods.sft.delta import SparseDelta

    entries = {}
    largest = max((lin.weight.numel() for sites in paths.values() for _, lin in sites.values()), default=0)
    indices = torch.arange(largest)  # one index tensor; each weight uses a view of its first numel() entries
    for i, site, pair in module.pairs():
        name, linear = paths[i][site]
        weight = linear.weight
        if pair.magnitude is None:
            values = pair.delta_weight().to(weight.dtype)  # (out, in)
        else:  # DoRA is not additive: its delta is relative to the weight it is merged into
            values = pair.merged_weight(weight.float()).to(weight.dtype) - weight
        entries[f"{name}.weight"] = (indices[: weight.numel()], values.reshape(-1).cpu())
    return SparseDelta(entries)


def apply_lora(base, loaded, merge: bool | None = None) -> AppliedLora:
    """Apply a saved LoRA module to ``base``, frozen; ``merge`` overrides the module's ``merge`` setting.

    Raises:
        XlpeftError: the module has no lora.safetensors, or its weights do not fit this base.
    """
    config = build(LoraConfig, loaded.manifest.config)
    state = loaded.tensors.get(STEM)
    if state is None:
        raise XlpeftError(f"lora module {loaded.path} has no {STEM}.safetensors; it is incomplete: retrain or re-convert it")
    paths = resolve_targets(base, config)
    module = LoraModule(config, {i: {s: lin for s, (_, lin) in sites.items()} for i, sites in paths.items()},
                        init_weights=False)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise XlpeftError(f"lora weights in {loaded.path} do not fit this base: {str(exc).splitlines()[0]}") from None
    module.to(_device(base.model)).eval()
    module.requires_grad_(False)
    return AppliedLora(base, module, paths, config.merge if merge is None else merge)


def lora_overlap(lower, upper) -> dict[str, int]:
    """Weight matrices two LoRA modules both change, per transformer layer (``layer_03``): their deltas add there."""
    def touched(loaded) -> set[tuple[int, str]]:
        return {(int(k.split(".")[1]), k.split(".")[2]) for k in loaded.tensors.get(STEM, {}) if k.endswith("lora_A")}

    shared: dict[str, int] = {}
    for i, _ in touched(lower) & touched(upper):
        shared[f"layer_{i:02d}"] = shared.get(f"layer_{i:02d}", 0) + 1
    return dict(sorted(shared.items()))


def lora_train_defaults(kind: str) -> dict[str, float]:
    """lr 5e-4: Hu et al. 2022, Table 9 (RoBERTa-base on GLUE: 4e-4..5e-4); the same for language modules (MLM)."""
    return {"lr": 5e-4}


SPEC = MethodSpec(
    name="lora",
    config_cls=LoraConfig,
    prepare=prepare_lora,
    apply=apply_lora,
    combine="sum",  # a dense low-rank delta: θ0 + δ_sft + B·A, and under or over adapters in a Stack
    help="LoRA (Hu et al. 2022): a low-rank delta (alpha/r)·B·A on query/value (DoRA, Liu et al. 2024: use_dora)",
    train_defaults=lora_train_defaults,
    overlap=lora_overlap,
    files=(STEM,),
    prepare_checks_base=True,  # what prepare checks against the base (targets, sizes, layers) fails before a run opens
    weight_delta=lora_weight_delta,
    merge_own=lora_merge_own,  # LoRAs of the same targets merge into one LoRA of the summed rank
)
