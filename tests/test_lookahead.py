"""Lookahead (train.lookahead): the sync rule, its schedule and the weights it covers."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from cifar_pipeline.lookahead import SYNC_EVERY, Lookahead


def _model():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3)(inputs)
    x = keras.layers.BatchNormalization()(x)  # its moving statistics are averaged too
    return keras.Model(inputs, keras.layers.Dense(2)(x))


def _floats(model):
    return [np.array(w.numpy()) for w in model.weights]


def _shift(model, by):
    for w in model.weights:
        w.assign(w.numpy() + by)


def test_every_fifth_step_moves_the_weights_back_towards_the_slow_average():
    model = _model()
    steps, epochs, peak = 12, 2, 0.9
    callback = Lookahead(peak=peak, steps_per_epoch=steps, epochs=epochs)
    callback.set_model(model)
    callback.on_epoch_begin(1)
    slow = _floats(model)
    _shift(model, 1.0)
    for batch in range(SYNC_EVERY - 1):
        callback.on_train_batch_end(batch)
    moved = _floats(model)
    assert all(np.allclose(m, s + 1.0) for m, s in zip(moved, slow))  # no sync before the fifth step
    callback.on_train_batch_end(SYNC_EVERY - 1)
    decay = peak * ((steps + SYNC_EVERY) / (steps * epochs)) ** 3  # the epoch's fifth step, step 17 of 24
    for after, s in zip(_floats(model), slow):
        np.testing.assert_allclose(after, s + (1 - decay), rtol=1e-6, atol=1e-6)
    assert len(slow) == 8  # two kernels and biases; BatchNorm gamma, beta, moving mean and variance


def test_the_last_step_of_an_epoch_syncs_even_off_the_five_step_grid():
    model = _model()
    callback = Lookahead(peak=0.5, steps_per_epoch=7, epochs=1)
    callback.set_model(model)
    callback.on_epoch_begin(0)
    slow = _floats(model)
    _shift(model, 2.0)
    callback.on_train_batch_end(6)  # step 7 of 7: decay 0.5 * 1 ** 3
    for after, s in zip(_floats(model), slow):
        np.testing.assert_allclose(after, s + 1.0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("peak", [0.0, 1.0])
def test_a_peak_decay_outside_the_open_unit_interval_is_refused(peak):
    with pytest.raises(ValueError, match="must lie in"):
        Lookahead(peak=peak, steps_per_epoch=5, epochs=1)
