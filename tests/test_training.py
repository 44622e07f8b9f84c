"""Training: DVCLive logs, best-epoch selection on validation (the last epoch without it), and a
refusal to save a NaN model."""
import json

import numpy as np
import pytest

from cifar_pipeline.features import MIRRORED_TRAIN
from cifar_pipeline.head import build_head, train_head
from cifar_pipeline.prepare import prepare
from cifar_pipeline.train import TrainingDiverged, make_optimizer


@pytest.fixture(scope="module")
def head_inputs(cifar10_archive, tmp_path_factory):
    """Prepared data plus fake features that separate the classes."""
    root = tmp_path_factory.mktemp("head")
    prepare(cifar10_archive[0], root / "prepared", "cifar10", "fine", val_fraction=0.2, limit=None, seed=0)
    rng = np.random.default_rng(0)
    (root / "features").mkdir()
    for split in ("train", "val"):
        labels = np.load(root / "prepared" / f"{split}_labels.npy")
        signal = np.tile(np.eye(10)[labels] * 3, 128)  # the extractor below outputs 1280 features
        np.save(root / "features" / f"{split}.npy", (signal + rng.normal(0, 0.3, signal.shape)).astype("float32"))
    from cifar_pipeline.backbones import build_feature_extractor
    build_feature_extractor("mobilenet_v2", 32, "none").save(root / "extractor.keras")
    return root


def _train(root, tmp_path, **overrides):
    kwargs = dict(kind="dense", units=16, dropout=0.1, lr=0.01, weight_decay=1e-4, epochs=8, batch_size=32,
                  patience=8, trees=10, min_samples_leaf=1, seed=0, label_smoothing=0.0, schedule="plateau")
    kwargs.update(overrides)
    return train_head(features_dir=root / "features", prepared_dir=root / "prepared",
                      extractor_path=root / "extractor.keras", model_path=tmp_path / "transfer.keras",
                      live_dir=tmp_path / "live", **kwargs)


def test_head_learns_logs_with_dvclive_and_saves_an_end_to_end_model(head_inputs, tmp_path):
    history = _train(head_inputs, tmp_path)
    assert max(history["val_accuracy"]) > 0.9
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["best_val_accuracy"] == pytest.approx(max(history["val_accuracy"]), abs=1e-4)
    assert summary["step"] == len(history["loss"]) - 1 and summary["images_per_s"] > 0
    assert (tmp_path / "live" / "plots" / "metrics" / "eval" / "accuracy.tsv").exists()
    import keras
    model = keras.models.load_model(tmp_path / "transfer.keras")
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)


def test_cosine_head_runs_every_epoch_and_decays_the_learning_rate_to_zero(head_inputs, tmp_path, monkeypatch):
    from cifar_pipeline import head

    optimizers = []
    monkeypatch.setattr(head, "make_optimizer", lambda *a: optimizers.append(make_optimizer(*a)) or optimizers[-1])
    # patience=1 would stop a plateau head at its first stall; cosine runs every epoch.
    history = _train(head_inputs, tmp_path, schedule="cosine", epochs=6, patience=1)
    assert len(history["loss"]) == 6 and max(history["val_accuracy"]) > 0.9
    assert float(optimizers[0].learning_rate) < 1e-6  # at the last step: 0, from lr = 0.01
    # The schedule is in the DVCLive log too (Keras logs it only for ReduceLROnPlateau).
    logged = np.loadtxt(tmp_path / "live" / "plots" / "metrics" / "train" / "learning_rate.tsv",
                        delimiter="\t", skiprows=1, usecols=-1)
    assert len(logged) == 6 and logged[0] < 0.01 and np.all(np.diff(logged) < 0) and logged[-1] < 1e-6


def test_head_trains_on_the_mirrored_training_features_too(head_inputs, tmp_path):
    # Here only the "mirrored" copies carry the classes: a head that ignored them would guess.
    features = head_inputs / "features"
    original = np.load(features / "train.npy")
    try:
        np.save(features / f"{MIRRORED_TRAIN}.npy", original)
        np.save(features / "train.npy", np.random.default_rng(1).normal(0, 1, original.shape).astype("float32"))
        history = _train(head_inputs, tmp_path)
    finally:
        np.save(features / "train.npy", original)
        (features / f"{MIRRORED_TRAIN}.npy").unlink()
    assert max(history["val_accuracy"]) > 0.9


