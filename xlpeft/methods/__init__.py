"""Built-in methods. Each module holds its config dataclass, its layers and its injection."""

from xlpeft.methods.adapters import AdapterConfig, activate_adapter, prepare_adapter
from xlpeft.methods.sft import SFTConfig, activate_sft, prepare_sft
from xlpeft.registry import MethodSpec, register_method

register_method(
    MethodSpec(
        name="adapter",
        config_cls=AdapterConfig,
        prepare=prepare_adapter,
        activate=activate_adapter,
        help="MAD-X bottleneck adapters (+ invertible embedding adapter for language modules)",
    )
)

register_method(
    MethodSpec(
        name="sft",
        config_cls=SFTConfig,
        prepare=prepare_sft,
        activate=activate_sft,
        help="LT-SFT sparse fine-tuning: a delta on K base weights (magnitude/movement/random/bias selection)",
    )
)
