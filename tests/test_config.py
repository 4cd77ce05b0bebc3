import pytest

from xlpeft.config import TrainConfig, coerce, parse_sets, split_overrides
from xlpeft.errors import ConfigError
from xlpeft.methods.adapters import AdapterConfig


def test_overrides_route_to_the_right_config_and_coerce_types():
    method, train = split_overrides(
        {"reduction_factor": "16", "lr": "3e-4", "invertible": "false", "max_seq_len": "128"}, AdapterConfig, TrainConfig
    )
    assert method == {"reduction_factor": 16.0, "invertible": False}
    assert train == {"lr": 3e-4, "max_seq_len": 128}


def test_unknown_key_lists_accepted_keys():
    with pytest.raises(ConfigError) as err:
        split_overrides({"reduction": "2"}, AdapterConfig, TrainConfig)
    message = str(err.value)
    assert "'reduction'" in message and "reduction_factor" in message and "lr" in message


def test_bad_value_names_key_type_and_value():
    with pytest.raises(ConfigError, match=r"`lr` should be a float; got 'fast'"):
        coerce(TrainConfig, "lr", "fast")
    with pytest.raises(ConfigError, match=r"`invertible` should be a bool; got 'maybe'"):
        coerce(AdapterConfig, "invertible", "maybe")


def test_all_range_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        TrainConfig(lr=-1.0, batch_size=0, mlm_probability=2.0)
    message = str(err.value)
    for key in ("lr", "batch_size", "mlm_probability"):
        assert f"`{key}`" in message


def test_set_pair_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_sets(["lr"])
    assert parse_sets(["lr=1e-4", "seed = 3"]) == {"lr": "1e-4", "seed": "3"}


def test_configs_are_frozen():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # type: ignore[misc]
