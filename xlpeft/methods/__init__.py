"""Built-in methods. Each module holds its config dataclass, its layers and its injection."""

from xlpeft.methods.adapters import AdapterConfig, activate_adapter, prepare_adapter
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
