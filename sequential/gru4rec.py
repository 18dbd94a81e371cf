"""GRU4Rec sequence encoder: stacked GRUs over a user's item history.

Hidasi et al. 2016, "Session-based Recommendations with Recurrent Neural Networks".
The layer takes already-embedded items (the item tower owns the table) and returns one
vector per position; the vector at the newest item is the user's state.
"""

import tensorflow as tf

from sequential.dropout import GeneratorDropout


@tf.keras.utils.register_keras_serializable(package="towerrec")
class GRU4Rec(tf.keras.layers.Layer):
    """Embedding dropout then `num_layers` GRUs: [batch, seq, dim] -> [batch, seq, dim].

    The Keras mask skips padded steps (the state is carried over them), so left- and
    right-padded histories give the same vector at the newest item. Padded positions return
    zeros.
    """

    def __init__(
        self,
        dim: int,
        num_layers: int = 1,
        dropout: float = 0.25,
        num_event_types: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dim = dim
        self.num_layers = num_layers
        self.dropout_rate = dropout
        self.num_event_types = num_event_types
        self.dropout = GeneratorDropout(dropout)
        self.grus = [
            tf.keras.layers.GRU(dim, return_sequences=True, name=f"gru_{i}")
            for i in range(num_layers)
        ]

    def build(self, input_shape):
        if input_shape[-1] != self.dim:
            raise ValueError(
                f"GRU4Rec(dim={self.dim}) got sequence_embeddings of width {input_shape[-1]}"
            )
        if self.num_event_types:
            self.event_embeddings = self.add_weight(
                name="event_embeddings",
                shape=[self.num_event_types, self.dim],
                initializer="glorot_uniform",
            )
        for gru in self.grus:
            # Built now, not on first call, so saved weights load into a fresh instance.
            with tf.name_scope(gru.name):
                gru.build(tf.TensorShape([None, None, self.dim]))
        super().build(input_shape)

    def call(self, sequence_embeddings, padding_mask, event_types=None, training=None):
        if event_types is not None and not self.num_event_types:
            raise ValueError("GRU4Rec got event_types but was built with num_event_types=0")

        keep = padding_mask[:, :, None]  # [batch, seq, 1] bool
        x = tf.where(keep, sequence_embeddings, 0.0)  # [batch, seq, dim]
        if event_types is not None:
            x += tf.gather(self.event_embeddings, event_types)
        x = self.dropout(x, training=training)
        for gru in self.grus:
            x = gru(x, mask=padding_mask, training=training)  # [batch, seq, dim]
        return x * tf.cast(keep, x.dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "dim": self.dim,
            "num_layers": self.num_layers,
            "dropout": self.dropout_rate,
            "num_event_types": self.num_event_types,
        }
