"""Lookahead as airbench trains with it: every few steps the weights move back towards a slow
running average of themselves, more strongly as training ends."""
from __future__ import annotations

import keras

SYNC_EVERY = 5  # steps between syncs, airbench's


class Lookahead(keras.callbacks.Callback):
    """Every `SYNC_EVERY` steps and at the last step of each epoch: slow = decay * slow +
    (1 - decay) * weights, then weights = slow, over all of the model's weights (BatchNorm
    statistics included, as airbench averages them). `decay` rises as
    `peak * (step / total_steps) ** 3`: off early, when the weights must move, strongest at the end.

    Syncing at each epoch's last step makes the weights equal the slow average at every epoch
    boundary, so validation and checkpoints see them, and a resumed run restarts the average
    from the restored weights exactly as the uninterrupted run continues it: nothing extra to save.
    """

    def __init__(self, *, peak: float, steps_per_epoch: int, epochs: int):
        super().__init__()
        if not 0 < peak < 1:
            raise ValueError(f"lookahead peak decay must lie in (0, 1), got {peak}")
        self.peak, self.steps_per_epoch, self.total_steps = peak, steps_per_epoch, steps_per_epoch * epochs
        self.epoch, self.slow = 0, []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.slow = [keras.ops.copy(w.value) for w in self.model.weights]

    def on_train_batch_end(self, batch, logs=None):
        last = batch + 1 == self.steps_per_epoch
        if (batch + 1) % SYNC_EVERY and not last:
            return
        step = self.epoch * self.steps_per_epoch + batch + 1
        decay = self.peak * (step / self.total_steps) ** 3
        for i, weight in enumerate(self.model.weights):
            slow = decay * self.slow[i] + (1 - decay) * weight.value
            weight.assign(slow)
            self.slow[i] = slow
