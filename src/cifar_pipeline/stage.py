"""What every stage script shares: params loading, seeding and error reporting."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

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
    """Run a stage's main; report a user-fixable error in one line and exit 1."""
    try:
        main()
    except (PipelineError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
