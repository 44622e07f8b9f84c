"""cifar-predict: any image file in, top-k classes out; a bad file is named and does not stop the others."""
import json

import numpy as np
import pytest
from PIL import Image

from cifar_pipeline.models import build_model
from cifar_pipeline.predict import load_image, main

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    model = build_model("ann", 10, mean=[120.0] * 3, std=[60.0] * 3)
    model.save(root / "model.keras")
    (root / "meta.json").write_text(json.dumps({"class_names": NAMES}))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (100, 100), dtype=np.uint8), "L").save(root / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "small.png")
    (root / "notes.txt").write_text("not an image")
    return root, model


def test_table_lists_every_readable_image_and_names_the_bad_ones(saved, capsys):
    root, _ = saved
    files = [root / "rgba.png", root / "notes.txt", root / "gray.jpg", root / "missing.png", root / "small.png"]
    status = main([str(root / "model.keras"), *map(str, files), "--meta", str(root / "meta.json")])
    out, err = capsys.readouterr()
    assert status == 1
    assert f"{root / 'notes.txt'}: not an image" in err and f"{root / 'missing.png'}:" in err
    rows = out.strip().splitlines()
    assert [row.split("\t")[0] for row in rows] == [str(root / n) for n in ("rgba.png", "gray.jpg", "small.png")]
    assert all(len(row.split("\t")[1].split("  ")) == 3 for row in rows)


def test_json_gives_sorted_top_k_that_match_the_model(saved, capsys):
    root, model = saved
    status = main([str(root / "model.keras"), str(root / "gray.jpg"), str(root / "rgba.png"),
                   "--top-k", "4", "--json", "--meta", str(root / "meta.json")])
    assert status == 0
    results = json.loads(capsys.readouterr().out)
    expected = model.predict(np.stack([load_image(root / "gray.jpg"), load_image(root / "rgba.png")]), verbose=0)
    for result, probabilities in zip(results, expected):
        top = result["top"]
        assert len(top) == 4 and all(p["class"] in NAMES for p in top)
        assert [p["probability"] for p in top] == sorted((p["probability"] for p in top), reverse=True)
        assert top[0]["class"] == NAMES[int(probabilities.argmax())]
        assert top[0]["probability"] == pytest.approx(float(probabilities.max()), abs=1e-4)


def test_images_become_32px_rgb_with_transparency_on_white(tmp_path):
    clear_red = np.zeros((40, 40, 4), np.uint8)
    clear_red[..., 0] = 255
    Image.fromarray(clear_red, "RGBA").save(tmp_path / "clear.png")
    image = load_image(tmp_path / "clear.png")
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert (image == 255).all()


def test_outside_the_project_a_cifar10_model_still_names_its_classes(saved, capsys, tmp_path, monkeypatch):
    root, _ = saved
    monkeypatch.chdir(tmp_path)  # no data/prepared/meta.json here or beside the model
    assert main([str(root / "model.keras"), str(root / "small.png"), "--top-k", "10"]) == 0
    assert sorted(capsys.readouterr().out.split("\t")[1].split()[::2]) == sorted(NAMES)


def test_the_meta_json_of_the_models_project_is_found_from_anywhere(saved, capsys, tmp_path, monkeypatch):
    root, model = saved
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "data" / "prepared").mkdir(parents=True)
    model.save(project / "models" / "m.keras")
    names = [f"thing{i}" for i in range(10)]
    (project / "data" / "prepared" / "meta.json").write_text(json.dumps({"class_names": names}))
    monkeypatch.chdir(root)
    assert main([str(project / "models" / "m.keras"), str(root / "small.png")]) == 0
    assert capsys.readouterr().out.split("\t")[1].split()[0] in names


def test_without_class_names_the_indices_are_shown(capsys, tmp_path, monkeypatch):
    build_model("ann", 7, mean=[120.0] * 3, std=[60.0] * 3).save(tmp_path / "seven.keras")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "black.png")
    monkeypatch.chdir(tmp_path)
    assert main([str(tmp_path / "seven.keras"), str(tmp_path / "black.png")]) == 0
    assert "class " in capsys.readouterr().out


def test_a_missing_or_mismatched_meta_json_is_a_usage_error(saved, capsys, tmp_path):
    root, _ = saved
    (tmp_path / "three.json").write_text(json.dumps({"class_names": ["a", "b", "c"]}))
    for meta, message in ((tmp_path / "none.json", "no such meta.json"), (tmp_path / "three.json", "names 3 classes")):
        with pytest.raises(SystemExit) as exit_info:
            main([str(root / "model.keras"), str(root / "small.png"), "--meta", str(meta)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_model_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nope.keras"), "x.png"])
    assert exit_info.value.code == 2 and "no such model file" in capsys.readouterr().err


def test_an_exported_saved_model_predicts_like_the_keras_file_with_the_exports_class_names(saved, capsys, tmp_path):
    from cifar_pipeline.export import write_saved_model

    root, model = saved
    write_saved_model(model, tmp_path / "export" / "saved_model")
    names = [f"thing{i}" for i in range(10)]
    (tmp_path / "export" / "class_names.json").write_text(json.dumps(names))
    files = [root / "gray.jpg", root / "rgba.png"]
    expected = model.predict(np.stack([load_image(path) for path in files]), verbose=0)
    for target in (tmp_path / "export", tmp_path / "export" / "saved_model"):
        assert main([str(target), *map(str, files), "--top-k", "10", "--json"]) == 0
        for result, probabilities in zip(json.loads(capsys.readouterr().out), expected):
            got = {p["class"]: p["probability"] for p in result["top"]}
            assert got == pytest.approx({names[i]: float(p) for i, p in enumerate(probabilities)}, abs=1e-4)
