"""Scratch architectures: uint8 in, probabilities out, save and reload as .keras."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from cifar_pipeline.models import ARCHITECTURES, WHITENING_LAYER, PartialIdentity, ScaledBias, build_model


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


def test_whitening_stem_decorrelates_patches_and_stays_frozen(tmp_path):
    rng = np.random.default_rng(0)
    # Correlated channels and smooth neighbours, like natural images.
    base = rng.normal(size=(400, 33, 33, 1)).cumsum(axis=1).cumsum(axis=2)[:, :32, :32]
    images = np.clip(128 + 4 * np.concatenate([base, 0.8 * base + rng.normal(size=base.shape),
                                               0.5 * base + 3 * rng.normal(size=base.shape)], -1),
                     0, 255).astype(np.uint8)
    mean, std = images.mean(axis=(0, 1, 2)), images.std(axis=(0, 1, 2))
    model = build_model("fast", 10, mean, std, sample_images=images)
    stem = model.get_layer(WHITENING_LAYER)
    assert not stem.trainable and all(w is not stem.kernel for w in model.trainable_weights)
    features = keras.Model(model.input, stem.output).predict(images, verbose=0)
    half = features.shape[-1] // 2
    covariance = np.cov(features[..., :half].reshape(-1, half), rowvar=False)
    # Uncorrelated, and each direction's variance is eigenvalue / (eigenvalue + eps): 1 for all
    # but the faintest directions, never above 1.
    variances = np.diag(covariance)
    np.testing.assert_allclose(covariance - np.diag(variances), 0, atol=1e-4)
    assert variances.max() < 1.001 and np.sort(variances)[half // 2:].min() > 0.9
    np.testing.assert_allclose(features[..., half:], -features[..., :half], atol=1e-5)
    model.save(tmp_path / "fast.keras")
    reloaded = keras.models.load_model(tmp_path / "fast.keras")
    assert not reloaded.get_layer(WHITENING_LAYER).trainable
    np.testing.assert_allclose(reloaded.get_layer(WHITENING_LAYER).get_weights()[0], stem.get_weights()[0])


def test_scaled_bias_learns_scale_squared_faster_under_sgd():
    def bias_after_one_step(layer):
        x = np.zeros((4, 3), np.float32)
        layer(x)  # builds it
        optimizer = keras.optimizers.SGD(0.01)
        with tf.GradientTape() as tape:
            loss = keras.ops.sum(layer(x) * np.array([1.0, -2.0, 3.0], np.float32))
        optimizer.apply_gradients(zip(tape.gradient(loss, layer.trainable_weights), layer.trainable_weights))
        return layer(x).numpy()[0]

    plain = bias_after_one_step(keras.layers.Dense(3, kernel_initializer="zeros"))
    scaled = bias_after_one_step(ScaledBias(8.0))
    np.testing.assert_allclose(scaled, 64 * plain, rtol=1e-5)
    assert ScaledBias.from_config(ScaledBias(8.0).get_config()).scale == 8.0


@pytest.mark.parametrize("channels_in, channels_out", [(24, 64), (64, 32)])
def test_partial_identity_kernels_pass_the_first_channels_through(channels_in, channels_out):
    kernel = keras.ops.convert_to_numpy(PartialIdentity()((3, 3, channels_in, channels_out)))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, channels_in)).astype(np.float32)
    y = keras.ops.convert_to_numpy(keras.ops.conv(x, kernel, padding="same"))
    n = min(channels_in, channels_out)
    np.testing.assert_allclose(y[..., :n], x[..., :n], atol=1e-5)
    if channels_out > n:  # the other filters keep their random (Glorot) initialisation
        assert np.abs(kernel[..., n:]).std() > 0.01
