"""The merging hooks of the weight-delta methods (``MethodSpec.weight_delta`` / ``merge_own`` / ``delta_carrier``).

LT-SFT deltas and LoRA modules both change the base's weights, so :mod:`xlpeft.merging` can merge
them (weighted sums, task arithmetic, TIES). Each method says here how its module reads as a sparse
delta over the base's parameters; LoRA also merges with itself exactly, by concatenating ranks; and
an sft module can hold any merged delta.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from xlpeft.config import build
from xlpeft.errors import XlpeftError

Entries = dict[str, tuple[torch.Tensor, torch.Tensor]]  # parameter name -> (flat indices (K,), values (K,))


def sft_weight_delta(base: Any, module: Any) -> Entries:
    """An sft module's delta, as stored."""
    from xlpeft.methods.sft.delta import SparseDelta

    return dict(SparseDelta.from_tensors(module.tensors["delta"]).entries)


def sft_carrier(entries: Entries, parents: list[Any]) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(config, tensors) of the sft module holding a merged delta; the config is the sft parents' (K updated).

    Raises:
        XlpeftError: sft parents that differ in ``freeze_decoder`` (the merge would have no single meaning).
    """
    from xlpeft.methods.sft.config import SFTConfig
    from xlpeft.methods.sft.delta import SparseDelta

    configs = [build(SFTConfig, p.manifest.config) for p in parents if p.manifest.method == "sft"]
    if len({c.freeze_decoder for c in configs}) > 1:
        raise XlpeftError("the sft modules differ in freeze_decoder (whether the MLM decoder keeps the base's "
                          "embeddings), so their merge has no single meaning; merge modules trained alike")
    delta = SparseDelta(entries)
    config = {**asdict(configs[0] if configs else SFTConfig()), "num_params": max(delta.num_params, 1)}
    return config, {"delta": delta.to_tensors()}


def lora_weight_delta(base: Any, module: Any) -> Entries:
    """A LoRA module's dense delta (alpha/r)·B·A over every weight it adapts.

    Raises:
        XlpeftError: a DoRA module (its change depends on the weight it is merged into: not a delta that sums).
    """
    from xlpeft.methods.lora import STEM, LoraConfig, LoraModule, merged_delta, resolve_targets

    config = build(LoraConfig, module.manifest.config)
    if config.use_dora:
        raise XlpeftError(f"{module.path} is a DoRA module: its change to a weight depends on the weight it is "
                          "merged into, so it is not a delta that sums; merge plain LoRA or sft modules")
    paths = resolve_targets(base, config)
    lora = LoraModule(config, {i: {s: lin for s, (_, lin) in sites.items()} for i, sites in paths.items()},
                      init_weights=False)
    lora.load_state_dict(module.tensors[STEM], strict=True)
    return dict(merged_delta(lora, paths).entries)


def lora_merge_own(modules: list[Any], weights: list[float],
                   scale: float) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]] | None:
    """The LoRA of rank Σ r_i whose delta is λ Σ w_i s_i B_i A_i, exactly: [w_1 s_1 B_1 | ...] · [A_1; ...].

    Returns None when the modules adapt different weights or one is DoRA (then they merge as sparse deltas).
    """
    from xlpeft.methods.lora import STEM, LoraConfig

    configs = [build(LoraConfig, m.manifest.config) for m in modules]
    keys = [set(m.tensors[STEM]) for m in modules]
    if any(c.use_dora for c in configs) or any(k != keys[0] for k in keys):
        return None
    rank = sum(c.r for c in configs)
    state = {}
    for key in sorted(k for k in keys[0] if k.endswith(".lora_A")):
        stem = key.removesuffix(".lora_A")
        state[key] = torch.cat([m.tensors[STEM][key] for m in modules], dim=0)  # (Σr, in)
        state[f"{stem}.lora_B"] = torch.cat(
            [m.tensors[STEM][f"{stem}.lora_B"] * (w * scale * c.scaling)
             for m, w, c in zip(modules, weights, configs, strict=True)], dim=1)  # (out, Σr)
    config = {**asdict(configs[0]), "r": rank, "alpha": float(rank)}  # scaling 1: the factors carry each module's own
    return config, {STEM: state}
