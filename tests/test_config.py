import pytest

from graphopt import Config


def test_defaults():
    cfg = Config()
    assert (cfg.target, cfg.quantize, cfg.fallback, cfg.verify) == ("cpu", None, "eager", False)


def test_from_options_merges_keywords():
    cfg = Config.from_options({"target": "llvm"}, verify=True)
    assert cfg.target == "llvm" and cfg.verify is True


@pytest.mark.parametrize(
    "options,message",
    [
        ({"quantise": "int8"}, r"unknown graphopt option 'quantise' \(did you mean 'quantize'\?\)"),
        ({"targt": "cpu"}, r"did you mean 'target'"),
        ({"target": "tpu"}, r"'target' got 'tpu'; accepted values: \['cpu', 'onnx', 'openvino'"),
        ({"quantize": "int4"}, r"'quantize' got 'int4'; accepted values: \[None, 'int8', 'int8_"),
        ({"quantize": "int4_weight_only", "group_size": 48}, r"'group_size' got 48; accepted"),
        ({"fallback": "ignore"}, r"accepted values: \['eager', 'error'\]"),
        ({"sparsity": 1.5}, r"'sparsity' must be a number in \[0, 1\)"),
        ({"sparsity": "half"}, r"'sparsity' must be a number"),
        ({"verify": "yes"}, r"'verify' must be True or False"),
        ({"devices": "cpu"}, r"'devices' must be a list"),
        ({"disable_passes": ["fold_everything"]}, r"unknown passes \['fold_everything'\]"),
    ],
)
def test_bad_options_name_the_key_and_accepted_values(options, message):
    with pytest.raises(ValueError, match=message):
        Config.from_options(options)


def test_config_is_frozen_and_hashable():
    cfg = Config(devices=["cpu", "cpu"])
    assert cfg.devices == ("cpu", "cpu")
    with pytest.raises(AttributeError):
        cfg.target = "llvm"
    assert hash(cfg) == hash(Config(devices=("cpu", "cpu")))


def test_describe_is_json_friendly():
    import json

    cfg = Config(calibration=[(1,), (2,)], disable_passes=("fold_constants",))
    described = cfg.describe()
    assert described["calibration"] == "2 batches"
    json.dumps(described)
