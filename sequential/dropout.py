"""Dropout whose masks can come from a `tf.random.Generator` (set as `rng` by the model that
owns the layer): its state is a variable saved with the checkpoint, so a resumed run draws
the masks the uninterrupted run would have (training/resume.py). Without a generator it is
plain stateful dropout."""

import tensorflow as tf


class GeneratorDropout(tf.keras.layers.Layer):
    def __init__(self, rate: float, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.rng = None  # a tf.random.Generator, or None: stateful random ops

    def call(self, inputs: tf.Tensor, training=None) -> tf.Tensor:
        if not training or self.rate == 0.0:
            return inputs
        if self.rng is None:
            return tf.nn.dropout(inputs, rate=self.rate)
        seed = self.rng.make_seeds(1)[:, 0]
        return tf.nn.experimental.stateless_dropout(inputs, rate=self.rate, seed=seed)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}
