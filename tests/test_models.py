"""Scratch architectures: uint8 in, probabilities out, save and reload as .keras."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from cifar_pipeline.fast_layers import FusedGelu, PartialIdentity, ShiftBatchNorm
from cifar_pipeline.models import ARCHITECTURES, WHITENING_LAYER, build_model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_preset_classifies_raw_uint8_images_and_round_trips(arch, tmp_path):
    model = build_model(arch, 7, mean=[120.0, 115.0, 100.0], std=[60.0, 62.0, 65.0])
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    probs = model.predict(images, verbose=0)
    assert probs.shape == (3, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "m.keras").predict(images, verbose=0),
                               probs, atol=1e-6)


def test_fast_width_sets_the_channels_of_the_three_stages():
    def stage_filters(**width):
        model = build_model("fast", 10, [120.0] * 3, [60.0] * 3, **width)
        return [layer.filters for layer in model.layers
                if isinstance(layer, keras.layers.Conv2D) and layer.name != WHITENING_LAYER]

    assert stage_filters(fast_width=16) == [16, 16, 64, 64, 64, 64]
    assert stage_filters() == [64, 64, 256, 256, 256, 256]


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


def test_shift_batchnorm_matches_keras_batchnorm_plus_a_bias_in_training_and_inference():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(8, 4, 4, 5)).astype(np.float32)
    shift = np.linspace(-1, 1, 5).astype(np.float32)
    fused = ShiftBatchNorm(shift_scale=8.0, momentum=0.6, epsilon=1e-5)
    reference = keras.layers.BatchNormalization(momentum=0.6, epsilon=1e-5, scale=False)
    fused.build(x.shape)
    reference.build(x.shape)
    fused.stored_shift.assign(shift / 8.0)
    reference.beta.assign(shift)
    for _ in range(3):  # moving statistics after several updates
        np.testing.assert_allclose(fused(x, training=True), reference(x, training=True), atol=1e-4)
    np.testing.assert_allclose(fused.moving_mean.numpy(), reference.moving_mean.numpy(), rtol=1e-5)
    # The fused kernel's running variance uses the unbiased batch variance (n / (n - 1), n = 128).
    np.testing.assert_allclose(fused.moving_variance.numpy(), reference.moving_variance.numpy(), rtol=2e-2)
    np.testing.assert_allclose(fused(x, training=False), reference(x, training=False), atol=2e-2)


def test_shift_batchnorm_shift_learns_scale_squared_faster_under_sgd():
    x = np.random.default_rng(1).normal(size=(16, 2, 2, 3)).astype(np.float32)

    def shift_after_one_step(layer, variable_name, stored_scale):
        layer(x, training=True)  # builds it
        variable = getattr(layer, variable_name)
        with tf.GradientTape() as tape:
            loss = keras.ops.sum(layer(x, training=True) * np.array([1.0, -2.0, 3.0], np.float32))
        keras.optimizers.SGD(0.01).apply_gradients([(tape.gradient(loss, variable), variable)])
        return stored_scale * variable.numpy()

    plain = shift_after_one_step(keras.layers.BatchNormalization(scale=False), "beta", 1.0)
    fused = shift_after_one_step(ShiftBatchNorm(shift_scale=8.0), "stored_shift", 8.0)
    assert np.abs(plain).min() > 0
    np.testing.assert_allclose(fused, 64 * plain, rtol=1e-5)
    config = ShiftBatchNorm.from_config(ShiftBatchNorm(8.0, momentum=0.6, epsilon=1e-5).get_config()).get_config()
    assert (config["shift_scale"], config["momentum"], config["epsilon"]) == (8.0, 0.6, 1e-5)


def test_fused_gelu_matches_keras_exact_gelu_and_its_gradient():
    x = tf.constant(np.linspace(-5, 5, 101, dtype=np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        fused, reference = FusedGelu()(x), keras.activations.gelu(x, approximate=False)
    np.testing.assert_allclose(fused, reference, atol=1e-6)
    np.testing.assert_allclose(tape.gradient(fused, x), tape.gradient(reference, x), atol=1e-5)


@pytest.mark.parametrize("channels_in, channels_out", [(24, 64), (64, 32)])
def test_partial_identity_kernels_pass_the_first_channels_through(channels_in, channels_out):
    kernel = keras.ops.convert_to_numpy(PartialIdentity()((3, 3, channels_in, channels_out)))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, channels_in)).astype(np.float32)
    y = keras.ops.convert_to_numpy(keras.ops.conv(x, kernel, padding="same"))
    n = min(channels_in, channels_out)
    np.testing.assert_allclose(y[..., :n], x[..., :n], atol=1e-5)
    if channels_out > n:  # the other filters keep their random (Glorot) initialisation
        assert np.abs(kernel[..., n:]).std() > 0.01