# The infinite features make the head's input normalisation warn (inf - inf) before the loss turns NaN.
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_nan_loss_stops_training_and_saves_no_model(head_inputs, tmp_path):
    bad = head_inputs / "features" / "train.npy"
    original = np.load(bad)
    try:
        np.save(bad, np.full_like(original, np.inf))
        with pytest.raises(TrainingDiverged, match="loss became NaN or infinite.*lower learning rate"):
            _train(head_inputs, tmp_path, kind="logistic")
    finally:
        np.save(bad, original)
    assert not (tmp_path / "transfer.keras").exists() and not (tmp_path / "live" / "metrics.json").exists()


def test_with_nothing_to_validate_the_last_epoch_is_kept_and_no_validation_logged(tmp_path):
    import keras
    import tensorflow as tf

    from cifar_pipeline.train import fit, make_optimizer
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), np.eye(3)[rng.integers(0, 3, 64)].astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    history = fit(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(16), None, steps_per_epoch=None, epochs=3,
                  optimizer=make_optimizer("sgd", 0.1, 0.0, 0.0), label_smoothing=0.0, schedule="cosine",
                  patience=1, live_dir=tmp_path / "live", images_per_epoch=64, checkpoint_dir=tmp_path / "ckpt")
    # No validation series; `patience` stops plateau schedules only.
    assert sorted(history) == ["accuracy", "learning_rate", "loss"] and len(history["loss"]) == 3
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["best_epoch"] == 3 and "best_val_accuracy" not in summary
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    last = keras.models.clone_model(model)
    last.load_weights(tmp_path / "ckpt" / state["weights"])
    assert state["best_weights"] == state["weights"]
    for kept, saved in zip(model.get_weights(), last.get_weights()):
        np.testing.assert_array_equal(kept, saved)
    # The checkpoint, which holds no validation score, resumes: a longer run goes on from epoch 3.
    resumed = fit(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(16), None, steps_per_epoch=None, epochs=4,
                  optimizer=make_optimizer("sgd", 0.1, 0.0, 0.0), label_smoothing=0.0, schedule="cosine",
                  patience=1, live_dir=tmp_path / "live", images_per_epoch=64, checkpoint_dir=tmp_path / "ckpt")
    assert resumed["loss"][:3] == history["loss"] and len(resumed["loss"]) == 4
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["best_epoch"] == 4
    with pytest.raises(ValueError, match="plateau schedule needs validation"):
        fit(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(16), None, steps_per_epoch=None, epochs=1,
            optimizer=make_optimizer("sgd", 0.1, 0.0, 0.0), label_smoothing=0.0, schedule="plateau", patience=1,
            live_dir=tmp_path / "live2", images_per_epoch=64)


def test_head_standardises_features():
    mean, var = np.full(4, 100.0), np.full(4, 25.0)
    head = build_head("logistic", mean, var, 3, units=8, dropout=0.0)
    np.testing.assert_allclose(head.get_layer("standardize")(np.full((1, 4), 105.0)).numpy(), 1.0, rtol=1e-6)


def test_forest_head_logs_per_tree_count_and_saves_the_forest_inside_the_model(head_inputs, tmp_path):
    history = _train(head_inputs, tmp_path, kind="random_forest", trees=6)
    assert len(history["val_accuracy"]) == 6 and history["val_accuracy"][-1] > 0.9
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["trees"] == 6 and summary["best_val_accuracy"] == pytest.approx(history["val_accuracy"][-1])
    assert (tmp_path / "live" / "plots" / "metrics" / "eval" / "accuracy.tsv").read_text().count("\n") == 7
    import keras
    model = keras.models.load_model(tmp_path / "transfer.keras")
    probs = model.predict(np.load(head_inputs / "prepared" / "val_images.npy")[:4], verbose=0)
    assert probs.shape == (4, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
