"""AdapterFusion (Pfeiffer et al., EACL 2021): attention over what several frozen adapters would add, per layer.

At every site the fused adapters act at, with ``h`` the sub-layer output and ``x`` its input (the
residual stream), as AdapterHub 1.3.0 computes it (``BertFusion``, ``BottleneckLayer.compose_fuse``):

    q   = LN(h + x)  (pfeiffer placement)  or  h  (houlsby, or ``query_before_ln``)       (B, T, H)
    u_i = A_i(...)   what adapter i alone would add to h                                     (B, T, N, H)
    s_i = (W_q q + b_q) . (W_k u_i + b_k),   p = softmax(s)                                  (B, T, N)
    h  <- sum_i p_i W_v u_i + h

``value_before_softmax=False`` applies ``W_v`` after the sum; ``residual_before`` adds ``h`` to every
``u_i`` first (keys included, as AdapterHub's in-place addition does) and not after. The value
matrix starts at the identity and is pulled back to it by ``regularization * ||W_v - I||^2``, so a
fresh fusion starts as a learned average of its adapters' outputs.

The fused modules are frozen and travel inside the fusion module (their weights as ``fused.<i>.*``
beside the fusion layers' ``layers.*`` in ``fusion.safetensors``, their manifests under
``extra.fused``), so a fusion module is self-contained like any other: it composes, registers and
converts alone. The key biases are kept but not trained (the softmax gives them zero gradient). Only sequential bottlenecks of one placement
can be fused (``adapter``, ``compacter``: methods whose spec has ``build``), as in AdapterHub. The
first fused module's invertible adapter, if any, acts on the embeddings, as AdapterHub applies the
first adapter's of a Fuse block. A fusion can be a task module (Stack(language, Fuse(task_en,
task_tr, ...)), trained with a new head on the source task) or a language module (Fuse(lang_tr,
lang_id) trained by MLM on a little target text, for a language with no module of its own).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xlpeft.config import build, check_fields
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.io import LoadedModule, Manifest
from xlpeft.methods.adapters import SITES, HookedAdapter, attach_adapters, device_of, hook_applied
from xlpeft.methods.base import AppliedModule, MethodSpec, Phase
from xlpeft.methods.invertible import InvertibleAdapter

STEM = "fusion"


@dataclass(frozen=True)
class FusionConfig:
    """AdapterFusion; the defaults are AdapterHub's ``dynamic`` fusion (its default)."""

    fuse: str = field(default="", metadata={
        "help": "the modules to fuse, comma-separated (directories, registered names or hf: ids), at least two "
                "sequential bottleneck modules (adapter, compacter) of one placement, trained on this base"})
    query: bool = field(default=True, metadata={"help": "a learned query projection W_q"})
    key: bool = field(default=True, metadata={"help": "a learned key projection W_k"})
    value: bool = field(default=True, metadata={"help": "a learned value matrix W_v (off: AdapterHub's static fusion)"})
    value_initialized: bool = field(default=True, metadata={"help": "W_v starts at the identity (+1e-6 off the diagonal)"})
    value_before_softmax: bool = field(default=True, metadata={"help": "W_v applied to each u_i (else to their weighted sum)"})
    query_before_ln: bool = field(default=False, metadata={"help": "the query is h, before the sub-layer's LN(h + x)"})
    residual_before: bool = field(default=False, metadata={"help": "add h to each u_i before the attention, not after"})
    regularization: float = field(default=0.01, metadata={
        "help": "weight of ||W_v - I||^2 added to the loss (AdapterHub: 0.01 with regularization on; 0: off)", "min": 0.0})
    dropout: float | None = field(default=None, metadata={
        "help": "dropout on the attention scores in training; None: the base's attention dropout, as AdapterHub "
                "(0.1 for mBERT and XLM-R)", "min": 0.0, "max": 1.0})

    def __post_init__(self) -> None:
        problems = []
        sources = self.sources()
        if len(sources) == 1:  # empty is the default, refused when a run is planned (plan_fusion)
            problems.append(fuse_problem(self.fuse))
        elif len(set(sources)) < len(sources):
            problems.append(f"`fuse` names a module twice: {self.fuse!r}")
        if not (self.query or self.key or self.value):
            problems.append("at least one of query, key, value should be on (with none, AdapterHub builds a layer "
                            "it never uses)")
        check_fields(self, problems)

    def sources(self) -> list[str]:
        return [s.strip() for s in self.fuse.split(",") if s.strip()]


