"""Load and validate `params.yaml` before any stage does work.

Every stage validates the whole file (not only its own section), so a typo
anywhere is caught by the first stage that runs, with a one-line message that
names the key, the value and what is allowed. The sections are pydantic models
(strict: no string for a number, no `true` for a count); `json_schema()` is the
JSON schema of the whole file, kept as `params.schema.json` for editors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cifar_pipeline.errors import PipelineError

ARCHITECTURES = ("fast", "vgg_mish", "gap_cnn", "resnet20", "small_cnn", "ann")
BACKBONES = (
    "efficientnet_lite0", "mobilenet_v2", "efficientnet_b0", "efficientnet_b1", "efficientnet_v2_b0",
    "resnet50", "resnet101_v2", "densenet121", "vgg16", "vgg19", "xception",
    "inception_resnet_v2",
)
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "mirrored", "multi_worker")  # distribute.make_strategy
FLIP_MODES = ("none", "random", "alternating")  # records.training_dataset
FIT_ON = ("train", "train+val")  # records.fit_splits; train.fit_on and finetune.fit_on
TTA_MODES = ("none", "flip", "flip_shift")
SCHEDULES = ("cosine", "plateau")  # train.learning_rate
OPTIMIZERS = ("sgd", "adamw", "muon")  # train.make_optimizer


class ParamsError(PipelineError, ValueError):
    """A value in params.yaml is missing, unknown, of the wrong type or out of range."""


def _range(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    bounds = {} if low is None else ({"gt": low} if low_open else {"ge": low})
    return Annotated[kind, Field(**bounds, **({} if high is None else {"le": high}))]


def _one_of(*values: str):
    return Literal[values]  # Literal["a", "b"] from a tuple of names


Seed = _range(int, 0, 2**31 - 1)
Precision = _one_of(*PRECISIONS)
Tta = _one_of(*TTA_MODES)


class Section(BaseModel):
    # strict: YAML's `true` is not a count, "0.1" is not a number; extra: a typo is an error.
    model_config = ConfigDict(extra="forbid", strict=True)


class Data(Section):
    dataset: Literal["cifar10", "cifar100"]
    label_mode: Literal["fine", "coarse"]
    url: str | None
    md5: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] | None
    val_fraction: _range(float, 0, 0.5, low_open=True)
    limit: _range(int, 20) | None
    test_limit: _range(int, 20) | None
    seed: Seed


class Fetch(Section):
    timeout_s: _range(float, 0, 3600, low_open=True)
    retries: _range(int, 0, 20)


class Augment(Section):
    copies: _range(int, 0, 10)
    flip: bool
    shift: _range(float, 0, 0.5)
    rotation_deg: _range(float, 0, 180)
    zoom: _range(float, 0, 0.5)
    shards: _range(int, 1, 1024)
    seed: Seed


class Train(Section):
    arch: _one_of(*ARCHITECTURES)
    fast_width: _range(int, 8, 1024)
    epochs: _range(int, 1, 1000)
    batch_size: _range(int, 1, 8192)
    optimizer: _one_of(*OPTIMIZERS)
    lr: _range(float, 0, 10, low_open=True)
    momentum: _range(float, 0, 0.999)
    weight_decay: _range(float, 0, 1)
    muon_lr: _range(float, 0, 10, low_open=True)
    muon_momentum: _range(float, 0, 0.999)
    lookahead: _range(float, 0, 0.999)
    label_smoothing: _range(float, 0, 0.5)
    schedule: _one_of(*SCHEDULES)
    warmup_epochs: _range(float, 0, 100)
    patience: _range(int, 1, 1000)
    online_flip: _one_of(*FLIP_MODES)
    online_shift_px: _range(int, 0, 8)
    online_cutout_px: _range(int, 0, 32)
    fit_on: _one_of(*FIT_ON)
    precision: Precision
    deterministic: bool
    strategy: _one_of(*STRATEGIES)
    seed: Seed


class Transfer(Section):
    backbone: _one_of(*BACKBONES)
    weights: str
    image_size: _range(int, 32, 600)
    mid_level_features: bool
    mirrored_train: bool
    batch_size: _range(int, 1, 4096)
    seed: Seed


class Head(Section):
    kind: Literal["dense", "logistic", "random_forest"]
    units: _range(int, 1, 8192)
    dropout: _range(float, 0, 0.9)
    label_smoothing: _range(float, 0, 0.5)
    lr: _range(float, 0, 10, low_open=True)
    weight_decay: _range(float, 0, 1)
    epochs: _range(int, 1, 10000)
    batch_size: _range(int, 1, 65536)
    schedule: _one_of(*SCHEDULES)
    patience: _range(int, 1, 1000)
    trees: _range(int, 1, 10000)
    min_samples_leaf: _range(int, 1, 100000)
    seed: Seed


class Finetune(Section):
    layers: _range(int, 1, 10000) | Literal["all"]
    depthwise: bool
    epochs: _range(int, 1, 1000)
    batch_size: _range(int, 1, 8192)
    lr: _range(float, 0, 10, low_open=True)
    warmup_epochs: _range(float, 0, 100)
    weight_decay: _range(float, 0, 1)
    label_smoothing: _range(float, 0, 0.5)
    online_shift_px: _range(int, 0, 8)
    online_cutout_px: _range(int, 0, 32)
    fit_on: _one_of(*FIT_ON)
    precision: Precision
    seed: Seed


class Evaluate(Section):
    batch_size: _range(int, 1, 65536)
    tta_scratch: Tta
    tta_head: Tta
    tta_transfer: Tta
    misclassified: _range(int, 0, 100)
    confused_pairs: _range(int, 0, 10000)


class Export(Section):
    onnx: bool
    litert: bool
    tolerance: _range(float, 0, 1, low_open=True)
    batch_size: _range(int, 1, 65536)


class Params(Section):
    data: Data
    fetch: Fetch
    augment: Augment
    train: Train
    transfer: Transfer
    head: Head
    finetune: Finetune
    evaluate: Evaluate
    export: Export


def json_schema() -> dict:
    """The JSON schema of params.yaml (params.schema.json; editors validate and complete with it)."""
    return Params.model_json_schema()


def _describe(schema: dict) -> str:
    """What a field's JSON schema allows, in words: 'an integer >= 1', 'one of a, b', ..."""
    if "anyOf" in schema:
        return " or ".join(_describe(option) for option in schema["anyOf"])
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return ("one of " if len(values) > 1 else "") + ", ".join(map(str, values))
    kind = schema.get("type")
    if kind in ("integer", "number"):
        parts = [f"{symbol} {schema[key]:g}" for key, symbol in
                 (("exclusiveMinimum", ">"), ("minimum", ">="), ("maximum", "<=")) if key in schema]
        return ("an integer" if kind == "integer" else "a number") + (" " + " and ".join(parts) if parts else "")
    if kind == "string":
        return f"a string matching {schema['pattern'].strip('^$')}" if "pattern" in schema else "a string"
    return {"boolean": "true or false", "null": "null"}.get(kind, str(kind))


