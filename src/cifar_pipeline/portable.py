"""A saved model rebuilt as a float32 graph of standard Keras layers, for exporters.

The `fast` net's CPU-speed layers (fast_layers.py) run an XLA-compiled GELU and a
`tf.compat.v1` fused BatchNorm, and a model trained in mixed precision computes in
bfloat16 or float16: ONNX and LiteRT converters reject all three (a function call,
`Erfc` in bfloat16, mixed float types). The same function in float32 with Keras'
own GELU and BatchNormalization converts everywhere. Layer names, the other
layers and all weights are kept; the maths is the same up to float32 rounding.

`float32_graph` keeps the layers and changes only the dtype policies: a model trained in mixed
precision computed in float32, the reference its standard rebuild must match (bfloat16's own
rounding flips near-tied classes, more of them the less sure the model is).
"""
from __future__ import annotations

import math

import keras
import numpy as np

from cifar_pipeline import fast_layers  # noqa: F401  registers the layers being replaced
from cifar_pipeline.saved_models import load_model  # noqa: F401  registers every other custom layer

_REPLACED = {"FusedGelu", "ShiftBatchNorm", "Normalization"}


@keras.saving.register_keras_serializable("cifar_pipeline")
class ErfGelu(keras.layers.Layer):
    """The exact GELU written with erf, 0.5 x (1 + erf(x / sqrt 2)): TensorFlow's own
    writes it with erfc, which has no ONNX operator."""

    def call(self, x):
        return 0.5 * x * (1.0 + keras.ops.erf(x * (1.0 / math.sqrt(2.0))))


def _standard(node, replace: bool):
    """The config `node` with every dtype policy float32 and, if `replace`, the fast layers replaced."""
    if isinstance(node, list):
        return [_standard(value, replace) for value in node]
    if not isinstance(node, dict):
        return node
    if node.get("class_name") == "DTypePolicy":
        return {**node, "config": {**node["config"], "name": "float32"}}
    kind = node.get("class_name")
    if replace and kind in _REPLACED and isinstance(node.get("config"), dict):
        base = {key: node["config"][key] for key in ("name", "trainable") if key in node["config"]}
        config = node["config"]
        if kind == "FusedGelu":
            layer = ErfGelu(**base)
        elif kind == "Normalization":
            # Its statistics are tensors the graph captures, which the ONNX converter takes for
            # missing inputs; as Rescaling's scale and offset they are constants in the graph.
            if config.get("invert") or config.get("mean") is None:
                raise ValueError(f"layer {config['name']}: only a Normalization with fixed statistics is supported")
            std = np.maximum(np.sqrt(np.asarray(config["variance"], np.float64)), keras.config.epsilon())
            mean = np.asarray(config["mean"], np.float64)
            layer = keras.layers.Rescaling(scale=(1.0 / std).tolist(), offset=(-mean / std).tolist(), **base)
        else:
            layer = keras.layers.BatchNormalization(center=True, scale=False, momentum=config["momentum"],
                                                    epsilon=config["epsilon"], **base)
        replaced = keras.saving.serialize_keras_object(layer)
        return {**replaced, **{key: node[key] for key in ("build_config", "inbound_nodes", "name")
                               if key in node}}
    return {key: _standard(value, replace) for key, value in node.items()}


def _layers(model: keras.Model, prefix: str = "") -> dict[str, keras.layers.Layer]:
    """Every layer inside `model`, nested models included, by path of names."""
    found = {}
    for layer in model.layers:
        found[prefix + layer.name] = layer
        if isinstance(layer, keras.Model):
            found.update(_layers(layer, f"{prefix}{layer.name}/"))
    return found


def computes_in_float32(model: keras.Model) -> bool:
    return all(layer.compute_dtype == "float32" for layer in _layers(model).values())


def standard_graph(model: keras.Model) -> keras.Model:
    """`model` as float32 standard layers with its weights (see the module's doc)."""
    return _rebuild(model, replace=True)


def float32_graph(model: keras.Model) -> keras.Model:
    """`model`'s own layers and weights with every dtype policy float32."""
    return _rebuild(model, replace=False)


def _rebuild(model: keras.Model, replace: bool) -> keras.Model:
    rebuilt = keras.Model.from_config(_standard(model.get_config(), replace))
    source, target = _layers(model), _layers(rebuilt)
    if set(source) != set(target):
        raise ValueError(f"the rebuilt model's layers differ: {sorted(set(source) ^ set(target))[:5]}")
    for path, layer in source.items():
        if isinstance(layer, keras.Model):
            continue  # its layers are copied one by one
        weights = [keras.ops.convert_to_numpy(w.value).astype("float32") for w in layer.weights]
        if replace and isinstance(layer, fast_layers.ShiftBatchNorm):
            # BatchNormalization(scale=False) holds beta, moving mean, moving variance in that order.
            stored_shift, mean, variance = weights
            weights = [layer.shift_scale * stored_shift, mean, variance]
        target[path].set_weights(weights)
    return rebuilt
