"""Export a trained model for serving: TensorFlow SavedModel, ONNX and LiteRT, each checked.

Every format takes a batch of uint8 RGB images (N, 32, 32, 3) and returns float32 class
probabilities (N, classes); `class_names.json` beside them names the classes.

- `saved_model/`: the trained model's own graph (TensorFlow Serving, `tf.saved_model.load`),
  signature `serving_default`, input `image`, output `probabilities`; it predicts what the
  `.keras` file does, and loads where this package is not installed.
- `model.onnx` (ONNX Runtime) and `model.tflite` (LiteRT) are converted from the model
  rebuilt as float32 standard layers (portable.py), as their converters reject the fast
  net's layers and mixed precision.

Each file is run in its own runtime on the test images (its accuracy on them recorded, one view
per image) and compared with the Keras graph it was made from: no probability may differ by
more than `tolerance`. The float32 rebuild is held to the same `tolerance` against the trained
model computed in float32 (its own layers, only the dtype policies changed), so every format
computes the trained weights' function up to float32 rounding. The share of test images where a
format gives the trained model's own top-1 class is recorded: below 1 only where the model
trained in bfloat16 or float16, whose rounding flips near-tied classes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from cifar_pipeline.atomic import atomic_path, write_json
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.portable import computes_in_float32, float32_graph, standard_graph
from cifar_pipeline.prepare import load_meta, load_split
from cifar_pipeline.saved_models import load_model

SIGNATURE = "serving_default"
OUTPUT = "probabilities"


def write_saved_model(model: keras.Model, path: Path) -> None:
    """`model` as a SavedModel whose serving signature maps uint8 `image` to `probabilities`."""
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(image):
        return {OUTPUT: model(image, training=False)}

    spec = tf.TensorSpec((None, 32, 32, 3), tf.uint8, name="image")
    archive.add_endpoint(name=SIGNATURE, fn=serve, input_signature=[spec])
    archive.write_out(str(path), verbose=False)


def _batches(images: np.ndarray, batch_size: int):
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def saved_model_predictor(path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """(uint8 images -> probabilities, number of classes) of a SavedModel written by write_saved_model."""
    serve = tf.saved_model.load(str(path)).signatures[SIGNATURE]
    return (lambda images: serve(image=tf.constant(images))[OUTPUT].numpy()), serve.structured_outputs[OUTPUT].shape[-1]


def run_saved_model(path: Path, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    predict, _ = saved_model_predictor(path)
    return np.concatenate([predict(batch) for batch in _batches(images, batch_size)])


def run_onnx(path: Path, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: batch})[0] for batch in _batches(images, batch_size)])


def run_litert(path: Path, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    outputs = []
    for batch in _batches(images, batch_size):
        interpreter.resize_tensor_input(source["index"], batch.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], batch)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(target["index"]).copy())
    return np.concatenate(outputs)


def _largest_difference(name: str, got: np.ndarray, source: np.ndarray, source_name: str, tolerance: float) -> float:
    difference = float(np.abs(got - source).max())
    if not difference <= tolerance:  # also catches NaN
        raise PipelineError(f"export: {name} differs from {source_name} by {difference:.2e} "
                            f"(export.tolerance = {tolerance:g})")
    return difference


def _check(name: str, got: np.ndarray, source: np.ndarray, trained: np.ndarray, labels: np.ndarray,
           tolerance: float, seconds: float, path: Path) -> dict:
    difference = _largest_difference(name, got, source, "the Keras graph it was made from", tolerance)
    agreement = float((got.argmax(1) == trained.argmax(1)).mean())
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    # One view per image: evaluate's figures include test-time augmentation, a served model has none.
    return {"test_accuracy": round(float((got.argmax(1) == labels).mean()), 4),
            "max_probability_difference": difference, "top1_agreement": round(agreement, 6),
            "export_s": round(seconds, 2), "megabytes": round(size / 1e6, 2)}


def export(*, model_path: Path, prepared_dir: Path, out_dir: Path, metrics_path: Path, onnx: bool, litert: bool,
           tolerance: float, batch_size: int) -> dict:
    """Write `out_dir` (saved_model/, model.onnx, model.tflite, class_names.json), each file
    checked on the test images as the module says; write the checks to `metrics_path`."""
    model = load_model(model_path)
    names = load_meta(prepared_dir)["class_names"]
    if model.output_shape[-1] != len(names):
        raise PipelineError(f"{model_path} predicts {model.output_shape[-1]} classes but {prepared_dir} names "
                            f"{len(names)}")
    test = load_split(prepared_dir, "test")
    images = test.images
    trained = model.predict(images, batch_size=batch_size, verbose=0)
    # Written beside out_dir under a fixed name and moved into place at the end: a failed check
    # leaves no half export, and what a killed export left there is cleared by the next one.
    with atomic_path(out_dir) as work:
        work.mkdir()
        (work / "class_names.json").write_text(json.dumps(names, indent=2) + "\n")
        start = time.perf_counter()
        write_saved_model(model, work / "saved_model")
        seconds = time.perf_counter() - start
        report = {"saved_model": _check("saved_model", run_saved_model(work / "saved_model", images, batch_size),
                                        trained, trained, test.labels, tolerance, seconds,
                                        work / "saved_model")}
        if onnx or litert:
            start = time.perf_counter()
            portable = standard_graph(model)
            rebuilt_s = time.perf_counter() - start
            source = portable.predict(images, batch_size=batch_size, verbose=0)
            reference = trained if computes_in_float32(model) else \
                float32_graph(model).predict(images, batch_size=batch_size, verbose=0)
            rebuild = _largest_difference("the float32 rebuild of standard layers", source, reference,
                                          "the trained model computed in float32", tolerance)
            for enabled, fmt, file, runner in ((onnx, "onnx", "model.onnx", run_onnx),
                                               (litert, "litert", "model.tflite", run_litert)):
                if not enabled:
                    continue
                start = time.perf_counter()
                portable.export(str(work / file), format=fmt, verbose=False)
                seconds = rebuilt_s + time.perf_counter() - start
                report[fmt] = {**_check(fmt, runner(work / file, images, batch_size), source, trained,
                                        test.labels, tolerance, seconds, work / file),
                               "rebuild_difference": rebuild}
    write_json(metrics_path, report)
    return report
