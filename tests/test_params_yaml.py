"""training_params.yaml: params_yaml_text writes the one-word scalar lines itself and the rest through PyYAML; the
text must equal PyYAML's dump of the whole mapping, whatever the values."""
from __future__ import annotations

import enum
import random

import numpy as np
import pytest
import yaml

from super_trainer.params import resolve_training_params
from super_trainer.params_yaml import _DUMPER, _plain, params_yaml_text


def _pyyaml(params):
    return yaml.dump(_plain(dict(params)), Dumper=_DUMPER, sort_keys=False, allow_unicode=True)


class Mode(enum.Enum):
    FAST = "fast"


WORDS = ["SGD", "CrossEntropyLoss", "cosine", "ckpt_latest.pth", "a-b", "v1.2.3", "x.", "a..b", "_-", "e.g.", "a.yes", "_private", "x1", "Accuracy", "yes", "No", "ON", "off", "True", "FALSE",
         "null", "Null", "y", "n", "Y", "N", "~", "", " lead", "trail ", "a b", "a: b", "#hash", "1e5", "0x1F", "0o17",
         "12:30", "2026-12-03", ".inf", ".nan", "-", "é", "a" * 99, "a" * 100, "b" * 200, "two\nlines", "tab\there",
         "quote'd", 'double"d', "[list]", "{map}", "*star", "&amp", "!bang", "%pct", "@at", "`tick", "=", "<<"]
FLOATS = [0.0, -0.0, 0.1, 1.0, 1e-05, 1e16, 1e17, 1.5e300, 5e-324, 123456789.123, -2.5, float("inf"), float("-inf"),
          float("nan")]
INTS = [0, 1, -1, 10 ** 30, -(2 ** 70)]
OTHERS = [None, True, False, [], {}, [1, "a", None], {"nested": {"deep": [0.5, "yes"]}}, (1, 2), Mode.FAST,
          np.float32(0.25), np.int64(7), object, ["Accuracy", "F1"], ["yes", 1], [[1]], [{}], {"momentum": 0.9},
          {"a": 1, "on": 2}, {"a": "b c"}, {"a": []}, {"a": {}}, [1.0, float("nan"), -0.0]]


def test_resolved_default_params_are_written_as_pyyaml_writes_them():
    params = resolve_training_params({"max_epochs": 3, "initial_lr": {"backbone": 0.01, "default": 0.1},
                                      "loss": "CrossEntropyLoss", "lr_mode": "cosine", "lr_warmup_epochs": 1,
                                      "optimizer_params": {"momentum": 0.9, "weight_decay": 1e-4}})
    text = params_yaml_text(params)
    assert text == _pyyaml(params)
    assert yaml.safe_load(text)["optimizer_params"] == {"momentum": 0.9, "weight_decay": 1e-4}


@pytest.mark.parametrize("seed", range(20))
def test_any_mix_of_values_and_keys_is_written_as_pyyaml_writes_it(seed):
    rng = random.Random(seed)
    values = WORDS + FLOATS + INTS + OTHERS
    keys = [w for w in WORDS if w] + ["max_epochs", "lr", "k" * 150, "with space", 3]
    params = {rng.choice(keys): rng.choice(values) for _ in range(60)}
    text = params_yaml_text(params)
    assert text == _pyyaml(params)
    loaded = yaml.safe_load(text)
    for key, value in _plain(params).items():
        if "nan" not in repr(value):  # NaN != NaN
            assert loaded[key] == value, (key, value)


def test_an_empty_mapping():
    assert params_yaml_text({}) == _pyyaml({}) == "{}\n"


def test_numpy_scalars_are_written_as_the_numbers_they_hold(tmp_path):
    """np.float32 and np.int64 are no float/int subclasses: written as their values, not as a repr or a type name
    (in the YAML and in the checkpoint's record a resume compares)."""
    from super_trainer.loop.resume import plain_params

    params = {"lr": np.float32(0.25), "epochs": np.int64(7), "flag": np.bool_(True), "name": np.str_("x"),
              "zero_d": np.array(1.5), "vector": np.array([1.0, 2.0])}
    loaded = yaml.safe_load(params_yaml_text(params))
    assert {k: loaded[k] for k in ("lr", "epochs", "flag", "name", "zero_d")} == {
        "lr": 0.25, "epochs": 7, "flag": True, "name": "x", "zero_d": 1.5}
    assert isinstance(loaded["vector"], str)  # an array is an object: its repr
    record = plain_params(params)
    assert [type(record[k]) for k in ("lr", "epochs", "flag", "name", "zero_d")] == [float, int, bool, str, float]
    assert record["vector"] == "<ndarray>"
