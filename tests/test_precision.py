"""Precision: mixed precision only where tensor cores make it pay, and models that still train in it."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from cifar_pipeline import train
from cifar_pipeline.models import build_model


@pytest.mark.parametrize("capabilities, expected", [
    ([], "float32"),                          # CPU only
    ([(8, 0)], "mixed_float16"),              # A100
    ([(9, 0), (9, 0)], "mixed_float16"),
    ([(6, 1)], "float32"),                    # Pascal: no tensor cores
    ([(8, 0), (6, 1)], "float32"),            # the slowest device sets the pace
])
def test_auto_precision_follows_the_visible_gpus(monkeypatch, capabilities, expected):
    fake = [f"/physical_device:GPU:{i}" for i in range(len(capabilities))]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: fake if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda device: {"compute_capability": capabilities[fake.index(device)]})
    assert train.compute_policy("auto") == expected
    assert train.compute_policy("float32") == "float32"


def test_unknown_precision():
    with pytest.raises(ValueError, match="unknown precision 'fp8'; allowed: auto, float32"):
        train.compute_policy("fp8")


def test_fast_net_trains_in_mixed_precision_with_float32_outputs():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
        model = build_model("fast", 10, [120.0] * 3, [60.0] * 3, sample_images=images)
        model.compile(keras.optimizers.SGD(0.01), "categorical_crossentropy")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        loss = model.train_on_batch(images, np.eye(10)[np.arange(16) % 10])
        assert np.isfinite(loss)
        assert model.get_layer("whiten").compute_dtype == "float16"
        assert model(images[:2]).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
