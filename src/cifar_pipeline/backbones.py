"""Frozen ImageNet backbones as uint8-in, feature-vector-out models.

The `keras.applications` backbones download their ImageNet weights on first
use; EfficientNet-Lite0 (src/cifar_pipeline/efficientnet_lite.py) reads them
from an installed package, so it works with no internet. Each backbone gets its
own ImageNet preprocessing, done by a registered layer inside the graph, so the
feature extractor (and any model built on it) takes raw uint8 images and saves
and loads as plain `.keras`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers, ops

from cifar_pipeline import efficientnet_lite
from cifar_pipeline.errors import PipelineError

# keras.applications' preprocess_input modes, as constants the layer can serialize.
_TORCH_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_TORCH_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="cifar_pipeline")
class ImageNetPreprocessing(layers.Layer):
    """What `keras.applications.*.preprocess_input` does, for inputs in 0-255.

    mode "tf": scale to [-1, 1]; "torch": scale to [0, 1] then ImageNet mean/std;
    "caffe": RGB to BGR then subtract the ImageNet mean; "none": pass through
    (EfficientNets normalise inside the backbone).
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("tf", "torch", "caffe", "none"):
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            return (x - ops.array(_TORCH_MEAN, x.dtype)) / ops.array(_TORCH_STD, x.dtype)
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.array(_CAFFE_MEAN_BGR, x.dtype)
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@dataclass(frozen=True)
class BackboneSpec:
    constructor: str  # attribute of keras.applications, or LITE0
    preprocessing: str
    min_size: int  # smallest input side keras.applications accepts
    # Layers whose globally pooled outputs `mid_level=True` adds to the final features.
    mid_level: tuple[str, ...] = ()


LITE0 = "efficientnet_lite0"
# The block outputs of EfficientNet-Lite0's last three stages: blocks 9-10 (112 channels),
# 12-14 (192) and 15 (320). With its head, 2,400 features. Pooling only each stage's end
# (blocks 10, 14, 15) gave 0.7 points less validation accuracy (160 px, 15,000 training images).
LITE0_MID_LEVEL = ("blocks_9_add", "blocks_10_add", "blocks_12_add", "blocks_13_add", "blocks_14_add",
                   "blocks_15_bn2")
BACKBONES = {
    LITE0: BackboneSpec(LITE0, "none", 32, LITE0_MID_LEVEL),  # scales its input itself
    "mobilenet_v2": BackboneSpec("MobileNetV2", "tf", 32),
    "efficientnet_b0": BackboneSpec("EfficientNetB0", "none", 32),
    "efficientnet_b1": BackboneSpec("EfficientNetB1", "none", 32),
    "efficientnet_v2_b0": BackboneSpec("EfficientNetV2B0", "none", 32),
    "resnet50": BackboneSpec("ResNet50", "caffe", 32),
    "resnet101_v2": BackboneSpec("ResNet101V2", "tf", 32),
    "densenet121": BackboneSpec("DenseNet121", "torch", 32),
    "vgg16": BackboneSpec("VGG16", "caffe", 32),
    "vgg19": BackboneSpec("VGG19", "caffe", 32),
    "xception": BackboneSpec("Xception", "tf", 71),
    "inception_resnet_v2": BackboneSpec("InceptionResNetV2", "tf", 75),
}


def resolve_weights(weights: str) -> str | None:
    """`imagenet` (Keras downloads and caches it; Lite0 reads it from its package), `none`
    (random init) or a weights file (for Lite0: a PyTorch state dict in the legacy format)."""
    if weights == "imagenet":
        return "imagenet"
    if weights == "none":
        return None
    if not Path(weights).is_file():
        raise FileNotFoundError(f"transfer.weights = {weights!r} is neither 'imagenet', 'none' "
                                "nor an existing weights file")
    return str(weights)


def build_feature_extractor(backbone: str, image_size: int, weights: str, mid_level: bool = False) -> keras.Model:
    """A frozen model mapping uint8 (32, 32, 3) images to pooled backbone features.

    `mid_level` appends the pooled outputs of the backbone's last stages before
    its head: CIFAR images upscaled from 32 px share more with ImageNet's
    mid-level patterns than with its object-level ones (EfficientNet-Lite0,
    96 px, dense head, validation split of the JPEG rebuild: 80.0% -> 83.0%).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}")
    spec = BACKBONES[backbone]
    if image_size < spec.min_size:
        raise PipelineError(f"transfer.image_size = {image_size} is too small for {backbone}; "
                         f"it needs at least {spec.min_size}")
    if spec.constructor == LITE0:
        net = _lite0(image_size, resolve_weights(weights))
    else:
        constructor = getattr(keras.applications, spec.constructor)
        net = constructor(include_top=False, weights=resolve_weights(weights),
                          input_shape=(image_size, image_size, 3), pooling="avg")
    if mid_level:
        if not spec.mid_level:
            raise PipelineError(f"transfer.mid_level_features is not available for {backbone}; "
                                f"backbones with it: {', '.join(b for b, v in BACKBONES.items() if v.mid_level)}")
        pooled = [layers.GlobalAveragePooling2D(name=f"pool_{name}")(net.get_layer(name).output)
                  for name in spec.mid_level]
        net = keras.Model(net.input, layers.Concatenate(name="mid_and_top")([*pooled, net.output]),
                          name=f"{net.name}_mid_level")
    net.trainable = False
    inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
    x = layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")(inputs)
    x = ImageNetPreprocessing(spec.preprocessing, name="imagenet_preprocessing")(x)
    return keras.Model(inputs, net(x, training=False), name=f"{backbone}_features")


def _lite0(image_size: int, weights: str | None) -> keras.Model:
    net = efficientnet_lite.efficientnet_lite0((image_size, image_size, 3), include_top=False, pooling="avg")
    if weights is not None:
        efficientnet_lite.load_imagenet_weights(net, None if weights == "imagenet" else weights)
    return net
