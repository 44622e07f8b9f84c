"""Scratch architectures: uint8 in, probabilities out, save and reload as .keras."""
import keras
import numpy as np
import pytest

from cifar_pipeline.models import ARCHITECTURES, build_model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_preset_classifies_raw_uint8_images_and_round_trips(arch, tmp_path):
    model = build_model(arch, 7, mean=[120.0, 115.0, 100.0], std=[60.0, 62.0, 65.0])
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    probs = model.predict(images, verbose=0)
    assert probs.shape == (3, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "m.keras").predict(images, verbose=0),
                               probs, atol=1e-6)


def test_normalisation_uses_the_given_statistics():
    model = build_model("ann", 10, mean=[10.0, 20.0, 30.0], std=[2.0, 4.0, 5.0])
    x = np.zeros((1, 32, 32, 3), np.uint8)
    x[..., 0], x[..., 1], x[..., 2] = 12, 24, 35
    normalized = model.get_layer("normalize")(x).numpy()
    np.testing.assert_allclose(normalized[0, 0, 0], [1.0, 1.0, 1.0], rtol=1e-6)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'lenet'; allowed: fast"):
        build_model("lenet", 10, [0, 0, 0], [1, 1, 1])
