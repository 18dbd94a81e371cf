"""Optimizers: Adam, and a lazy Adam whose sparse updates touch only the rows in the batch.

With a sampled softmax only a few thousand rows of the item table get a gradient per step, but
tf-keras Adam applies a sparse gradient to the whole table and both of its slots (decaying every
row's moments, moving every row), so a step costs O(catalog). `LazyAdam` applies Adam's update
to the gathered rows only, as TensorFlow Addons' LazyAdam did: rows absent from a batch keep
their weights and moments untouched. Dense gradients (every layer but the embedding tables)
get the ordinary Adam update.
"""

from __future__ import annotations

import tensorflow as tf

OPTIMIZERS = ("auto", "adam", "lazy_adam")


class LazyAdam(tf.keras.optimizers.Adam):
    """Adam; an IndexedSlices gradient (a gathered embedding table) updates only its rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.amsgrad:
            raise ValueError("LazyAdam does not support amsgrad")

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        # The base optimizer has summed duplicate indices already.
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1_power = tf.pow(tf.cast(self.beta_1, dtype), local_step)
        beta_2_power = tf.pow(tf.cast(self.beta_2, dtype), local_step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        epsilon = self.epsilon * tf.sqrt(1 - beta_2_power) if self.adaptive_epsilon \
            else self.epsilon

        key = self._var_key(variable)
        m = self._momentums[self._index_dict[key]]
        v = self._velocities[self._index_dict[key]]
        rows, values = gradient.indices, tf.cast(gradient.values, dtype)  # [r], [r, ...]
        # Adam's dense formulas, literally (same constants, same rounding), on the touched rows.
        m_old, v_old = tf.gather(m, rows), tf.gather(v, rows)
        m_rows = m_old + (values - m_old) * (1 - self.beta_1)
        v_rows = v_old + (tf.square(values) - v_old) * (1 - self.beta_2)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices((m_rows * alpha) / (tf.sqrt(v_rows) + epsilon),
                                              rows))


def resolve_optimizer(name: str, retrieval_mode: str) -> str:
    """`auto`: lazy updates when retrieval is sampled (few rows per step); dense Adam with a
    full softmax, which touches every row anyway."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if name != "auto":
        return name
    return "lazy_adam" if retrieval_mode == "sampled" else "adam"


def make_optimizer(name: str, lr: float, beta_2: float) -> tf.keras.optimizers.Optimizer:
    """The optimizer by resolved name, loss-scaled under mixed precision. Call it inside the
    strategy scope."""
    kind = LazyAdam if name == "lazy_adam" else tf.keras.optimizers.Adam
    optimizer = kind(lr, beta_2=beta_2)
    if tf.keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer
