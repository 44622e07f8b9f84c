"""Export: a SavedModel that plain TensorFlow runs without this package, and ONNX and LiteRT files
that their own runtimes run, all predicting what the trained .keras model predicts."""
import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from cifar_pipeline.backbones import build_feature_extractor
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.export import export, run_litert, run_onnx
from cifar_pipeline.features import transfer_model
from cifar_pipeline.head import build_head
from cifar_pipeline.keras_save import save_model
from cifar_pipeline.models import build_model
from cifar_pipeline import export as export_module
from cifar_pipeline.portable import float32_graph, standard_graph
from cifar_pipeline.prepare import load_meta, load_split

SETTINGS = dict(onnx=True, litert=True, tolerance=1e-4, batch_size=16)


def _randomised(model: keras.Model, seed: int) -> keras.Model:
    """Nonzero BatchNorm shifts and statistics, so that rebuilding them wrong shows."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        if "moving_variance" in weight.path:
            weight.assign(rng.uniform(0.5, 2.0, weight.shape))
        elif "moving_mean" in weight.path or "shift" in weight.path:
            weight.assign(rng.normal(0, 0.3, weight.shape))
    return model


@pytest.fixture(scope="module")
def fast_bf16(training_data, tmp_path_factory):
    """The fast net (fused GELU, ShiftBatchNorm) in mixed bfloat16, as the scratch stage trains it."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_model("fast", 10, [120.0] * 3, [60.0] * 3, fast_width=8)
    finally:
        keras.config.set_dtype_policy("float32")
    path = tmp_path_factory.mktemp("fast") / "scratch.keras"
    save_model(_randomised(model, 0), path)
    return path


@pytest.fixture(scope="module")
def lite0_transfer(training_data, tmp_path_factory):
    """A Lite0 transfer model (random backbone, 32 px, mid-level features, dense head) and its
    export in every format: converting its graph takes a minute, so the tests share one."""
    extractor = build_feature_extractor("efficientnet_lite0", 32, "none", mid_level=True)
    dim = extractor.output_shape[-1]
    rng = np.random.default_rng(1)
    head = build_head("dense", rng.normal(0, 1, dim), rng.uniform(0.5, 2, dim), 10, 16, 0.1)
    root = tmp_path_factory.mktemp("lite0")
    save_model(_randomised(transfer_model(extractor, head), 1), root / "transfer.keras")
    report = export(model_path=root / "transfer.keras", prepared_dir=training_data / "prepared",
                    out_dir=root / "export", metrics_path=root / "export.json", **SETTINGS)
    return root / "transfer.keras", root / "export", report


@pytest.fixture(scope="module")
def fast_export(fast_bf16, training_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_export")
    (root / ".export.partial").mkdir()  # what an export killed mid-way leaves
    (root / ".export.partial" / "model.onnx").write_bytes(b"half a file")
    report = export(model_path=fast_bf16, prepared_dir=training_data / "prepared", out_dir=root / "export",
                    metrics_path=root / "export.json", **SETTINGS)
    return fast_bf16, root / "export", report


def test_an_export_clears_what_a_killed_one_left_beside_it(fast_export):
    root = fast_export[1].parent
    assert sorted(path.name for path in root.iterdir()) == ["export", "export.json"]


def test_the_float32_standard_graph_computes_what_the_fast_layers_compute(training_data):
    model = _randomised(build_model("fast", 10, [120.0] * 3, [60.0] * 3, fast_width=8), 2)
    images = load_split(training_data / "prepared", "test").images
    portable = standard_graph(model)
    assert {type(layer).__name__ for layer in portable.layers}.isdisjoint({"FusedGelu", "ShiftBatchNorm"})
    np.testing.assert_allclose(portable.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)


@pytest.mark.parametrize("exported", ["fast_export", "lite0_transfer"])
def test_every_format_is_written_and_checked_in_its_runtime(exported, request, training_data):
    model_path, out_dir, report = request.getfixturevalue(exported)
    prepared = training_data / "prepared"
    assert sorted(report) == ["litert", "onnx", "saved_model"]
    assert json.loads((out_dir.parent / "export.json").read_text()) == report
    assert json.loads((out_dir / "class_names.json").read_text()) == load_meta(prepared)["class_names"]
    images = load_split(prepared, "test").images
    trained = keras.models.load_model(model_path).predict(images, verbose=0)
    # ONNX and LiteRT come from the float32 rebuild: to 1e-4 of it, and near the trained
    # model (which here computes in bfloat16 or float32).
    portable = standard_graph(keras.models.load_model(model_path)).predict(images, verbose=0)
    for got in (run_onnx(out_dir / "model.onnx", images), run_litert(out_dir / "model.tflite", images)):
        assert got.shape == trained.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, portable, atol=1e-4)
        np.testing.assert_allclose(got, trained, atol=0.05)
    assert report["saved_model"]["max_probability_difference"] <= 1e-5
    labels = load_split(prepared, "test").labels
    assert report["saved_model"]["test_accuracy"] == pytest.approx((trained.argmax(1) == labels).mean(), abs=1e-4)


@pytest.mark.parametrize("exported", ["fast_export", "lite0_transfer"])
def test_the_saved_model_runs_where_this_package_cannot_be_imported(exported, request, training_data, tmp_path):
    model_path, out_dir, _ = request.getfixturevalue(exported)
    prepared = training_data / "prepared"
    images = load_split(prepared, "test").images
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys\n"
        "sys.modules['cifar_pipeline'] = None  # any import of the package now fails\n"
        "import numpy as np, tensorflow as tf\n"
        "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "out = serve(image=tf.constant(np.load(sys.argv[2])))['probabilities'].numpy()\n"
        "np.save(sys.argv[3], out)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(out_dir / "saved_model"),
                          str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = keras.models.load_model(model_path).predict(images, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)


def test_the_float32_rebuild_of_a_bfloat16_model_computes_its_function_in_float32(fast_bf16, training_data):
    model = keras.models.load_model(fast_bf16)
    images = load_split(training_data / "prepared", "test").images
    reference = float32_graph(model)
    assert {layer.compute_dtype for layer in reference.layers} == {"float32"}
    assert {type(layer).__name__ for layer in reference.layers} >= {"FusedGelu", "ShiftBatchNorm"}
    np.testing.assert_allclose(standard_graph(model).predict(images, verbose=0),
                               reference.predict(images, verbose=0), atol=1e-5)


def test_a_rebuild_that_computes_another_function_is_refused_and_leaves_no_export(fast_bf16, training_data,
                                                                                     tmp_path, monkeypatch):
    def logits_scaled(model):
        rebuilt = standard_graph(model)
        logits = rebuilt.get_layer("logits")
        logits.set_weights([weights * 1.5 for weights in logits.get_weights()])
        return rebuilt

    monkeypatch.setattr(export_module, "standard_graph", logits_scaled)
    with pytest.raises(PipelineError, match="float32 rebuild .* differs from the trained model computed in float32"):
        export(model_path=fast_bf16, prepared_dir=training_data / "prepared", out_dir=tmp_path / "export",
               metrics_path=tmp_path / "m.json", **{**SETTINGS, "litert": False})
    assert list(tmp_path.iterdir()) == []
