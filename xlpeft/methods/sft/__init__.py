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
:mod:`.trainable` (the two phases and activation), :mod:`.memory` (per-phase peak memory).
"""

from xlpeft.methods.sft.config import SELECTIONS, SFTConfig, default_num_params, split_steps
from xlpeft.methods.sft.delta import AppliedDelta, SparseDelta
from xlpeft.methods.sft.memory import PeakMemory
from xlpeft.methods.sft.selection import MovementScores, top_k_indices
from xlpeft.methods.sft.trainable import (
    ActiveSFT,
    SFTTrainable,
    activate_sft,
    maskable_parameters,
    prepare_sft,
    retie_decoder,
    untie_decoder,
)

__all__ = [
    "SELECTIONS", "ActiveSFT", "AppliedDelta", "MovementScores", "PeakMemory", "SFTConfig", "SFTTrainable", "SparseDelta",
    "activate_sft", "default_num_params", "maskable_parameters", "prepare_sft", "retie_decoder", "split_steps", "top_k_indices", "untie_decoder",
]
