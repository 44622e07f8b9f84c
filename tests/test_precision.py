"""Precision: mixed precision only where tensor cores make it pay, and models that still train in it."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from cifar_pipeline import train
from cifar_pipeline.models import build_model


@pytest.mark.parametrize("capabilities, expected", [
    ([(8, 0)], "mixed_float16"),              # A100
    ([(9, 0), (9, 0)], "mixed_float16"),
    ([(6, 1)], "float32"),                    # Pascal: no tensor cores
    ([(8, 0), (6, 1)], "float32"),            # the slowest device sets the pace
])
def test_auto_precision_follows_the_visible_gpus(monkeypatch, capabilities, expected):
    # Even on a CPU with bfloat16 instructions, the GPUs decide.
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: True)
    fake = [f"/physical_device:GPU:{i}" for i in range(len(capabilities))]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: fake if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda device: {"compute_capability": capabilities[fake.index(device)]})
    assert train.compute_policy("auto") == expected
    assert train.compute_policy("float32") == "float32"


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse2 avx2 avx512f avx512_vnni avx512_bf16", "mixed_bfloat16"),  # AMD Zen 4/5, Intel Cooper Lake
    ("fpu sse2 avx2 avx512f amx_bf16 amx_tile", "mixed_bfloat16"),        # Intel Sapphire Rapids
    ("fpu sse2 avx2 avx512f avx512_vnni", "float32"),                      # AVX-512 without bfloat16
    ("fp asimd", "float32"),                                               # an ARM server
])
def test_auto_precision_on_a_cpu_alone_follows_its_bfloat16_instructions(monkeypatch, tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    real = train.cpu_has_bf16
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: real(cpuinfo))
    assert train.compute_policy("auto") == expected


def test_no_cpuinfo_means_no_bfloat16(tmp_path):
    assert train.cpu_has_bf16(tmp_path / "missing") is False


def test_unknown_precision():
    with pytest.raises(ValueError, match="unknown precision 'fp8'; allowed: auto, float32"):
        train.compute_policy("fp8")


@pytest.mark.parametrize("policy, half", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_fast_net_trains_in_mixed_precision_with_float32_outputs(policy, half):
    keras.mixed_precision.set_global_policy(policy)
    try:
        images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
        model = build_model("fast", 10, [120.0] * 3, [60.0] * 3, sample_images=images)
        model.compile(keras.optimizers.SGD(0.01), "categorical_crossentropy")
        # float16 needs loss scaling against underflow; bfloat16 has float32's range.
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (half == "float16")
        loss = model.train_on_batch(images, np.eye(10)[np.arange(16) % 10])
        assert np.isfinite(loss)
        assert model.get_layer("whiten").compute_dtype == half
        assert all(w.dtype == "float32" for w in model.trainable_weights)
        assert model(images[:2]).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
