"""Sparse fine-tuning (LT-SFT; Ansell et al., ACL 2022, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer").

A module is a sparse delta added to the frozen weights, theta = theta0 + delta, with at most K
non-zero entries. Training (``train-lang --method sft``) runs two phases:

1. ``full``: fine-tune every maskable weight (all but LayerNorms and the MLM head by default);
2. select K entries (``selection``: magnitude |theta1 - theta0|, movement scores, random, or
   BitFit's bias terms; one global top-K over all tensors), reset to theta0 (the task head to its
   initial values), and ``sparse``: train only those entries.

The defaults are composable-sft's released recipes (K, L1 in both phases for language SFTs, the
untied frozen decoder, the head reset before phase 2, lr 5e-5, task epochs 3 + 10); each is an
option (:mod:`.config`, ``xlpeft methods``).

Layout: :mod:`.config` (SFTConfig, published defaults, default K, step split and epochs), :mod:`.selection` (streamed exact
top-K, movement scores), :mod:`.delta` (the SparseDelta value: apply/revert/sum/save),
:mod:`.trainable` (the two phases), :mod:`.applied` (a saved module applied), :mod:`.memory` (per-phase peak memory).
"""

from __future__ import annotations

import re

from xlpeft.methods.base import MethodSpec
from xlpeft.methods.deltas import sft_carrier, sft_weight_delta
from xlpeft.methods.sft.applied import AppliedSFT, apply_sft, retie_decoder, untie_decoder
from xlpeft.methods.sft.config import SELECTIONS, SFTConfig, default_num_params, split_steps
from xlpeft.methods.sft.delta import SparseDelta
from xlpeft.methods.sft.memory import PeakMemory
from xlpeft.methods.sft.params import maskable_parameters
from xlpeft.methods.sft.selection import MovementScores, top_k_indices
from xlpeft.methods.sft.trainable import SFTTrainable, prepare_sft


def plan_sft(config: SFTConfig, train_cfg, num_examples: int | None) -> SFTConfig:
    """Before the data is read: can ``max_steps`` be split into the phases? After: epoch-based phases -> steps."""
    if num_examples is None:
        config.check_against(train_cfg)
        return config
    return config.with_epochs(num_examples, train_cfg)


def delta_overlap(lower, upper) -> dict[str, int]:
    """Indices two sft modules share, per transformer layer (``layer_03``), ``embeddings`` or ``other``.

    Where two deltas overlap, θ0 + δ_lang + δ_task adds both values to one weight (Ansell et al. 2022, §3.3).
    """
    shared = SparseDelta.from_tensors(lower.tensors["delta"]).overlap(SparseDelta.from_tensors(upper.tensors["delta"]))
    per_layer: dict[str, int] = {}
    for name, count in shared.items():
        match = re.search(r"layer\.(\d+)\.", name)
        bucket = f"layer_{int(match.group(1)):02d}" if match else ("embeddings" if "embeddings" in name else "other")
        per_layer[bucket] = per_layer.get(bucket, 0) + count
    return dict(sorted(per_layer.items()))


SPEC = MethodSpec(
    name="sft",
    config_cls=SFTConfig,
    prepare=prepare_sft,
    apply=apply_sft,
    combine="sum",  # θ0 + δ_lang + δ_task
    help="LT-SFT sparse fine-tuning: a delta on K base weights (magnitude/movement/random/bias selection)",
    defaults=SFTConfig.defaults_for,
    train_defaults=SFTConfig.train_defaults_for,
    dropped_by=SFTConfig.DROPPED_BY,
    plan=plan_sft,
    overlap=delta_overlap,
    files=("delta",),
    weight_delta=sft_weight_delta,
    delta_carrier=sft_carrier,  # a merge of any weight deltas is a sparse delta (xlpeft merge)
    trains_in_place=True,  # both phases write the base's weights (trainable.py)
)

__all__ = [
    "SELECTIONS", "SPEC", "AppliedSFT", "MovementScores", "PeakMemory", "SFTConfig", "SFTTrainable", "SparseDelta",
    "apply_sft", "default_num_params", "delta_overlap", "maskable_parameters", "plan_sft", "prepare_sft",
    "retie_decoder", "split_steps", "top_k_indices", "untie_decoder",
]