def _field_schema(section: str, key: str) -> dict:
    schema = json_schema()
    name = schema["properties"][section]["$ref"].rsplit("/", 1)[-1]
    return schema["$defs"][name]["properties"][key]


def _message(error: dict, source: str) -> str:
    location = [str(part) for part in error["loc"]]
    if error["type"] == "extra_forbidden":
        if len(location) == 1:
            return f"{source}: unknown section {location[0]!r}; allowed: {', '.join(Params.model_fields)}"
        section_fields = Params.model_fields[location[0]].annotation.model_fields
        return f"{source}: unknown key {'.'.join(location[:2])}; allowed: {', '.join(section_fields)}"
    if len(location) == 1:
        return f"{source}: section {location[0]!r} is missing or not a mapping"
    section, key = location[:2]
    allowed = _describe(_field_schema(section, key))
    if error["type"] == "missing":
        return f"{source}: missing key {section}.{key} ({allowed})"
    return f"{source}: {section}.{key} = {error['input']!r} is invalid; allowed: {allowed}"


def validate(params: Any, source: str = "params.yaml") -> dict:
    """Return `params` unchanged if every section and key is known and valid."""
    if not isinstance(params, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(params).__name__}")
    try:
        Params.model_validate(params)
    except ValidationError as err:
        raise ParamsError(_message(err.errors()[0], source)) from None
    return params


def load(path: str | Path = "params.yaml") -> dict:
    """Read and validate the params file; raise ParamsError naming the bad key."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run the stages from the project root)") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return validate(params, str(path))


if __name__ == "__main__":  # python -m cifar_pipeline.params > params.schema.json
    import json

    print(json.dumps(json_schema(), indent=2))
