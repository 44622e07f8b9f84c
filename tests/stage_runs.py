"""Helpers for tests that run a training stage as a real process and kill it mid-run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cifar_pipeline import checkpoints


def finish(process: subprocess.Popen) -> str:
    """Wait for a stage process; its output, after checking that it succeeded."""
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    return output


def epochs_saved(checkpoint: Path) -> int:
    """Epochs recorded in a stage's checkpoint directory (0 before the first is written)."""
    try:
        return len(json.loads((checkpoint / checkpoints.STATE_FILE).read_text())["epochs"])
    except (OSError, ValueError):  # not written yet
        return 0
