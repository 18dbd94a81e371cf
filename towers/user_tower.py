"""User tower: the user's recent items, embedded by the shared item tower, encoded by SASRec or
GRU4Rec at the shared dimension, optionally followed by a Dense projection.

The projection is off by default: SASRec's final LayerNorm output scored directly against the
item vectors (as in the paper) reached clearly higher NDCG@10 than with an extra Dense layer
(online-retail valid NDCG@10 0.218 vs 0.201, docs/results.md).

There is deliberately no user-id embedding: the tower must serve users it never saw and live
sessions from their item history alone, and a served model has no user-id input.
"""

from __future__ import annotations

import tensorflow as tf

from sequential import GRU4Rec, SASRec


class UserTower(tf.keras.layers.Layer):
    """(item vectors [batch, seq, dim], padding mask, event types) -> [batch, seq, dim]."""

    def __init__(self, kind: str, dim: int, max_len: int, num_blocks: int = 2,
                 num_heads: int = 1, dropout: float = 0.2, gru_layers: int = 1,
                 num_event_types: int = 0, layout: str = "sasrec", projection: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if kind not in ("sasrec", "gru"):
            raise ValueError(f"user tower must be 'sasrec' or 'gru', got {kind!r}")
        self.kind, self.dim, self.max_len = kind, dim, max_len
        self.num_blocks, self.num_heads, self.dropout = num_blocks, num_heads, dropout
        self.gru_layers, self.num_event_types = gru_layers, num_event_types
        self.layout, self.use_projection = layout, projection
        if kind == "sasrec":
            self.encoder = SASRec(dim=dim, max_len=max_len, num_blocks=num_blocks,
                                  num_heads=num_heads, dropout=dropout,
                                  num_event_types=num_event_types, layout=layout,
                                  name="sasrec")
        else:
            self.encoder = GRU4Rec(dim=dim, num_layers=gru_layers, dropout=dropout,
                                   num_event_types=num_event_types, name="gru4rec")
        self.projection = (tf.keras.layers.Dense(dim, name="user_projection") if projection
                           else None)

    def call(self, item_vectors: tf.Tensor, padding_mask: tf.Tensor,
             event_types: tf.Tensor | None = None, training: bool | None = None) -> tf.Tensor:
        encoded = self.encoder(item_vectors, padding_mask, event_types=event_types,
                               training=training)  # [batch, seq, dim]
        if self.projection is not None:
            encoded = self.projection(encoded)  # [batch, seq, dim]
        return encoded

    def attention_weights(self, item_vectors: tf.Tensor, padding_mask: tf.Tensor,
                          event_types: tf.Tensor | None = None) -> list[tf.Tensor]:
        """SASRec's attention in inference mode, one [batch, heads, query, key] tensor per
        block: a real query's row sums to 1 over the real keys up to it, padding is 0."""
        if self.kind != "sasrec":
            raise ValueError(f"a {self.kind} user tower has no attention weights")
        _, weights = self.encoder(item_vectors, padding_mask, event_types=event_types,
                                  training=False, return_attention=True)
        return weights

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "dim": self.dim,
                "max_len": self.max_len, "num_blocks": self.num_blocks,
                "num_heads": self.num_heads, "dropout": self.dropout,
                "gru_layers": self.gru_layers, "num_event_types": self.num_event_types,
                "layout": self.layout, "projection": self.use_projection}
