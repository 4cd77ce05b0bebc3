"""SFT hyper-parameters: the config dataclass, the default K for a model, and the split of steps.

Default K. LT-SFT (Ansell et al., ACL 2022) keeps K = 7.6M entries for a language SFT and 14.2M
for a task SFT on base-size encoders (12 layers x 768), mBERT and XLM-R alike. For other sizes
K is scaled by the parameters of the transformer layers:

    K = reference_num_params * layer_params(model) / layer_params(mBERT-base)

Layers rather than all maskable parameters, so that every base-size encoder gets exactly
LT-SFT's K whatever its vocabulary (XLM-R's 250k-row embedding matrix would otherwise give it
1.6x mBERT's K), and a tiny test model gets a proportionally tiny one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from xlpeft.config import check_fields
from xlpeft.errors import ConfigError

SELECTIONS = ("magnitude", "movement", "random", "bias")
NEEDS_FULL_PHASE = ("magnitude", "movement")  # selections scored from phase 1's training

LANGUAGE_NUM_PARAMS = 7_600_000  # LT-SFT language SFTs on base-size models
TASK_NUM_PARAMS = 14_200_000  # LT-SFT task SFTs on base-size models

# Parameters of mBERT-base's 12 transformer layers: per layer Q, K, V, O (768x768 + 768 each),
# FFN in (768x3072 + 3072) and out (3072x768 + 768), two LayerNorms (2 x 1536) = 7,087,872.
MBERT_BASE_LAYER_PARAMS = 12 * 7_087_872


@dataclass(frozen=True)
class SFTConfig:
    """Hyper-parameters of a Lottery-Ticket sparse fine-tuning. The learning rate is TrainConfig's ``lr``."""

    num_params: int | None = field(default=None, metadata={"help": "K, entries kept in the delta (None: reference_num_params scaled to this model)", "min": 1})
    reference_num_params: int = field(default=LANGUAGE_NUM_PARAMS, metadata={"help": "K on a base-size (12x768) model when num_params is None (LT-SFT: 7.6M language, 14.2M task)", "min": 1})
    selection: str = field(default="magnitude", metadata={"help": "how the K entries are chosen (bias: BitFit, every bias term, K ignored)", "choices": SELECTIONS})
    full_steps: int | None = field(default=None, metadata={"help": "phase-1 steps of full fine-tuning (None: half of --max-steps; 0 for random/bias)", "min": 0})
    sparse_steps: int | None = field(default=None, metadata={"help": "phase-2 steps on the selected entries (None: the rest of --max-steps)", "min": 1})
    l1: float = field(default=0.0, metadata={"help": "L1 pull of the delta toward 0 in phase 2, l1 * |delta|_1 / model parameters (LT-SFT)", "min": 0.0})
    freeze_layer_norm: bool = field(default=True, metadata={"help": "keep LayerNorm weights out of the delta"})
    include_embeddings: bool = field(default=True, metadata={"help": "let the delta touch the embeddings (word, position, token type)"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.selection in NEEDS_FULL_PHASE and self.full_steps == 0:
            raise ConfigError(
                f"invalid SFTConfig: `{self.selection}` selection scores entries from phase 1, so `full_steps` "
                "should be >= 1; got 0 (use selection=random or bias to skip phase 1)"
            )

    def check_against(self, train_cfg) -> None:
        """Fail before any run is opened if ``--max-steps`` cannot be split into the phases."""
        split_steps(self, train_cfg.max_steps)

    @classmethod
    def defaults_for(cls, kind: str) -> dict:
        """LT-SFT's K per module kind: 7.6M for language SFTs, 14.2M for task SFTs (base-size models)."""
        return {"reference_num_params": TASK_NUM_PARAMS} if kind == "task" else {}


def layer_params(layers: nn.Module) -> int:
    return sum(p.numel() for p in layers.parameters())


def default_num_params(reference: int, model_layer_params: int) -> int:
    """``reference`` (K on mBERT-base) scaled by the model's transformer-layer parameters; at least 1."""
    return max(1, round(reference * model_layer_params / MBERT_BASE_LAYER_PARAMS))


def split_steps(config: SFTConfig, max_steps: int) -> tuple[int, int]:
    """(full_steps, sparse_steps) from the config and ``--max-steps``, which is the total when a phase is unset.

    * magnitude / movement: both unset -> ``max_steps // 2`` full, the rest sparse; one set -> the
      other gets ``max_steps`` minus it; both set -> used as given (``max_steps`` is ignored).
    * random / bias need no phase 1: ``full_steps`` defaults to 0 and the sparse phase gets the rest.

    Raises:
        ConfigError: a phase would get no steps.
    """
    full, sparse = config.full_steps, config.sparse_steps
    if full is None:
        if config.selection not in NEEDS_FULL_PHASE:
            full = 0
        elif sparse is None:
            full = max_steps // 2
        else:
            full = max_steps - sparse
    if sparse is None:
        sparse = max_steps - full
    if (config.selection in NEEDS_FULL_PHASE and full < 1) or sparse < 1:
        raise ConfigError(
            f"sft with {config.selection} selection cannot split --max-steps {max_steps} into "
            f"{full} full + {sparse} sparse steps; every phase needs >= 1 step "
            "(raise --max-steps or set full_steps/sparse_steps)"
        )
    return full, sparse
