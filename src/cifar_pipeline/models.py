"""Scratch CNN architectures: `build_model(arch, ...)` returns an uncompiled keras.Model.

Every model takes raw uint8 RGB images of shape (32, 32, 3), normalises them
inside the graph with the training split's channel statistics, and ends in a
float32 softmax, so a saved model classifies images with no extra code.
"""
from __future__ import annotations

from typing import Callable

import keras
import numpy as np
from keras import layers

from cifar_pipeline.fast_layers import FusedGelu, PartialIdentity, ShiftBatchNorm

WHITENING_LAYER = "whiten"
PATCH_FEATURES = 2 * 2 * 3


def _normalized_input(mean, std):
    inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
    # Rescaling casts the uint8 input to float and applies (x - mean) / std per channel.
    x = layers.Rescaling(scale=[1.0 / s for s in std], offset=[-m / s for m, s in zip(mean, std)],
                         name="normalize")(inputs)
    return inputs, x


def _classifier(x, num_classes: int, use_bias: bool = True, logit_scale: float | None = None):
    x = layers.Dense(num_classes, use_bias=use_bias, name="logits")(x)
    if logit_scale is not None:
        x = layers.Rescaling(logit_scale, name="logit_scale")(x)
    # float32 even under mixed precision, so probabilities and the loss stay accurate.
    return layers.Activation("softmax", dtype="float32", name="probabilities")(x)


def _conv_bn_act(x, filters, activation="relu", kernel_size=3, regularizer=None):
    x = layers.Conv2D(filters, kernel_size, padding="same", use_bias=False, kernel_regularizer=regularizer)(x)
    x = layers.BatchNormalization()(x)
    return layers.Activation(activation)(x)


# airbench94's settings for its net, written anew in Keras.
FAST_WIDTH = 64  # channels of the first stage; the second and third have 4x as many (64/256/256)
SHIFT_LR_SCALE = 8.0  # BatchNorm shifts learn 8**2 = 64x faster than the conv weights
LOGIT_SCALE = 1 / 9  # small logits: the linear head learns slowly and softmax starts near uniform


def _fast_batchnorm(x):
    # Fast-moving statistics suit short schedules.
    return ShiftBatchNorm(SHIFT_LR_SCALE, momentum=0.6, epsilon=1e-5)(x)


def _gelu(x):
    # airbench's GELU. With Keras' unfused GELU a ReLU step was 30% faster here, yet 26 ReLU
    # epochs reached 90.20% validation accuracy against 90.78% for 20 GELU epochs in about
    # the same time (2,035 s vs 2,117 s); fused, GELU costs little more than ReLU.
    return FusedGelu()(x)


def _fast(x, num_classes, width: int):
    """An airbench-style net: a 2x2 patch-whitening stem, three conv stages of `width`,
    4 * `width` and 4 * `width` channels with early max-pooling, global max pool, a
    bias-free linear head with small logits."""
    x = layers.Conv2D(2 * PATCH_FEATURES, 2, padding="valid", use_bias=False, name=WHITENING_LAYER)(x)
    x = _gelu(x)
    for filters in (width, 4 * width, 4 * width):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=PartialIdentity())(x)
        x = layers.MaxPooling2D(padding="same")(x)
        x = _gelu(_fast_batchnorm(x))
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=PartialIdentity())(x)
        x = _gelu(_fast_batchnorm(x))
    x = layers.GlobalMaxPooling2D()(x)
    return _classifier(x, num_classes, use_bias=False, logit_scale=LOGIT_SCALE)


def patch_whitening_kernel(images: np.ndarray, mean, std, eps: float = 5e-4) -> np.ndarray:
    """A 2x2 conv kernel that whitens the 2x2x3 patches of normalised `images`.

    Each eigenvector of the patch covariance, scaled by 1/sqrt(eigenvalue), is a
    filter, once with each sign so the activation after it keeps both halves. The net
    then starts from decorrelated inputs instead of learning that first.
    """
    x = (np.asarray(images, np.float32) - np.float32(mean)) / np.float32(std)
    # (N, 31, 31, 3, 2, 2) windows -> rows ordered (row, col, channel) like a Keras kernel.
    windows = np.lib.stride_tricks.sliding_window_view(x, (2, 2), axis=(1, 2))
    patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, PATCH_FEATURES).astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(patches, rowvar=False))
    filters = eigenvectors / np.sqrt(eigenvalues + eps)
    kernel = np.concatenate([filters, -filters], axis=1).reshape(2, 2, 3, 2 * PATCH_FEATURES)
    return kernel.astype(np.float32)