def _projection(hidden: int) -> nn.Linear:
    linear = nn.Linear(hidden, hidden)
    nn.init.normal_(linear.weight, std=0.02)  # BERT's init, as AdapterHub's init_bert_weights
    nn.init.zeros_(linear.bias)
    return linear


def fuse_problem(fuse: str) -> str:
    return (f"`fuse` should name at least two modules, comma-separated; got {fuse!r} (e.g. --set "
            "fuse=modules/task-pos-en-adapter,modules/task-pos-tr-adapter)")


def plan_fusion(config: FusionConfig, train_cfg: Any, num_examples: int | None) -> FusionConfig:
    """Refuse a fusion with nothing to fuse before any run opens (the config's default ``fuse`` is empty)."""
    if len(config.sources()) < 2:
        raise ConfigError(f"invalid FusionConfig: {fuse_problem(config.fuse)}")
    return config


class FusionLayer(nn.Module):
    """The attention of one site over the N fused adapters' outputs."""

    def __init__(self, config: FusionConfig, hidden: int, dropout: float) -> None:
        super().__init__()
        self.config, self.p = config, dropout
        if config.query:
            self.query = _projection(hidden)
        if config.key:
            self.key = _projection(hidden)
        if config.value:
            self.value = nn.Linear(hidden, hidden, bias=False)
            nn.init.normal_(self.value.weight, std=0.02)
            if config.value_initialized:
                with torch.no_grad():
                    self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def forward(self, q: torch.Tensor, ups: torch.Tensor, h: torch.Tensor, training: bool) -> torch.Tensor:
        """``q`` (B, T, H), ``ups`` (B, T, N, H), ``h`` (B, T, H) -> the new sub-layer output (B, T, H).

        ``training``: the base's mode, which the dropout follows (as AdapterHub's follows its model's).
        """
        c = self.config
        values = ups + h.unsqueeze(2) if c.residual_before else ups  # (B, T, N, H); the keys are these too
        query = self.query(q) if c.query else q  # (B, T, H)
        keys = self.key(values) if c.key else values  # (B, T, N, H)
        if c.value and c.value_before_softmax:
            values = self.value(values)
        scores = torch.matmul(query.unsqueeze(2), keys.transpose(-2, -1)).squeeze(2)  # (B, T, N)
        probs = torch.softmax(nn.functional.dropout(scores, self.p, training), dim=-1)  # (B, T, N)
        out = torch.matmul(probs.unsqueeze(2), values).squeeze(2)  # (B, T, H)
        if c.value and not c.value_before_softmax:
            out = self.value(out)
        return out if c.residual_before else out + h


class FusionModule(HookedAdapter):
    """Fusion layers per layer and site over frozen sequential bottlenecks (``fused``, bottom of the Fuse block first)."""

    def __init__(self, config: FusionConfig, fused: list[HookedAdapter], hidden: int, num_layers: int,
                 records: list[dict[str, Any]], dropout: float = 0.1) -> None:
        super().__init__()
        self.fused_records = records  # per fused module: source, kind, method, name, config (the manifest's extra.fused)
        placements = {m.fusion_placement() for m in fused}
        if len(placements) != 1 or None in placements:
            raise XlpeftError(f"AdapterFusion fuses sequential bottleneck adapters of one placement; got placements "
                              f"{sorted(map(str, placements))}: fuse modules trained with the same placement")
        self.config, self.placement = config, placements.pop()
        self.fused = nn.ModuleList(fused)
        self.layers = nn.ModuleList(
            nn.ModuleDict({s: FusionLayer(config, hidden, dropout) for s in SITES if any(s in m.sites(i) for m in fused)})
            for i in range(num_layers))

    def sites(self, layer: int) -> Collection[str]:
        return self.layers[layer].keys()

    def invertible_adapter(self) -> InvertibleAdapter | None:
        return self.fused[0].invertible_adapter()

    def apply_at(self, layer: int, site: str, h: torch.Tensor, x: torch.Tensor, layer_norm: nn.Module) -> torch.Tensor:
        block = self.layers[layer]
        if site not in block:
            return h
        present = [m for m in self.fused if site in m.sites(layer)]
        ups = torch.stack([m.up_at(layer, site, h, x, layer_norm) for m in present], dim=2)  # (B, T, N, H)
        pre_ln = self.config.query_before_ln or self.placement == "houlsby"
        q = h if pre_ln else layer_norm(h + x)  # (B, T, H)
        return block[site](q, ups, h, layer_norm.training)  # the sub-layer's LayerNorm is in the base's mode


