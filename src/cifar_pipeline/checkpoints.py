"""Training state at the end of every epoch, on disk, so a killed run resumes where it stopped.

Keras' BackupAndRestore restores the weights, optimizer and epoch count, but
not the rest of what a resumed run here needs to end exactly as an
uninterrupted one: the best epoch's weights and score (early stopping keeps
them; they are the saved model), the history so far (DVC deletes the DVCLive
log before it re-runs a stage, and the learning curves need every epoch) and a
fingerprint of the settings, so a checkpoint left by other params or another
architecture is never resumed. The checkpoint lives outside the stage's
outputs, is written file by file with the state file renamed in last, so a
kill at any moment leaves the previous epoch's checkpoint whole, and is
removed once the model is saved.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import keras

from cifar_pipeline import atomic

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


def fingerprint(*parts) -> str:
    """A short hash of JSON-serialisable settings (params, model config, data sizes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class EpochState(keras.callbacks.Callback):
    """Times each epoch, keeps the history and the best epoch's weights by `monitor` (None:
    the last epoch's), stops after `patience` epochs without a better one (None: never),
    and, given a `directory`, saves all of it at each epoch's end, to `save_to` if given (a
    cluster's workers other than the chief resume from the chief's checkpoint but must save
    too, elsewhere: saving runs collective ops). Before `fit`, `find` returns the epoch to
    start from (0 when there is nothing to resume), and `restore` loads that state into the
    model: apart, so that a cluster can check that its workers agree on the epoch before
    restoring (which runs collective ops on the chief alone when they do not)."""

    def __init__(self, directory: Path | None, fingerprint: str, monitor: str | None, patience: int | None,
                 save_to: Path | None = None):
        super().__init__()
        self.directory = Path(directory) if directory else None
        self.save_to = Path(save_to) if save_to else self.directory
        self.fingerprint, self.monitor, self.patience = fingerprint, monitor, patience
        self.epochs: list[dict] = []  # per epoch: Keras' logs plus "seconds"
        self.best_epoch, self.best_score, self._best_weights = -1, -math.inf, None
        self._best_file: str | None = None
        self._found: dict | None = None

    def find(self) -> int:
        self._found = self._read_state()
        return len(self._found["epochs"]) if self._found else 0

    def restore(self, model: keras.Model) -> None:
        state = self._found
        if state is None:
            return
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(self.directory / state["best_weights"])
        self._best_weights = model.get_weights()
        model.load_weights(self.directory / state["weights"])
        self.epochs = state["epochs"]
        self.best_epoch = state["best_epoch"]
        self.best_score = -math.inf if state["best_score"] is None else state["best_score"]
        self._best_file = state["best_weights"]

    def _read_state(self) -> dict | None:
        if self.directory is None or not (self.directory / STATE_FILE).exists():
            return None
        state = json.loads((self.directory / STATE_FILE).read_text())
        if state.get("fingerprint") != self.fingerprint:
            log.info(f"{self.directory}: checkpoint from other settings; starting over")
            return None
        log.info(f"{self.directory}: resuming after epoch {len(state['epochs'])}")
        return state

    def history(self) -> dict[str, list[float]]:
        keys = [key for key in self.epochs[0] if key != "seconds"] if self.epochs else []
        return {key: [epoch[key] for epoch in self.epochs] for key in keys}

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = {key: float(value) for key, value in (logs or {}).items()}
        self.epochs.append({**logs, "seconds": round(time.perf_counter() - self._start, 2)})
        if not all(math.isfinite(value) for value in logs.values()):
            return  # a diverged epoch is never saved, so a rerun cannot resume from it
        if self.monitor is None:
            self.best_epoch = epoch
            self._best_weights = None  # the model's own weights at the end
        elif logs[self.monitor] > self.best_score:
            self.best_epoch, self.best_score = epoch, logs[self.monitor]
            self._best_weights = self.model.get_weights()
        if self.save_to is not None:
            self._save(epoch)
        if self.stopped_early():
            self.model.stop_training = True

    def stopped_early(self) -> bool:
        return self.patience is not None and len(self.epochs) - 1 - self.best_epoch >= self.patience

    def _save(self, epoch: int) -> None:
        self.save_to.mkdir(parents=True, exist_ok=True)
        weights = f"epoch-{epoch}.weights.h5"
        self.model.save_weights(self.save_to / weights)
        if self.best_epoch == epoch:
            self._best_file = weights
        state = {"fingerprint": self.fingerprint, "weights": weights, "epochs": self.epochs,
                 "best_epoch": self.best_epoch, "best_score": self.best_score if self.monitor else None,
                 "best_weights": self._best_file}
        atomic.write_json(self.save_to / STATE_FILE, state)
        for path in self.save_to.glob("*.weights.h5"):
            if path.name not in (state["weights"], state["best_weights"]):
                path.unlink()

    def on_train_end(self, logs=None):
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)


def remove(directory: Path | None) -> None:
    """Remove a checkpoint once the finished model is saved."""
    if directory is not None and Path(directory).exists():
        shutil.rmtree(directory)