def _vgg_mish(x, num_classes):
    """The notebooks' VGG-style CNN: Mish, BatchNorm, L2 1e-3, rising dropout, Dense 128."""
    l2 = keras.regularizers.L2(1e-3)
    for filters, dropout in ((32, 0.2), (64, 0.3), (128, 0.4)):
        repeats = 1 if filters == 128 else 2
        for _ in range(repeats):
            x = _conv_bn_act(x, filters, "mish", regularizer=l2)
        x = layers.MaxPooling2D()(x)
        x = layers.Dropout(dropout)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="mish", kernel_regularizer=l2)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Dropout(0.5)(x)
    return _classifier(x, num_classes)


def _gap_cnn(x, num_classes):
    """The notebooks' global-average-pooling CNN: 32-32-64-128-128-128 filters, Dense 128."""
    for i, filters in enumerate((32, 32, 64, 128, 128, 128)):
        x = _conv_bn_act(x, filters)
        if i in (1, 3, 5):
            x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    return _classifier(x, num_classes)


def _resnet20(x, num_classes):
    """ResNet-20 (He et al. 2016, CIFAR variant): 3 stages of 3 basic blocks, 16/32/64 filters."""
    x = _conv_bn_act(x, 16)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
            y = layers.Activation("relu")(layers.BatchNormalization()(y))
            y = layers.BatchNormalization()(layers.Conv2D(filters, 3, padding="same", use_bias=False)(y))
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False)(shortcut)
                shortcut = layers.BatchNormalization()(shortcut)
            x = layers.Activation("relu")(layers.Add()([y, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    return _classifier(x, num_classes)


def _small_cnn(x, num_classes):
    """The notebooks' first CNN: two plain 3x3 convolutions (32, 64; no padding, no BatchNorm),
    each followed by 2x2 max pooling, then Dense 128 with dropout 0.5."""
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    return _classifier(x, num_classes)


def _ann(x, num_classes):
    """A plain dense network: the baseline every notebook starts from."""
    x = layers.Flatten()(x)
    for units in (512, 256, 128):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.Dropout(0.2)(x)
    return _classifier(x, num_classes)


# Nets with a conv that no BatchNorm follows: muon.ConvMuon's kernel rescale would change what they compute.
CONVS_WITHOUT_BATCHNORM = ("small_cnn",)

ARCHITECTURES: dict[str, Callable] = {
    "fast": _fast,
    "vgg_mish": _vgg_mish,
    "gap_cnn": _gap_cnn,
    "resnet20": _resnet20,
    "small_cnn": _small_cnn,
    "ann": _ann,
}


def build_model(arch: str, num_classes: int, mean, std, sample_images: np.ndarray | None = None,
                fast_width: int = FAST_WIDTH) -> keras.Model:
    """An uncompiled model of architecture `arch` for uint8 32x32 RGB input.

    `sample_images` (uint8, a few thousand training images) initialise the
    patch-whitening stem of architectures that have one, which then stays
    frozen; without them that stem is an ordinary trainable conv. `fast_width`
    sets the channels of the `fast` net's first stage (the others have 4x).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
    inputs, x = _normalized_input(mean, std)
    body = ARCHITECTURES[arch]
    outputs = body(x, num_classes, width=fast_width) if body is _fast else body(x, num_classes)
    model = keras.Model(inputs, outputs, name=arch)
    stem = next((layer for layer in model.layers if layer.name == WHITENING_LAYER), None)
    if stem is not None and sample_images is not None:
        stem.set_weights([patch_whitening_kernel(sample_images, mean, std)])
        stem.trainable = False
    return model
