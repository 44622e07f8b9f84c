"""Layers of the `fast` net, written for speed on CPUs (TensorFlow backend).

Keras' own BatchNormalization and GELU each run as a chain of small ops, one
pass over the activations apiece; on a 2-core CPU those passes cost as much as
the convolutions. Here BatchNorm is TensorFlow's fused kernel (one op, oneDNN's
on CPUs, cuDNN's on GPUs) and GELU one XLA-compiled function (forward and
backward each one fused loop): a training step of the fast net in mixed
bfloat16 runs 24% faster here (README, "Speed on CPU"). XLA for the whole model
is slower on CPUs, as XLA's convolutions there are not oneDNN's.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers


@tf.function(jit_compile=True)
def _exact_gelu(x):
    return tf.nn.gelu(x, approximate=False)


@keras.saving.register_keras_serializable("cifar_pipeline")
class FusedGelu(layers.Layer):
    """GELU (the exact, erf form) as one XLA-compiled op."""

    def call(self, x):
        return _exact_gelu(x)


@keras.saving.register_keras_serializable("cifar_pipeline")
class ShiftBatchNorm(layers.Layer):
    """BatchNorm with no scale, only a learned per-channel shift, as one fused op.

    The next convolution's weights absorb a scale. The shift is stored as
    `shift / shift_scale`: under SGD a weight stored divided by s learns s**2
    times faster (its gradient and its effect both grow by s), while decoupled
    weight decay shrinks it at the usual rate. airbench trains its BatchNorm
    biases 64x faster than its conv weights; shift_scale 8 gives that with one
    optimizer. Moving statistics follow `momentum` as in Keras' BatchNormalization.
    """

    def __init__(self, shift_scale: float = 1.0, momentum: float = 0.99, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.shift_scale = shift_scale
        self.momentum = momentum
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = (input_shape[-1],)
        # float32 even under mixed precision: the fused kernel takes its statistics in float32.
        self.stored_shift = self.add_weight(shape=channels, initializer="zeros", name="stored_shift",
                                            autocast=False)
        self.moving_mean = self.add_weight(shape=channels, initializer="zeros", trainable=False,
                                           name="moving_mean", autocast=False)
        self.moving_variance = self.add_weight(shape=channels, initializer="ones", trainable=False,
                                               name="moving_variance", autocast=False)

    def call(self, x, training=False):
        ones = tf.ones_like(self.moving_mean.value)
        shift = self.shift_scale * self.stored_shift.value
        # In training, with the moving statistics passed in, the kernel normalises with the
        # batch's and returns the moving ones already updated; in inference it uses them.
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, ones, shift, mean=self.moving_mean.value, variance=self.moving_variance.value,
            epsilon=self.epsilon, is_training=bool(training), exponential_avg_factor=1.0 - self.momentum)[:3]
        if training:
            self.moving_mean.assign(mean)
            self.moving_variance.assign(variance)
        return y

    def get_config(self):
        return {**super().get_config(), "shift_scale": self.shift_scale, "momentum": self.momentum,
                "epsilon": self.epsilon}


@keras.saving.register_keras_serializable("cifar_pipeline")
class PartialIdentity(keras.initializers.Initializer):
    """Glorot-uniform conv kernels whose first min(in, out) filters pass their own
    input channel through unchanged (a Dirac delta, nothing from other channels),
    so a fresh deep stack starts close to the identity and trains from the first step."""

    def __call__(self, shape, dtype=None):
        height, width, channels_in, channels_out = shape
        kernel = keras.ops.convert_to_numpy(keras.initializers.GlorotUniform()(shape, "float32"))
        n = min(channels_in, channels_out)
        kernel[..., :n] = 0.0
        kernel[height // 2, width // 2, np.arange(n), np.arange(n)] = 1.0
        return keras.ops.convert_to_tensor(kernel, dtype=dtype)
