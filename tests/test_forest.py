"""The random-forest head's Keras layer: the same probabilities as scikit-learn, saved and loaded."""
import keras
import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier

from cifar_pipeline.forest import forest_layer


def _data(n, rng):
    x = rng.normal(size=(n, 12)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(int) + 2 * (x[:, 2] > 0.5)


def test_layer_reproduces_predict_proba_after_a_save_and_load(tmp_path):
    rng = np.random.default_rng(0)
    x, y = _data(500, rng)
    # Trees of different sizes and depths: the layer pads them to one node count.
    forest = RandomForestClassifier(n_estimators=5, max_depth=None, random_state=0).fit(x, y)
    inputs = keras.Input((12,))
    model = keras.Model(inputs, forest_layer(forest, 12)(inputs))
    model.save(tmp_path / "forest.keras")
    loaded = keras.models.load_model(tmp_path / "forest.keras")
    test_x, _ = _data(300, rng)
    np.testing.assert_allclose(loaded.predict(test_x, verbose=0), forest.predict_proba(test_x), atol=1e-6)
    # Inputs exactly on a threshold go left, as in scikit-learn (x <= threshold, in float64): on
    # integer features every threshold is a half-integer, which float32 holds exactly.
    whole = rng.integers(0, 4, (400, 12)).astype(np.float32)
    labels = (whole[:, 0] + whole[:, 1] > 3).astype(int) + (whole[:, 2] > 1)
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(whole, labels)
    inputs = keras.Input((12,))
    model = keras.Model(inputs, forest_layer(forest, 12)(inputs))
    on_thresholds = rng.integers(0, 3, (200, 12)).astype(np.float32) + 0.5
    np.testing.assert_allclose(model.predict(on_thresholds, verbose=0), forest.predict_proba(on_thresholds),
                               atol=1e-6)


def test_forest_missing_a_class_is_refused():
    x, y = _data(100, np.random.default_rng(1))
    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(x, np.where(y == 0, 3, y))
    with pytest.raises(ValueError, match="labels 0..K-1"):
        forest_layer(forest, 12)


def test_a_fresh_process_loads_a_forest_model_through_saved_models(tmp_path):
    import subprocess
    import sys
    x, y = _data(200, np.random.default_rng(2))
    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(x, y)
    inputs = keras.Input((12,))
    keras.Model(inputs, forest_layer(forest, 12)(inputs)).save(tmp_path / "forest.keras")
    # The evaluate stage and cifar-predict load models in processes that never imported forest.py.
    code = ("from cifar_pipeline.saved_models import load_model; "
            f"print(load_model({str(tmp_path / 'forest.keras')!r}).output_shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("(None, 4)")
