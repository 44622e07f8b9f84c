"""ConvMuon: conv filters step by Muon (orthogonalised Nesterov momentum after a norm rescale);
every other variable exactly as Keras' Nesterov SGD with weight decay."""
import keras
import numpy as np
import pytest

from cifar_pipeline.muon import ConvMuon, orthogonalise
from cifar_pipeline.train import make_optimizer


def _step(optimizer, variable, gradient):
    optimizer.apply_gradients([(keras.ops.convert_to_tensor(gradient), variable)])
    return keras.ops.convert_to_numpy(variable)


@pytest.mark.parametrize("shape", [(64, 216), (216, 64)])
def test_orthogonalise_sends_every_singular_value_near_one_and_keeps_the_singular_vectors(shape):
    matrix = np.random.default_rng(0).normal(size=shape).astype("float32")
    result = keras.ops.convert_to_numpy(orthogonalise(keras.ops.convert_to_tensor(matrix), steps=5))
    singular = np.linalg.svd(result, compute_uv=False)
    assert singular.min() > 0.5 and singular.max() < 1.5  # Muon's quintic iteration ends near, not at, 1
    u, _, vt = np.linalg.svd(matrix, full_matrices=False)
    # Same singular vectors as the input: projecting onto them leaves a diagonal matrix.
    projected = u.T @ result @ vt.T
    assert np.abs(projected - np.diag(np.diag(projected))).max() < 1e-3


def test_a_filter_is_rescaled_then_stepped_along_the_orthogonalised_nesterov_gradient():
    rng = np.random.default_rng(1)
    kernel = keras.Variable(rng.normal(size=(3, 3, 8, 16)).astype("float32") * 5)
    first, second = rng.normal(size=(2, 3, 3, 8, 16)).astype("float32")
    lr, scale, momentum = 0.01, 3.0, 0.5
    # Weight decay too: the rescale must undo it on filters.
    optimizer = ConvMuon(lr, filter_lr_scale=scale, filter_momentum=momentum, ns_steps=5, weight_decay=0.5)
    _step(optimizer, kernel, first)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(optimizer.filter_buffers[0]), first, rtol=1e-6)
    before = keras.ops.convert_to_numpy(kernel)
    after = _step(optimizer, kernel, second)
    buffer = momentum * first + second
    np.testing.assert_allclose(keras.ops.convert_to_numpy(optimizer.filter_buffers[0]), buffer, rtol=1e-5)
    rescaled = before * np.sqrt(16) / np.linalg.norm(before)  # every filter of unit norm on average
    step = (rescaled - after).reshape(-1, 16) / (lr * scale)
    nesterov = (second + momentum * buffer).reshape(-1, 16)
    np.testing.assert_allclose(step, keras.ops.convert_to_numpy(orthogonalise(nesterov, 5)), atol=1e-4)
    assert np.linalg.norm(after) == pytest.approx(4.0, rel=0.02)  # a small step from sqrt(16)


def test_variables_other_than_filters_step_exactly_as_keras_nesterov_sgd_with_weight_decay():
    rng = np.random.default_rng(2)
    start = rng.normal(size=(32, 10)).astype("float32")
    gradients = rng.normal(size=(3, 32, 10)).astype("float32")
    schedule = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=5)
    ours = make_optimizer("muon", schedule, 0.85, 0.01, muon_lr_scale=2.0, muon_momentum=0.6)
    keras_sgd = make_optimizer("sgd", schedule, 0.85, 0.01)
    dense_ours, dense_keras = keras.Variable(start), keras.Variable(start)
    for gradient in gradients:
        _step(ours, dense_ours, gradient)
        _step(keras_sgd, dense_keras, gradient)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(dense_ours), keras.ops.convert_to_numpy(dense_keras),
                               rtol=1e-6, atol=1e-7)
    assert not np.allclose(keras.ops.convert_to_numpy(dense_ours), start)


def test_a_model_compiled_with_it_trains_and_saves_and_loads(tmp_path):
    from cifar_pipeline import saved_models

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 256)
    images = rng.normal(size=(256, 8, 8, 3)).astype("float32") + labels[:, None, None, None]
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    model.compile(ConvMuon(0.05, filter_lr_scale=0.5), "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(images, labels, epochs=3, batch_size=32, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0] and history.history["accuracy"][-1] > 0.9
    model.save(tmp_path / "muon.keras")
    loaded = saved_models.load_model(tmp_path / "muon.keras")
    assert isinstance(loaded.optimizer, ConvMuon) and loaded.optimizer.filter_lr_scale == 0.5
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)


def test_each_variable_has_exactly_one_momentum_slot():
    kernel, bias = keras.Variable(np.ones((3, 3, 2, 4), "float32")), keras.Variable(np.ones(4, "float32"))
    optimizer = ConvMuon(0.1, filter_lr_scale=1.0)
    optimizer.build([kernel, bias])
    slots = [v for v in optimizer.variables if tuple(v.shape) in {(3, 3, 2, 4), (4,)}]
    assert sorted(tuple(v.shape) for v in slots) == [(3, 3, 2, 4), (4,)]


def test_a_net_with_convs_that_no_batchnorm_follows_is_refused_before_any_work(tmp_path):
    from cifar_pipeline.errors import PipelineError
    from cifar_pipeline.scratch import train_scratch

    missing = tmp_path / "nothing-here"  # the check comes before any file is read
    with pytest.raises(PipelineError, match="small_cnn has convs without it: use sgd or adamw"):
        train_scratch(records_dir=missing, prepared_dir=missing, model_path=missing / "m.keras", live_dir=missing,
                      checkpoint_dir=None, arch="small_cnn", fast_width=64, epochs=1, batch_size=32,
                      optimizer="muon", lr=0.1, momentum=0.9, weight_decay=0.0, muon_lr=0.1, muon_momentum=0.6,
                      lookahead=0.0, label_smoothing=0.0, schedule="cosine", warmup_epochs=0, patience=1,
                      online_flip="none", online_shift_px=0, online_cutout_px=0, fit_on="train", precision="float32",
                      strategy="auto", seed=0)
