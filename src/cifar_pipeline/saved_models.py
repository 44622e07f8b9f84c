"""Load any `.keras` model this package saves, whatever its custom layers.

Keras finds a registered class only if the module defining it was imported;
importing them all here means a stage or `cifar-predict` that loads a model
cannot miss one (a forest head, the fast net's layers, or the optimizer a model
was compiled with, in a fresh process).
"""
from __future__ import annotations

from pathlib import Path

import keras

from cifar_pipeline import backbones, forest, models, muon  # noqa: F401  each registers its custom objects


def load_model(path: str | Path) -> keras.Model:
    return keras.models.load_model(path)
