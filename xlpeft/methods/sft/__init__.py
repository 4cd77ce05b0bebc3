"""Sparse fine-tuning (LT-SFT; Ansell et al., ACL 2022, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer").

A module is a sparse delta added to the frozen weights, theta = theta0 + delta, with at most K
non-zero entries. Training (``train-lang --method sft``) runs two phases:

1. ``full``: fine-tune every maskable weight (all but LayerNorms and the MLM head by default);
2. select K entries (``selection``: magnitude |theta1 - theta0|, movement scores, random, or
   BitFit's bias terms), reset to theta0, and ``sparse``: train only those entries.

Layout: :mod:`.config` (SFTConfig, default K, step split), :mod:`.selection` (streamed exact
top-K, movement scores), :mod:`.delta` (the SparseDelta value: apply/revert/sum/save),
:mod:`.trainable` (the two phases and activation), :mod:`.memory` (per-phase peak memory).
"""

from xlpeft.methods.sft.config import SELECTIONS, SFTConfig, default_num_params, split_steps
from xlpeft.methods.sft.delta import AppliedDelta, SparseDelta
from xlpeft.methods.sft.memory import PeakMemory
from xlpeft.methods.sft.selection import MovementScores, top_k_indices
from xlpeft.methods.sft.trainable import SFTTrainable, activate_sft, maskable_parameters, prepare_sft

__all__ = [
    "SELECTIONS", "AppliedDelta", "MovementScores", "PeakMemory", "SFTConfig", "SFTTrainable", "SparseDelta",
    "activate_sft", "default_num_params", "maskable_parameters", "prepare_sft", "split_steps", "top_k_indices",
]
