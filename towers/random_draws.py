"""Where a training step's random numbers come from (id dropout's seed, sampled negatives).

By default TensorFlow's stateful random ops, whose position in their stream lives in the op
kernels and is lost with the process. A run that can be resumed (training/resume.py) gives
the model a `tf.random.Generator` instead: its state is a variable, saved with the
model's checkpoint, so a resumed run draws the numbers the uninterrupted run would have.
"""

from __future__ import annotations

import tensorflow as tf


def uniform_draws(rng: tf.random.Generator | None, shape, minval, maxval, dtype) -> tf.Tensor:
    """Uniform draws from `rng`, or from a stateful op when there is none."""
    if rng is None:
        return tf.random.uniform(shape, minval, maxval, dtype)
    return rng.uniform(shape, minval, maxval, dtype)
