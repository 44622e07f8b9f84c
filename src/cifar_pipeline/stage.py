"""What every stage script shares: params loading, seeding, logging and error reporting.

Imported first by every stage script, before anything imports TensorFlow.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

# oneDNN kernels made training 2-4x faster on the 2-core CPUs measured (docs/speed.md), but
# TensorFlow does not enable them by itself there; it reads this once, when first imported.
# Set here, in what the stage scripts import, not by the library for every program using it.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from cifar_pipeline import params as params_lib
from cifar_pipeline.errors import PipelineError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    return p


def load_params(args: argparse.Namespace) -> dict:
    return params_lib.load(args.params)


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and TensorFlow once, at the start of a stage; `deterministic`
    also makes TensorFlow's ops deterministic (slower: some lose their parallelism)."""
    import keras  # imported here so the stages that never touch TensorFlow stay fast

    keras.utils.set_random_seed(seed)
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def run(main: Callable[[], None]) -> None:
    """Run a stage's main, its library's log lines on stdout; report a user-fixable error in
    one line and exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        main()
    except (PipelineError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
