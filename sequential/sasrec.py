"""SASRec sequence encoder: causal self-attention over a user's item history.

Kang & McAuley 2018, "Self-Attentive Sequential Recommendation". LayerNorm comes before the
attention (on its query) and before the feed-forward layer, as in the authors' code; a standard
pre-LayerNorm transformer block is the `pre_ln` option (it trained to lower NDCG here, see the
docs/results.md).
The layer takes already-embedded items (the item tower owns the table) and returns one
vector per position; the vector at the newest item is the user's state.
"""

import math

import tensorflow as tf

from sequential.dropout import GeneratorDropout
from sequential.masks import causal_attention_bias, positions_from_newest


def _build_in_scope(layer: tf.keras.layers.Layer, width: int) -> None:
    """Build a sub-layer now, not on first call, so saved weights load into a fresh instance;
    the name scope keeps its variable names unique (`sas_rec/block_0/qkv/kernel`)."""
    with tf.name_scope(layer.name):
        layer.build(tf.TensorShape([None, None, width]))


LAYOUTS = ("sasrec", "pre_ln")


class _SelfAttentionBlock(tf.keras.layers.Layer):
    """One block in one of two layouts.

    `pre_ln` (standard pre-LayerNorm transformer):
        x = x + Attn(LN(x)); x = x + FFN(LN(x))
    `sasrec` (the layout of the SASRec authors' code: only the query is normalised, and the
    residual stream is re-normalised before the feed-forward layer):
        q = LN(x); x = q + Attn(q, keys and values from x); x = LN(x); x = x + FFN(x)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        epsilon: float,
        layout: str = "sasrec",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.layout = layout
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        norm = tf.keras.layers.LayerNormalization
        self.attention_norm = norm(epsilon=epsilon, name="attention_norm")
        # All heads' queries, keys and values in one matmul.
        self.qkv = tf.keras.layers.Dense(3 * dim, name="qkv")
        self.attention_output = tf.keras.layers.Dense(dim, name="attention_output")
        self.ffn_norm = norm(epsilon=epsilon, name="ffn_norm")
        self.ffn_hidden = tf.keras.layers.Dense(ffn_dim, activation="relu", name="ffn_hidden")
        self.ffn_output = tf.keras.layers.Dense(dim, name="ffn_output")
        self.dropout = GeneratorDropout(dropout)

    def build(self, input_shape):
        for layer, width in [
            (self.attention_norm, self.dim),
            (self.qkv, self.dim),
            (self.attention_output, self.dim),
            (self.ffn_norm, self.dim),
            (self.ffn_hidden, self.dim),
            (self.ffn_output, self.ffn_hidden.units),
        ]:
            _build_in_scope(layer, width)
        super().build(input_shape)

    def call(self, x, attention_bias, keep, training=None):
        """-> (x [batch, seq, dim], attention weights [batch, heads, seq, seq] float32)."""
        if self.layout == "sasrec":
            query = self.attention_norm(x)
            attended, weights = self._attend(query, attention_bias, training, kv_input=x)
            x = self.ffn_norm(query + attended)
            h = self.dropout(self.ffn_hidden(x), training=training)  # [batch, seq, ffn]
        else:
            h = self.attention_norm(x)
            attended, weights = self._attend(h, attention_bias, training)
            x = x + attended
            h = self.dropout(self.ffn_hidden(self.ffn_norm(x)), training=training)
        x = x + self.dropout(self.ffn_output(h), training=training)  # [batch, seq, dim]
        return x * keep, weights  # padded positions back to zero

    def _project(self, h, columns: slice | None, parts: int):
        """h @ qkv[:, columns]: [batch, seq, dim] -> [parts, batch, heads, seq, head_dim]."""
        batch, seq = tf.shape(h)[0], tf.shape(h)[1]
        if columns is None:
            out = self.qkv(h)
        else:
            kernel = tf.cast(self.qkv.kernel[:, columns], h.dtype)
            out = tf.matmul(h, kernel) + tf.cast(self.qkv.bias[columns], h.dtype)
        out = tf.reshape(out, [batch, seq, parts, self.num_heads, self.head_dim])
        return tf.transpose(out, [2, 0, 3, 1, 4])

    def _attend(self, query_input, attention_bias, training, kv_input=None):
        """Causal attention; keys and values from `kv_input`, or from `query_input` if None.
        Returns the output and the softmax weights (before dropout)."""
        batch, seq = tf.shape(query_input)[0], tf.shape(query_input)[1]
        if kv_input is None:  # all heads' queries, keys and values in one matmul
            q, k, v = tf.unstack(self._project(query_input, None, 3))
        else:
            q = self._project(query_input, slice(0, self.dim), 1)[0]
            k, v = tf.unstack(self._project(kv_input, slice(self.dim, None), 2))
        q = q * (1.0 / math.sqrt(self.head_dim))
        scores = tf.matmul(q, k, transpose_b=True)  # [batch, heads, seq, seq]
        # Softmax in float32: the -1e9 bias overflows float16 under mixed precision.
        weights = tf.nn.softmax(tf.cast(scores, tf.float32) + attention_bias)
        dropped = self.dropout(tf.cast(weights, query_input.dtype), training=training)
        out = tf.matmul(dropped, v)  # [batch, heads, seq, hd]
        out = tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [batch, seq, self.dim])
        return self.attention_output(out), weights  # [batch, seq, dim]


@tf.keras.utils.register_keras_serializable(package="towerrec")
class SASRec(tf.keras.layers.Layer):
    """Causal self-attention encoder: [batch, seq, dim] item vectors -> [batch, seq, dim].

    Positional embeddings are indexed by the distance from the newest real item, so the same
    history left-padded, right-padded or padded to another length gives the same vector at its
    newest item (and training windows agree with serving). For left-padded windows of length
    `max_len` this equals the paper's absolute positions. Padded positions return zeros.
    """

    def __init__(
        self,
        dim: int,
        max_len: int,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        num_event_types: int = 0,
        ffn_dim: int | None = None,
        epsilon: float = 1e-8,
        layout: str = "sasrec",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"SASRec: layout must be one of {LAYOUTS}, got {layout!r}")
        if dim % num_heads:
            raise ValueError(f"SASRec: dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.max_len = max_len
        self.num_blocks = num_blocks
        self.num_heads = num_heads
        self.dropout_rate = dropout
        self.num_event_types = num_event_types
        self.ffn_dim = ffn_dim or dim
        self.epsilon = epsilon
        self.layout = layout
        self.dropout = GeneratorDropout(dropout)
        self.blocks = [
            _SelfAttentionBlock(
                dim, num_heads, self.ffn_dim, dropout, epsilon, layout, name=f"block_{i}"
            )
            for i in range(num_blocks)
        ]
        self.final_norm = tf.keras.layers.LayerNormalization(epsilon=epsilon, name="final_norm")

    def build(self, input_shape):
        if input_shape[-1] != self.dim:
            raise ValueError(
                f"SASRec(dim={self.dim}) got sequence_embeddings of width {input_shape[-1]}"
            )
        self.position_embeddings = self.add_weight(
            name="position_embeddings", shape=[self.max_len, self.dim], initializer="glorot_uniform"
        )
        if self.num_event_types:
            self.event_embeddings = self.add_weight(
                name="event_embeddings",
                shape=[self.num_event_types, self.dim],
                initializer="glorot_uniform",
            )
        for layer in [*self.blocks, self.final_norm]:
            _build_in_scope(layer, self.dim)
        super().build(input_shape)

    def call(self, sequence_embeddings, padding_mask, event_types=None, training=None,
             return_attention=False):
        """With `return_attention`, also each block's attention weights (before dropout), a list
        of [batch, heads, query, key]: a real query's row sums to 1 over the real keys up to it,
        padded keys and padded queries' rows are 0. The output is the same either way."""
        seq_len = sequence_embeddings.shape[1]
        if seq_len is not None and seq_len > self.max_len:
            raise ValueError(f"SASRec(max_len={self.max_len}) got sequences of length {seq_len}")
        if event_types is not None and not self.num_event_types:
            raise ValueError("SASRec got event_types but was built with num_event_types=0")

        keep = padding_mask[:, :, None]  # [batch, seq, 1] bool
        # tf.where, not a product, so arbitrary (even NaN) values at padded positions vanish.
        x = tf.where(keep, sequence_embeddings * math.sqrt(self.dim), 0.0)  # [batch, seq, dim]
        positions = tf.where(padding_mask, positions_from_newest(padding_mask), 0)
        x += tf.gather(self.position_embeddings, positions)
        if event_types is not None:
            x += tf.gather(self.event_embeddings, event_types)
        keep = tf.cast(keep, x.dtype)
        x = self.dropout(x, training=training) * keep

        attention_bias = causal_attention_bias(padding_mask)  # [batch, 1, seq, seq]
        attention = []
        for block in self.blocks:
            x, weights = block(x, attention_bias, keep, training=training)
            attention.append(weights)
        x = self.final_norm(x) * keep  # [batch, seq, dim]
        if not return_attention:
            return x
        # A padded query sees no key, so its softmax row is uniform: zero it.
        real_queries = tf.cast(padding_mask, tf.float32)[:, None, :, None]
        return x, [weights * real_queries for weights in attention]

    def get_config(self):
        return {
            **super().get_config(),
            "dim": self.dim,
            "max_len": self.max_len,
            "num_blocks": self.num_blocks,
            "num_heads": self.num_heads,
            "dropout": self.dropout_rate,
            "num_event_types": self.num_event_types,
            "ffn_dim": self.ffn_dim,
            "epsilon": self.epsilon,
            "layout": self.layout,
        }
