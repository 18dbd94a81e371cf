"""Padding masks and positions for item sequences.

Sequences may be left- or right-padded with item id 0; the encoders take a boolean mask
(True = real item) and index positions from the newest item so both paddings encode alike.
"""

import tensorflow as tf


def padding_mask_from_ids(ids: tf.Tensor) -> tf.Tensor:
    """True where `ids` holds a real item (id 0 is padding). [batch, seq] -> [batch, seq] bool."""
    return tf.not_equal(ids, tf.zeros_like(ids))


def positions_from_newest(padding_mask: tf.Tensor) -> tf.Tensor:
    """Number of real items after each position: 0 for the newest item. [batch, seq] int32.

    Values at padded positions are meaningless; callers zero those positions.
    """
    return tf.cumsum(tf.cast(padding_mask, tf.int32), axis=1, exclusive=True, reverse=True)


def causal_attention_bias(padding_mask: tf.Tensor) -> tf.Tensor:
    """Additive attention bias: query i sees key j iff j <= i and key j is real.

    [batch, seq] bool -> [batch, 1, seq, seq] float32 (0 where allowed, -1e9 where not).
    A finite bias (not -inf) keeps a query row with no visible key finite: its softmax is
    uniform instead of NaN, and the caller zeroes that padded row afterwards.
    """
    index = tf.range(tf.shape(padding_mask)[1])
    causal = index[:, None] >= index[None, :]  # [seq, seq]
    allowed = tf.logical_and(causal[None, :, :], padding_mask[:, None, :])  # [batch, seq, seq]
    return (1.0 - tf.cast(allowed, tf.float32))[:, None, :, :] * -1e9  # [batch, 1, seq, seq]