def world_size() -> int:
    """The data-parallel ranks whose gradients :meth:`xlpeft.distributed.Dist.sync_grads` sums (1 alone)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def trained_parameters(module: FusionModule) -> list[nn.Parameter]:
    """The fusion layers' parameters but the key biases: q.b_k adds the same score to every fused adapter, the softmax
    cancels it, so its gradient is exactly zero and an optimiser would only move it by float noise (Adam divides that
    noise by its own square root). Kept (at zero) so the layers keep AdapterHub's shapes."""
    return [p for name, p in module.layers.named_parameters() if not name.endswith("key.bias")]


class FusionTrainable:
    """Trains the fusion layers only (the fused modules stay frozen); adds the value regulariser's gradient."""

    def __init__(self, module: FusionModule, detach, phase: Phase, grad_accum: int) -> None:
        self.module, self._detach, self.phases = module, detach, [phase]
        self._scale = 2.0 * module.config.regularization / grad_accum  # d/dW r||W - I||^2, once per optimizer step
        # (over the ranks too: data parallelism sums the ranks' gradients, so each rank adds 1/world of it)
        self._handles: list = []

    def _regularise(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if not (self.module.config.value and self._scale):
            return
        for block in self.module.layers:
            for layer in block.values():
                w = layer.value.weight
                eye = torch.eye(w.shape[0], device=w.device, dtype=w.dtype)
                self._handles.append(w.register_hook(
                    lambda g, w=w, eye=eye: g + self._scale / world_size() * (w.detach() - eye)))

    def begin_phase(self, phase: Phase) -> list[nn.Parameter]:
        self.module.layers.train()
        self._regularise()
        trained = trained_parameters(self.module)
        keep = {id(p) for p in trained}
        for p in self.module.layers.parameters():
            p.requires_grad_(id(p) in keep)  # the key biases get no gradient to pile up
        return trained

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.layers.state_dict()

    def resume_phase(self, phase: Phase, state: dict[str, torch.Tensor]) -> list[nn.Parameter]:
        self.module.layers.load_state_dict(state, strict=True)
        return self.begin_phase(phase)

    def after_step(self, phase: Phase, step: int) -> None:
        pass

    def end_phase(self, phase: Phase) -> dict[str, float]:
        return {}

    def replicated(self) -> None:
        return None  # dense parameters: summed gradients keep every rank's copy equal

    def export(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        return {STEM: self.module.state_dict()}, {"fused": self.module.fused_records,
                                             "trainable_parameters": sum(p.numel() for p in trained_parameters(self.module))}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._detach()


def score_dropout(base, config: FusionConfig) -> float:
    """The dropout on the attention scores: the config's, else the base's attention dropout (every architecture in
    :data:`~xlpeft.models.ARCHITECTURES` is a BERT-family config with ``attention_probs_dropout_prob``)."""
    return float(base.model.config.attention_probs_dropout_prob if config.dropout is None else config.dropout)


def fusable_methods() -> list[str]:
    from xlpeft.registry import get_method, method_names

    return [n for n in method_names() if get_method(n).build is not None]


def _fused(base, loaded: LoadedModule, source: str) -> HookedAdapter:
    from xlpeft.registry import get_method

    spec = get_method(loaded.manifest.method)
    if spec.build is None:
        raise XlpeftError(f"cannot fuse {source}: it is a {loaded.manifest.method} module; AdapterFusion fuses "
                          f"sequential bottleneck modules ({', '.join(fusable_methods())})")
    return spec.build(base, loaded)


def prepare_fusion(base, config: FusionConfig, train_cfg) -> FusionTrainable:
    """Resolve and freeze the modules to fuse (checked against the base), then train fresh fusion layers over them."""
    from xlpeft.compose import resolve_module

    plan_fusion(config, train_cfg, None)
    fused, records = [], []
    for source in config.sources():
        ref = resolve_module(source, base.fingerprint, base)
        ref.module.check_base(base.fingerprint)
        fused.append(_fused(base, ref.module, source))
        m = ref.module.manifest
        records.append({"source": ref.source, "kind": m.kind, "method": m.method, "name": ref.name, "config": m.config})
    module = FusionModule(config, fused, base.hidden_size, len(base.layers), records, score_dropout(base, config))
    module = module.to(device_of(base.model))
    hooks = attach_adapters(base.model, base.arch, [module])
    return FusionTrainable(module, hooks.remove, Phase("fusion", train_cfg.max_steps), train_cfg.grad_accum)


def fused_modules(loaded: LoadedModule) -> list[LoadedModule]:
    """The fused modules a saved fusion module carries (``fused.<i>.*`` of its tensors, manifests from ``extra.fused``)."""
    from xlpeft.registry import get_method

    records = loaded.manifest.extra.get("fused")
    if not isinstance(records, list) or len(records) < 2:
        raise XlpeftError(f"fusion module {loaded.path} lists no fused modules in its manifest (extra.fused); it is "
                          "incomplete: retrain or re-convert it")
    state = _state(loaded)
    out = []
    for i, rec in enumerate(records):
        mark = f"fused.{i}."
        own = {k[len(mark):]: v for k, v in state.items() if k.startswith(mark)}
        if not own:
            raise XlpeftError(f"fusion module {loaded.path} holds no weights for fused module {i} ({rec.get('name')}); "
                              "it is incomplete: retrain or re-convert it")
        manifest = Manifest(kind=rec["kind"], method=rec["method"], base=loaded.manifest.base, config=rec["config"],
                            lang=rec["name"] if rec["kind"] == "language" else None,
                            task=rec["name"] if rec["kind"] == "task" else None)
        out.append(LoadedModule(manifest, {get_method(rec["method"]).files[0]: own}, loaded.path / f"fused{i}"))
    return out


def _state(loaded: LoadedModule) -> dict[str, torch.Tensor]:
    if STEM not in loaded.tensors:
        raise XlpeftError(f"fusion module {loaded.path} has no {STEM}.safetensors; it is incomplete: retrain or re-convert it")
    return loaded.tensors[STEM]


def build_fusion(base, loaded: LoadedModule) -> FusionModule:
    """A saved fusion module rebuilt with its fused modules, its weights loaded strictly, frozen, not hooked."""
    config = build(FusionConfig, loaded.manifest.config)
    children = fused_modules(loaded)
    fused = [_fused(base, child, f"{loaded.path} (fused module {i})") for i, child in enumerate(children)]
    module = FusionModule(config, fused, base.hidden_size, len(base.layers), loaded.manifest.extra["fused"],
                          score_dropout(base, config))
    try:
        module.load_state_dict(_state(loaded), strict=True)
    except RuntimeError as exc:
        raise XlpeftError(f"fusion weights in {loaded.path} do not fit this base: {str(exc).splitlines()[0]}") from None
    module.to(device_of(base.model)).eval()
    module.requires_grad_(False)
    return module


def apply_fusion(base, loaded: LoadedModule) -> AppliedModule:
    """Rebuild a saved fusion module (with the modules it fuses) and hook it onto ``base``, frozen."""
    return hook_applied(base, build_fusion(base, loaded), STEM)


def fusion_defaults(kind: str) -> dict[str, Any]:
    """AdapterFusion's training recipe (Pfeiffer et al. 2021): learning rate 5e-5."""
    return {"lr": 5e-5}


def fused_sources(extra: dict[str, Any]) -> list[str]:
    """The fused modules, bottom of the Fuse block first: a fusion module's parents in MLflow."""
    return [record["source"] for record in extra.get("fused", [])]


SPEC = MethodSpec(
    name="fusion",
    config_cls=FusionConfig,
    prepare=prepare_fusion,
    apply=apply_fusion,
    combine="stack",  # AdapterFusion replaces a Fuse block's adapters at their sites: it stacks like they do
    help="AdapterFusion (Pfeiffer et al. 2021): attention over several frozen adapters' outputs per layer "
         "(--set fuse=A,B,...); the modules it fuses travel inside it",
    train_defaults=fusion_defaults,
    plan=plan_fusion,
    files=(STEM,),
    identity_at_init=False,  # it starts as a learned average of its adapters' outputs, not as the bare base
    prepare_checks_base=True,  # resolving the modules to fuse and their placements fails before a run opens
    parents=fused_sources,
)
