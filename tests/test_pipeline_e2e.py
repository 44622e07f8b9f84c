"""The whole pipeline through the real DVC commands, on a tiny synthetic archive, offline."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _env():
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run(args, cwd, check=True):
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _git(cwd, *args):
    return _run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, cifar10_archive):
    """A copy of the project in a fresh git repo, pointed at the synthetic archive, with tiny settings."""
    root = tmp_path_factory.mktemp("e2e") / "project"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", "stages", "src", ".dvc"):
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("cache", "tmp", "__pycache__"))
        else:
            shutil.copy(source, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    archive, md5 = cifar10_archive
    params["data"].update(url=archive.as_uri(), md5=md5, val_fraction=0.2)
    params["augment"].update(shards=2)
    # The fast net at 16 channels instead of 80: the same code, a 25th of the convolution work.
    params["train"].update(epochs=2, batch_size=32, fast_width=16)
    # The default backbone with its installed ImageNet weights: the transfer path runs offline.
    params["transfer"].update(backbone="efficientnet_lite0", weights="imagenet", image_size=32, batch_size=64)
    params["head"].update(epochs=3, batch_size=32)
    params["finetune"].update(epochs=1, batch_size=32)
    params["evaluate"].update(misclassified=4, confused_pairs=4)
    params["export"].update(onnx=False, litert=False)  # tests/test_export.py converts those; minutes here
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "project")
    return root


def test_repro_then_experiment_then_metrics_and_plots(repo):
    first = _run(["dvc", "repro"], repo)
    assert _stages_run(first) == {"fetch", "prepare", "augment", "train", "extract_features", "train_head",
                                  "finetune", "evaluate@scratch", "evaluate@head", "evaluate@transfer",
                                  "export@scratch", "export@transfer"}, first.stdout
    for name in ("scratch", "head", "transfer"):
        metrics = json.loads((repo / "metrics" / f"{name}.json").read_text())
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["test_images"] == 30
        per_class = json.loads((repo / "metrics" / f"{name}_per_class.json").read_text())
        assert set(per_class) == {f"class{i}" for i in range(10)} and "per_class" not in metrics
        for png in (f"{name}_confusion.png", f"{name}_misclassified.png", f"{name}_learning_curves.png"):
            assert (repo / "plots" / png).read_bytes()[:4] == b"\x89PNG"
        rows = (repo / "plots" / f"{name}_predictions.csv").read_text().splitlines()
        assert rows[0] == "actual,predicted" and len(rows) == 31
        pairs = (repo / "plots" / f"{name}_confused_pairs.csv").read_text().splitlines()
        assert pairs[0].startswith("actual,predicted,count,share_of_actual") and len(pairs) <= 5
    assert (repo / "plots" / "samples.png").exists() and (repo / "plots" / "augmentations.png").exists()
    for name in ("scratch", "transfer"):  # each checked against its .keras model by the stage itself
        assert (repo / "exports" / name / "saved_model" / "saved_model.pb").is_file()
        assert json.loads((repo / "metrics" / f"{name}_export.json").read_text())["saved_model"]["top1_agreement"] == 1
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo).stdout
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "baseline run")


    # An experiment on train.lr re-runs exactly the stages that depend on it.
    experiment = _run(["dvc", "exp", "run", "-S", "train.lr=0.05"], repo)
    assert _stages_run(experiment) == {"train", "evaluate@scratch", "export@scratch"}, experiment.stdout

    diff = _run(["dvc", "metrics", "diff", "--json"], repo)
    changed = json.loads(diff.stdout)
    # On 30 test images the accuracy of two tiny runs may tie; the loss does not.
    assert "metrics/scratch.json" in changed and "loss" in changed["metrics/scratch.json"]
    assert "metrics/transfer.json" not in changed and "metrics/head.json" not in changed

    shown = _run(["dvc", "exp", "show", "--json"], repo)
    assert "0.05" in shown.stdout and "metrics/scratch.json" in shown.stdout
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "lr experiment")

    # A head experiment named by the head's evaluation (as in the README) trains a new head on the
    # cached features and scores it without a backbone pass; it stops before fine-tuning, and
    # `dvc status` then names the fine-tuning as what a full run would redo (and what follows it).
    quick = _run(["dvc", "exp", "run", "-S", "head.lr=0.003", "evaluate@head"], repo)
    assert _stages_run(quick) == {"train_head", "evaluate@head"}, quick.stdout
    assert "scoring the head on the cached test features" in quick.stdout
    assert json.loads(_run(["dvc", "status", "--json"], repo).stdout) == {
        "finetune": [{"changed deps": {"models/head.keras": "modified"}}]}
    _git(repo, "checkout", "--", ".")  # back to the committed workspace: the experiment stays listed
    _run(["dvc", "checkout"], repo)

    plots = _run(["dvc", "plots", "show", "--json"], repo)
    rendered = json.loads(plots.stdout)["data"]
    assert "plots/scratch_predictions.csv" in rendered
    assert any("dvclive/scratch/plots/metrics/train/accuracy.tsv" in key for key in rendered)
    # Both models' learning rates, cosine schedules included (Keras logs them only for plateau).
    assert any("dvclive/scratch/plots/metrics/train/learning_rate.tsv" in key for key in rendered)
    assert "Transfer head learning rate per epoch" in rendered
    assert any("dvclive/finetune/plots/metrics/train/learning_rate.tsv" in key for key in rendered)
    assert "failed to load" not in plots.stderr  # no series missing, validated or not (fit_on)
    assert "plots/scratch_confusion.png" in rendered

    # Re-running the data and feature stages gives byte-identical outputs, the saved extractor
    # included (same hashes in dvc.lock), so `dvc repro -f` on them leaves everything downstream
    # up to date: neither training nor the head would re-run.
    before = _data_hashes(repo)
    _run(["dvc", "repro", "-f", "-s", "prepare", "augment", "extract_features"], repo)
    assert _data_hashes(repo) == before
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo).stdout


def _stages_run(result) -> set[str]:
    """The stages a dvc command says it ran ("Running stage 'NAME':")."""
    return {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}


def _data_hashes(repo):
    """md5 of the outputs of the data and feature stages recorded in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    hashes = {out["path"]: out["md5"] for stage in ("prepare", "augment", "extract_features")
              for out in lock[stage]["outs"]}
    assert set(hashes) == {"data/prepared", "plots/samples.png", "data/records", "plots/augmentations.png",
                           "data/features", "models/feature_extractor.keras"}
    return hashes


