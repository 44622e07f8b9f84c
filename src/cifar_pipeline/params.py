"""Load and validate `params.yaml` before any stage does work.

Every stage validates the whole file (not only its own section), so a typo
anywhere is caught by the first stage that runs, with a one-line message that
names the key, the value and what is allowed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cifar_pipeline.errors import PipelineError

ARCHITECTURES = ("fast", "vgg_mish", "gap_cnn", "resnet20", "ann")
BACKBONES = (
    "efficientnet_lite0", "mobilenet_v2", "efficientnet_b0", "efficientnet_b1", "efficientnet_v2_b0",
    "resnet50", "resnet101_v2", "densenet121", "vgg16", "vgg19", "xception",
    "inception_resnet_v2",
)
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "mirrored", "multi_worker")  # distribute.make_strategy
FLIP_MODES = ("none", "random", "alternating")  # records.training_dataset
FIT_ON = ("train", "train+val")  # records.fit_splits
TTA_MODES = ("none", "flip", "flip_shift")
SCHEDULES = ("cosine", "plateau")  # train.learning_rate


class ParamsError(PipelineError, ValueError):
    """A value in params.yaml is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class Spec:
    """What one key accepts. `kind` is int, float, bool, str or choice; `choices` of another
    kind are words accepted besides its values (finetune.layers: a count or `all`)."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the value must be strictly greater than `low`
    choices: tuple = ()
    nullable: bool = False
    pattern: str | None = None

    def describe(self) -> str:
        if self.kind == "choice":
            allowed = "one of " + ", ".join(map(str, self.choices))
        elif self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            parts = []
            if self.low is not None:
                parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
            if self.high is not None:
                parts.append(f"<= {self.high:g}")
            allowed = noun + (" " + " and ".join(parts) if parts else "")
            allowed += "".join(f" or {choice}" for choice in self.choices)
        elif self.kind == "str" and self.pattern:
            allowed = f"a string matching {self.pattern}"
        else:
            allowed = {"bool": "true or false", "str": "a string"}[self.kind]
        return allowed + (" or null" if self.nullable else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.kind == "choice" or value in self.choices:
            return value in self.choices
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str) and (self.pattern is None or re.fullmatch(self.pattern, value) is not None)
        # YAML reads `true` as bool, a subclass of int: never let it pass as a number.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


def _int(low=None, high=None, **kw):
    return Spec("int", low=low, high=high, **kw)


def _float(low=None, high=None, **kw):
    return Spec("float", low=low, high=high, **kw)


def _choice(*choices):
    return Spec("choice", choices=choices)


SEED = _int(0, 2**31 - 1)

SCHEMA: dict[str, dict[str, Spec]] = {
    "data": {
        "dataset": _choice("cifar10", "cifar100"),
        "label_mode": _choice("fine", "coarse"),
        "url": Spec("str", nullable=True),
        "md5": Spec("str", nullable=True, pattern=r"[0-9a-f]{32}"),
        "val_fraction": _float(0, 0.5, low_open=True),
        "limit": _int(20, nullable=True),
        "seed": SEED,
    },
    "fetch": {
        "timeout_s": _float(0, 3600, low_open=True),
        "retries": _int(0, 20),
    },
    "augment": {
        "copies": _int(0, 10),
        "flip": Spec("bool"),
        "shift": _float(0, 0.5),
        "rotation_deg": _float(0, 180),
        "zoom": _float(0, 0.5),
        "shards": _int(1, 1024),
        "seed": SEED,
    },
    "train": {
        "arch": _choice(*ARCHITECTURES),
        "fast_width": _int(8, 1024),
        "epochs": _int(1, 1000),
        "batch_size": _int(1, 8192),
        "optimizer": _choice("sgd", "adamw"),
        "lr": _float(0, 10, low_open=True),
        "momentum": _float(0, 0.999),
        "weight_decay": _float(0, 1),
        "label_smoothing": _float(0, 0.5),
        "schedule": _choice(*SCHEDULES),
        "warmup_epochs": _float(0, 100),
        "patience": _int(1, 1000),
        "online_flip": _choice(*FLIP_MODES),
        "online_shift_px": _int(0, 8),
        "online_cutout_px": _int(0, 32),
        "fit_on": _choice(*FIT_ON),
        "precision": _choice(*PRECISIONS),
        "deterministic": Spec("bool"),
        "strategy": _choice(*STRATEGIES),
        "seed": SEED,
    },
    "transfer": {
        "backbone": _choice(*BACKBONES),
        "weights": Spec("str"),
        "image_size": _int(32, 600),
        "mid_level_features": Spec("bool"),
        "mirrored_train": Spec("bool"),
        "batch_size": _int(1, 4096),
        "seed": SEED,
    },
    "head": {
        "kind": _choice("dense", "logistic", "random_forest"),
        "units": _int(1, 8192),
        "dropout": _float(0, 0.9),
        "label_smoothing": _float(0, 0.5),
        "lr": _float(0, 10, low_open=True),
        "weight_decay": _float(0, 1),
        "epochs": _int(1, 10000),
        "batch_size": _int(1, 65536),
        "schedule": _choice(*SCHEDULES),
        "patience": _int(1, 1000),
        "trees": _int(1, 10000),
        "min_samples_leaf": _int(1, 100000),
        "seed": SEED,
    },
    "finetune": {
        "layers": _int(1, 10000, choices=("all",)),
        "epochs": _int(1, 1000),
        "batch_size": _int(1, 8192),
        "lr": _float(0, 10, low_open=True),
        "warmup_epochs": _float(0, 100),
        "weight_decay": _float(0, 1),
        "label_smoothing": _float(0, 0.5),
        "online_shift_px": _int(0, 8),
        "precision": _choice(*PRECISIONS),
        "seed": SEED,
    },
    "evaluate": {
        "batch_size": _int(1, 65536),
        "tta_scratch": _choice(*TTA_MODES),
        "tta_head": _choice(*TTA_MODES),
        "tta_transfer": _choice(*TTA_MODES),
        "misclassified": _int(0, 100),
        "confused_pairs": _int(0, 10000),
    },
}


def validate(params: Any, source: str = "params.yaml") -> dict:
    """Return `params` unchanged if every section and key is known and valid."""
    if not isinstance(params, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(params).__name__}")
    for section in params:
        if section not in SCHEMA:
            raise ParamsError(f"{source}: unknown section {section!r}; allowed: {', '.join(SCHEMA)}")
    for section, specs in SCHEMA.items():
        values = params.get(section)
        if not isinstance(values, dict):
            raise ParamsError(f"{source}: section {section!r} is missing or not a mapping")
        for key in values:
            if key not in specs:
                raise ParamsError(
                    f"{source}: unknown key {section}.{key}; allowed: {', '.join(specs)}")
        for key, spec in specs.items():
            if key not in values:
                raise ParamsError(f"{source}: missing key {section}.{key} ({spec.describe()})")
            if not spec.accepts(values[key]):
                raise ParamsError(
                    f"{source}: {section}.{key} = {values[key]!r} is invalid; allowed: {spec.describe()}")
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
