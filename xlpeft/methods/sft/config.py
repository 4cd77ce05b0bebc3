"""SFT hyper-parameters: the config dataclass, the default K for a model, and the split of steps.

Published defaults (composable-sft, cambridgeltl/composable-sft, the scripts released with LT-SFT,
Ansell et al., ACL 2022; ``examples/language-modeling/train_mlm.sh``, ``examples/token-classification/
train_{ner,pos_tagging}.sh``), each kept as an option:

* K: ``--ft_params_num`` 7,667,712 for language SFTs, 14,155,776 for task SFTs (base-size models);
* L1 towards theta0 with weight 0.1 in both phases for language SFTs (``--full_l1_reg 0.1
  --sparse_l1_reg 0.1``), none for the NER/POS task SFTs;
* the MLM decoder untied from the word embeddings and frozen for language SFTs (``--freeze_decoder``);
* the task head reset to its initial values before phase 2 (the trainer's ``reset()`` restores every
  parameter, see ``src/sft/lt_sft.py``);
* learning rate 5e-5, no warm-up (the HF Trainer's default);
* task phases of 3 epochs full + 10 epochs sparse (``--{full,sparse}_ft_max_epochs_per_iteration``).

Default K on other sizes: scaled by the parameters of the transformer layers,

    K = reference_num_params * layer_params(model) / layer_params(mBERT-base)

Layers rather than all maskable parameters, so that every base-size encoder gets exactly
LT-SFT's K whatever its vocabulary (XLM-R's 250k-row embedding matrix would otherwise give it
1.6x mBERT's K), and a tiny test model gets a proportionally tiny one.

How :mod:`.trainable` applies them (composable-sft ``src/sft/trainer.py``, ``lt_sft.py``): L1 is ``l1 * sum|theta - theta0| / (all model parameters)``, its subgradient
``l1 * sign(theta - theta0) / N`` added once per optimizer step, in both phases unless
``l1_full_phase`` is off (composable-sft backpropagates its reg loss once per step scaled by
``gradient_accumulation_steps``, which accelerate's ``backward`` divides out again); the phase-2
:class:`~xlpeft.registry.Phase` asks the loop to reset the task head (``reset_head``); with
``freeze_decoder`` the MLM decoder gets its own frozen copy of the word embeddings for the
lifetime of the trainable (and of an activated module), instead of sharing the tensor the delta
changes. Known difference: composable-sft's L1 also pulls a fully trained head towards its
initial values; here it covers the delta's weights only (the released task recipes use l1 = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

from torch import nn

from xlpeft.config import check_fields
from xlpeft.errors import ConfigError
from xlpeft.methods.sft.taps import ENTRY_GRADIENTS

SELECTIONS = ("magnitude", "movement", "fisher", "diff_pruning", "random", "bias", "dynamic")
GROWTHS = ("rigl", "sm3")  # dynamic selection's growth criteria (SpIEL)
POLICIES = ("linear", "cosine")  # how the fraction replaced per reselection decays (SpIEL)
NEEDS_FULL_PHASE = ("magnitude", "movement", "diff_pruning")  # selections scored from phase 1's training
FISHER_SAMPLES = 1024  # examples the FISH mask's Fisher information is summed over (Sung et al. 2021)
MOVEMENTS = ("paper", "delta")

LANGUAGE_NUM_PARAMS = 7_667_712  # composable-sft train_mlm.sh --ft_params_num (base-size models)
TASK_NUM_PARAMS = 14_155_776  # composable-sft train_ner.sh / train_pos_tagging.sh --ft_params_num

# Parameters of mBERT-base's 12 transformer layers: per layer Q, K, V, O (768x768 + 768 each),
# FFN in (768x3072 + 3072) and out (3072x768 + 768), two LayerNorms (2 x 1536) = 7,087,872.
MBERT_BASE_LAYER_PARAMS = 12 * 7_087_872

@dataclass(frozen=True)
class SFTConfig:
    """Hyper-parameters of a Lottery-Ticket sparse fine-tuning. The learning rate is TrainConfig's ``lr``."""

    num_params: int | None = field(default=None, metadata={"help": "K, entries kept in the delta (None: reference_num_params scaled to this model)", "min": 1})
    reference_num_params: int = field(default=LANGUAGE_NUM_PARAMS, metadata={"help": "K on a base-size (12x768) model when num_params is None (composable-sft scripts: 7,667,712 language, 14,155,776 task)", "min": 1})
    selection: str = field(default="magnitude", metadata={"help": "how the K entries are chosen: magnitude |theta1-theta0| (LT-SFT), movement, fisher (FISH mask: squared gradients at theta0, no training in phase 1), diff_pruning (phase 1 learns theta0 + z*w with L0-gated z), random, bias (BitFit, K ignored), dynamic (SpIEL: no dense phase, drop and grow during training)", "choices": SELECTIONS})
    growth: str = field(default="rigl", metadata={"help": "dynamic: where new entries grow, rigl = largest accumulated |gradient| at K candidates, sm3 = largest outer product of SM3 row/column accumulators (SpIEL)", "choices": GROWTHS})
    reselect_every: int = field(default=20, metadata={"help": "dynamic: steps between reselections (SpIEL reselection_steps 20)", "min": 1})
    accumulation_steps: int = field(default=5, metadata={"help": "dynamic, rigl: steps whose gradients are accumulated before a reselection (SpIEL selection_accumulation_steps 5)", "min": 1})
    reselection_rate: float = field(default=0.2, metadata={"help": "dynamic: fraction of the K entries replaced at a reselection, decayed over training; the first replaces all (SpIEL initial_reselection_rate 0.2)", "min": 0.0, "max": 1.0})
    reselection_policy: str = field(default="linear", metadata={"help": "dynamic: decay of the reselection rate over training (SpIEL reselection_rate_policy)", "choices": POLICIES})
    entry_gradients: str = field(default="auto", metadata={"help": "sparse phase: how gradients at the K entries are computed; auto = per weight, sampled (SDDMM at the entries) below 5% density, else dense row blocks gathered at the entries; embeddings row-sparse; no dense weight gradient is kept; autograd = the weights' full gradients, then gathered (before issue 19)", "choices": ENTRY_GRADIENTS})
    fisher_samples: int = field(default=FISHER_SAMPLES, metadata={"help": "fisher: examples (rows of micro-batches) whose squared gradients are summed at theta0; phase 1 is this many / (batch_size x grad_accum) steps unless full_steps is set (Sung et al. 2021: 1024)", "min": 1})
    diff_l0: float = field(default=1.25e-7, metadata={"help": "diff_pruning: weight of the expected-L0 penalty on the gates, on their unnormalised sum (Guo et al. 2021's released scripts: 1.25e-7)", "min": 0.0})
    diff_alpha_lr: float = field(default=0.1, metadata={"help": "diff_pruning: learning rate of the gates' log-alphas (Guo et al.: 0.1; the diff w takes TrainConfig's lr)", "min": 0.0})
    movement: str = field(default="paper", metadata={"help": "movement scores: paper = -sum g*theta at the weights g was taken at (Sanh et al. 2020); delta = -sum g*(theta_after-theta0), the delta's own movement", "choices": MOVEMENTS})
    full_steps: int | None = field(default=None, metadata={"help": "phase-1 steps of full fine-tuning (None: from full_epochs, else half of --max-steps; 0 for random/bias)", "min": 0})
    sparse_steps: int | None = field(default=None, metadata={"help": "phase-2 steps on the selected entries (None: from sparse_epochs, else the rest of --max-steps)", "min": 1})
    full_epochs: int | None = field(default=None, metadata={"help": "phase-1 length in epochs of the training data (task default 3, composable-sft NER/POS); full_steps wins; an explicit --max-steps drops the default", "min": 1})
    sparse_epochs: int | None = field(default=None, metadata={"help": "phase-2 length in epochs (task default 10, composable-sft NER/POS); sparse_steps wins; an explicit --max-steps drops the default", "min": 1})
    l1: float = field(default=0.0, metadata={"help": "L1 pull of theta towards theta0, l1 * |theta-theta0|_1 / model parameters (language default 0.1 as composable-sft's MLM recipe; task 0 as its NER/POS recipes; its released trainer computes but never applies it, which l1=0 reproduces)", "min": 0.0})
    l1_full_phase: bool = field(default=True, metadata={"help": "apply l1 in phase 1 too (composable-sft --full_l1_reg); false: phase 2 only"})
    reset_head: bool = field(default=True, metadata={"help": "reset the task head to its initial values before phase 2, as composable-sft resets every parameter; false keeps the phase-1 head"})
    freeze_decoder: bool = field(default=False, metadata={"help": "untie the MLM decoder from the word embeddings and keep it frozen, so the embedding delta leaves the output layer alone (language default true, composable-sft --freeze_decoder)"})
    freeze_layer_norm: bool = field(default=True, metadata={"help": "keep LayerNorm weights out of the delta (composable-sft --freeze_layer_norm)"})
    include_embeddings: bool = field(default=True, metadata={"help": "let the delta touch the embeddings (word, position, token type)"})

    # an explicit TrainConfig key (--set or CLI flag) that drops these per-kind defaults
    DROPPED_BY: ClassVar[dict[str, tuple[str, ...]]] = {"max_steps": ("full_epochs", "sparse_epochs")}

    def __post_init__(self) -> None:
        check_fields(self)
        if self.selection == "dynamic" and self.accumulation_steps >= self.reselect_every:
            raise ConfigError(
                f"invalid SFTConfig: dynamic selection accumulates gradients for `accumulation_steps` steps of every "
                f"`reselect_every`, so it should be below it; got {self.accumulation_steps} >= {self.reselect_every} "
                "(lower accumulation_steps or raise reselect_every)"
            )
        if self.selection == "dynamic" and self.full_steps:
            raise ConfigError(
                f"invalid SFTConfig: dynamic selection has no dense phase, so `full_steps` should be unset or 0; "
                f"got {self.full_steps} (use selection=magnitude or movement for LT-SFT's two phases)"
            )
        if self.selection in (*NEEDS_FULL_PHASE, "fisher") and self.full_steps == 0:
            raise ConfigError(
                f"invalid SFTConfig: `{self.selection}` selection scores entries from phase 1, so `full_steps` "
                "should be >= 1; got 0 (use selection=random or bias to skip phase 1)"
            )

    def check_against(self, train_cfg) -> None:
        """Fail before any run is opened if ``--max-steps`` cannot be split into the phases."""
        if self.full_epochs is None and self.sparse_epochs is None:
            split_steps(self, train_cfg.max_steps, train_cfg.batch_size * train_cfg.grad_accum)

    def with_epochs(self, num_examples: int, train_cfg) -> SFTConfig:
        """Epoch-based phases converted to steps for ``num_examples`` training examples (or blocks).

        One epoch is ``ceil(num_examples / batch_size) // grad_accum`` optimizer steps (at least 1),
        as the HF Trainer that composable-sft drives counts it. An explicit ``*_steps`` wins over
        ``*_epochs``.

        Raises:
            ConfigError: a phase would get no steps.
        """
        per_epoch = max(1, math.ceil(num_examples / train_cfg.batch_size) // train_cfg.grad_accum)

        def steps(explicit: int | None, epochs: int | None) -> int | None:
            return explicit if explicit is not None or epochs is None else epochs * per_epoch

        full = steps(self.full_steps, self.full_epochs) if self.selection in NEEDS_FULL_PHASE else self.full_steps
        sparse = steps(self.sparse_steps, self.sparse_epochs)
        out = replace(self, full_steps=full, sparse_steps=sparse, full_epochs=None, sparse_epochs=None)
        split_steps(out, train_cfg.max_steps, train_cfg.batch_size * train_cfg.grad_accum)
        return replace(out, full_epochs=self.full_epochs, sparse_epochs=self.sparse_epochs)

    @classmethod
    def defaults_for(cls, kind: str) -> dict:
        """composable-sft's released recipe per module kind (see the module docstring)."""
        if kind == "task":
            return {"reference_num_params": TASK_NUM_PARAMS, "full_epochs": 3, "sparse_epochs": 10}
        return {"l1": 0.1, "freeze_decoder": True}

    @classmethod
    def train_defaults_for(cls, kind: str) -> dict:
        """TrainConfig defaults of the published recipe: lr 5e-5 (both kinds), no warm-up (HF Trainer default)."""
        return {"lr": 5e-5, "warmup_ratio": 0.0}


def layer_params(layers: nn.Module) -> int:
    return sum(p.numel() for p in layers.parameters())


def default_num_params(reference: int, model_layer_params: int) -> int:
    """``reference`` (K on mBERT-base) scaled by the model's transformer-layer parameters; at least 1."""
    return max(1, round(reference * model_layer_params / MBERT_BASE_LAYER_PARAMS))


def split_steps(config: SFTConfig, max_steps: int, examples_per_step: int = 1) -> tuple[int, int]:
    """(full_steps, sparse_steps) from the config and ``--max-steps``, which is the total when a phase is unset.

    * magnitude / movement / diff_pruning: both unset -> ``max_steps // 2`` full, the rest sparse; one
      set -> the other gets ``max_steps`` minus it; both set -> used as given (``max_steps`` is ignored).
    * fisher: phase 1 trains nothing, so it is not part of the total: ``full_steps`` defaults to
      ``ceil(fisher_samples / examples_per_step)`` and the sparse phase gets ``max_steps``.
    * random / bias / dynamic need no phase 1: ``full_steps`` defaults to 0 and the sparse phase gets the rest.

    Raises:
        ConfigError: a phase would get no steps.
    """
    full, sparse = config.full_steps, config.sparse_steps
    if (config.full_epochs and full is None and config.selection in NEEDS_FULL_PHASE) or (config.sparse_epochs and sparse is None):
        raise ConfigError("sft: full_epochs/sparse_epochs must be converted to steps for the training data first "
                          "(SFTConfig.with_epochs, done by the train-lang/train-task recipes)")
    if config.selection == "fisher":
        full = full if full is not None else math.ceil(config.fisher_samples / max(1, examples_per_step))
        sparse = sparse if sparse is not None else max_steps
    if full is None:
        if config.selection not in NEEDS_FULL_PHASE:
            full = 0
        elif sparse is None:
            full = max_steps // 2
        else:
            full = max_steps - sparse
    if sparse is None:
        sparse = max_steps - full
    if (config.selection in (*NEEDS_FULL_PHASE, "fisher") and full < 1) or sparse < 1:
        raise ConfigError(
            f"sft with {config.selection} selection cannot split --max-steps {max_steps} into "
            f"{full} full + {sparse} sparse steps; every phase needs >= 1 step "
            "(raise --max-steps or set full_steps/sparse_steps)"
        )
    return full, sparse
