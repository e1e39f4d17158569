"""BranchConfig refuses values of the wrong type or range by name, as a --config file can hold them."""

import json

import pytest

from models.branch import BranchConfig


@pytest.mark.parametrize("values, match", [
    ({"epochs": 1.5}, r"'epochs' must be int, got 1\.5"),
    ({"epochs": "two"}, r"'epochs' must be int, got 'two'"),
    ({"augment": "no"}, r"'augment' must be bool, got 'no'"),
    ({"augment": 0}, r"'augment' must be bool, got 0"),
    ({"dropout": "0.3"}, r"'dropout' must be float, got '0\.3'"),
    ({"learning_rate": -1}, r"learning_rate must be in \(0, 10\), got -1"),
    ({"learning_rate": 0}, r"learning_rate must be in \(0, 10\)"),
    ({"seed": -2}, r"seed must be >= 0, got -2"),
    ({"patience": -1}, r"patience must be >= 0"),
])
def test_wrong_types_and_ranges_are_refused_naming_the_key(values, match):
    with pytest.raises(ValueError, match=match):
        BranchConfig.from_dict(values)


def test_an_int_where_a_float_is_expected_is_the_same_config():
    config = BranchConfig.from_dict({"learning_rate": 1, "dropout": 0})
    assert config == BranchConfig(learning_rate=1.0, dropout=0.0)
    assert isinstance(config.learning_rate, float)
    assert BranchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_cli_refuses_a_config_file_with_a_wrong_type_without_a_traceback(tmp_path, capsys):
    from skinfusion.cli import train_main

    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"augment": "no"}')
    rc = train_main(["--view", "rgb", "--data", str(tmp_path), "--run", str(tmp_path / "run"), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'augment' must be bool" in err and "Traceback" not in err