def test_killed_dvc_repro_resumes_training_on_the_next_repro(repo):
    _run(["dvc", "repro"], repo)  # up to date first (the test above forced the feature stage)
    # More epochs than the fixture's, so the kill lands while there is work left.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env()
    process = subprocess.Popen(["dvc", "repro", "-s", "train"], cwd=repo, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = repo / "checkpoints" / "scratch" / "state.json"
    deadline = time.monotonic() + 300
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # dvc and the stage it runs
    process.wait()
    finished = len(json.loads(state.read_text())["epochs"])
    assert 1 <= finished < 4 and not (repo / "models" / "scratch.keras").exists()

    again = _run(["dvc", "repro"], repo)
    assert f"resuming after epoch {finished}" in again.stdout + again.stderr
    assert _stages_run(again) == {"train", "evaluate@scratch", "export@scratch"}
    assert json.loads((repo / "dvclive" / "scratch" / "metrics.json").read_text())["step"] == 3
    assert not state.parent.exists()
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo).stdout


def test_queued_sweep_runs_two_experiments_at_once(repo):
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "resumed run", "--allow-empty")
    # Up to the scores: the sweep compares accuracies, and the exports would only add minutes here.
    # Neither value is the committed one (0.05, from the experiment of the first test), so both runs
    # train: a run with nothing to do ends in seconds, and the first worker up then takes both.
    _run(["dvc", "exp", "run", "--queue", "-S", "train.lr=0.1,0.2", "evaluate@scratch"], repo)
    # One thread per TensorFlow pool in each run, so the two runs share the cores instead of fighting.
    # Not through _run: the queue's workers keep its output pipes open until the queue is empty.
    started = subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**_env(), "TF_NUM_INTRAOP_THREADS": "1",
                                                              "TF_NUM_INTEROP_THREADS": "1"})
    assert started.returncode == 0
    # Every 3 s: each poll is a whole dvc process, which the two runs would otherwise share the cores
    # with. A failure shows the workers' logs: when each came up and which runs it took.
    most_running, deadline = 0, time.monotonic() + 600
    while time.monotonic() < deadline:
        status = _run(["dvc", "queue", "status"], repo).stdout
        most_running = max(most_running, status.count(" Running"))
        if " Queued" not in status and " Running" not in status:
            break
        time.sleep(3)
    assert most_running == 2, status + "".join(_worker_logs(repo))
    assert status.count(" Success") == 2, status
    accuracies = {}
    for baseline in json.loads(_run(["dvc", "exp", "show", "--json"], repo).stdout):
        for experiment in baseline.get("experiments") or []:
            data = experiment["revs"][0]["data"]
            lr = data["params"]["params.yaml"]["data"]["train"]["lr"]
            accuracies[lr] = data["metrics"]["metrics/scratch.json"]["data"]["accuracy"]
    assert set(accuracies) == {0.1, 0.2}


def _worker_logs(repo):
    """The queue workers' own logs, which say when each started and which runs it took."""
    for log in sorted((repo / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.out")):
        yield f"\n--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:])


def test_a_fresh_clone_pulls_data_features_and_models_from_the_remote_with_nothing_to_rerun(repo, tmp_path):
    _run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote")], repo)
    _run(["dvc", "push"], repo)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "remote", "--allow-empty")
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    _run(["dvc", "pull"], clone)
    for output in ("data/records", "data/features", "models/scratch.keras", "models/head.keras",
                   "models/transfer.keras"):
        assert (clone / output).exists(), output
    assert (clone / "models" / "scratch.keras").read_bytes() == (repo / "models" / "scratch.keras").read_bytes()
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], clone).stdout
    assert _stages_run(_run(["dvc", "repro"], clone)) == set()


def test_bad_params_fail_before_any_work(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = -1
    bad = repo / "bad_params.yaml"
    bad.write_text(yaml.safe_dump(params))
    result = _run([sys.executable, "stages/fetch.py", "--out", "unused.tar.gz", "--params", str(bad)],
                  repo, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {bad}: train.lr = -1 is invalid; allowed: a number > 0 and <= 10")
    assert not (repo / "unused.tar.gz").exists()


def test_md5_mismatch_stops_fetch_naming_file_and_md5s(repo, cifar10_archive):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["md5"] = "0" * 32
    bad = repo / "bad_md5.yaml"
    bad.write_text(yaml.safe_dump(params))
    result = _run([sys.executable, "stages/fetch.py", "--out", "fresh/archive.tar.gz", "--params", str(bad)],
                  repo, check=False)
    assert result.returncode == 1
    assert f"md5 mismatch for {cifar10_archive[0].as_uri()}: expected {'0' * 32}, got {cifar10_archive[1]}" \
        in result.stderr
    assert not (repo / "fresh" / "archive.tar.gz").exists()
