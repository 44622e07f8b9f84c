"""params.yaml validation: every bad value stops a stage with a message naming the key."""
import copy
from pathlib import Path

import pytest
import yaml

from cifar_pipeline import params

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def good():
    return yaml.safe_load((PROJECT / "params.yaml").read_text())


def test_committed_params_are_valid(good):
    assert params.validate(good) is good


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "lr", -0.1, "train.lr = -0.1 is invalid; allowed: a number > 0"),
    ("train", "lr", "fast", "train.lr = 'fast' is invalid"),
    ("train", "epochs", 2.5, "train.epochs = 2.5 is invalid; allowed: an integer >= 1"),
    ("train", "epochs", True, "train.epochs = True is invalid"),
    ("train", "arch", "resnet9000", "train.arch = 'resnet9000' is invalid; allowed: one of fast, vgg_mish"),
    ("transfer", "backbone", "alexnet",
     "transfer.backbone = 'alexnet' is invalid; allowed: one of efficientnet_lite0, mobilenet_v2"),
    ("data", "dataset", "mnist", "data.dataset = 'mnist' is invalid; allowed: one of cifar10, cifar100"),
    ("data", "md5", "xyz", "data.md5 = 'xyz' is invalid; allowed: a string matching [0-9a-f]{32} or null"),
    ("augment", "flip", "yes", "augment.flip = 'yes' is invalid; allowed: true or false"),
    ("data", "val_fraction", 0.0, "data.val_fraction = 0.0 is invalid; allowed: a number > 0 and <= 0.5"),
    ("data", "limit", 5, "data.limit = 5 is invalid; allowed: an integer >= 20 or null"),
    ("finetune", "layers", "most", "finetune.layers = 'most' is invalid; allowed: an integer >= 1 and <= 10000 or all"),
    ("train", "lr", "0.1", "train.lr = '0.1' is invalid; allowed: a number > 0"),
])
def test_bad_values_name_key_value_and_allowed(good, section, key, value, message):
    bad = copy.deepcopy(good)
    bad[section][key] = value
    with pytest.raises(params.ParamsError, match=None) as err:
        params.validate(bad)
    assert message in str(err.value)


def test_unknown_and_missing_keys(good):
    typo = copy.deepcopy(good)
    typo["train"]["learning_rate"] = 0.1
    with pytest.raises(params.ParamsError, match="unknown key train.learning_rate; allowed: arch"):
        params.validate(typo)
    missing = copy.deepcopy(good)
    del missing["head"]["lr"]
    with pytest.raises(params.ParamsError, match=r"missing key head.lr \(a number > 0 and <= 10\)"):
        params.validate(missing)
    extra = copy.deepcopy(good)
    extra["optimizer"] = {}
    with pytest.raises(params.ParamsError, match="unknown section 'optimizer'"):
        params.validate(extra)


def test_load_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(params.ParamsError, match="not found"):
        params.load(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(params.ParamsError, match="not valid YAML"):
        params.load(tmp_path / "params.yaml")


def test_the_committed_json_schema_is_the_current_one():
    """params.schema.json is made by `python -m cifar_pipeline.params > params.schema.json`."""
    import json

    assert json.loads((PROJECT / "params.schema.json").read_text()) == params.json_schema()


def test_allowed_names_match_the_registries():
    from cifar_pipeline.backbones import BACKBONES
    from cifar_pipeline.models import ARCHITECTURES

    assert set(params.ARCHITECTURES) == set(ARCHITECTURES)
    assert set(params.BACKBONES) == set(BACKBONES)
