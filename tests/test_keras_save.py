"""Saved models: equal models give equal files, whenever and from whichever objects they are saved."""
import time

import keras
import numpy as np

from cifar_pipeline.keras_save import save_model


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    # One policy object in two layers: Keras records it once, with its id() as shared_object_id.
    policy = keras.DTypePolicy("float32")
    inputs = keras.Input((4,), name="x")  # names fixed: Keras numbers a second default one
    hidden = keras.layers.Dense(3, dtype=policy, name="dense")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, dtype=policy, name="out")(hidden), name="net")


def test_saving_an_equal_model_later_gives_the_same_bytes(tmp_path):
    # DVC hashes the bytes: a save time or a memory address inside the file would re-run every
    # stage downstream of a re-run that computed the same model.
    first, second = _model(), _model()  # equal weights, other objects
    save_model(first, tmp_path / "first.keras")
    time.sleep(1.1)  # Keras stamps the time to the second
    save_model(second, tmp_path / "second.keras")
    assert (tmp_path / "first.keras").read_bytes() == (tmp_path / "second.keras").read_bytes()
    loaded = keras.models.load_model(tmp_path / "second.keras")
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), first.predict(x, verbose=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.keras", "second.keras"]
