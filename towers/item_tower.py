"""Item tower: item vector = id embedding + projected text embedding + metadata embeddings,
and, with the content term on, the item's weighted unit text vector and a bias beside it:
[v_i ; g_i c_i ; b_i] (see ContentWeight).

Item features (text vectors or token ids, category, brand, price bucket, which items were seen
in training) live in non-trainable tables indexed by item_idx, filled once by `set_item_features`.
Items never seen in training (cold items) get no id embedding, only text and metadata: that is
what the text tower is for. The tables may be ShardedVariables (parameter-server training):
rows are read with `tf.nn.embedding_lookup`, see `rows`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from towers.random_draws import uniform_draws
from towers.text_encoder import pool_hidden_states


class ItemTower(tf.keras.layers.Layer):
    """item_idx [...] -> item vector [..., dim]. Index 0 is padding and maps to zeros."""

    def __init__(self, num_items: int, dim: int, text_dim: int = 0, num_categories: int = 0,
                 num_brands: int = 0, num_price_buckets: int = 0, text_tokens: int = 0,
                 id_dropout: float = 0.0, text_experts: int = 0, content_term: bool = False,
                 content_beta: float = 2.0, id_max_norm: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        # > 0: each id embedding row is clipped to this norm, so a warm item's vector is its
        # text + metadata vector plus a bounded offset (Let It Go, RecSys 2025); 0 = unbounded.
        self.id_max_norm = id_max_norm
        # The content term (see ContentWeight): item vectors end with [g_i c_i ; b_i], query
        # vectors with [beta c_u ; 1] (c the unit text vectors, c_u the newest history item's),
        # so every score holds beta * g_i * cosine(c_u, c_i) + b_i exactly: the text-kNN
        # baseline is the model with its id and sequence terms at zero. Frozen text only.
        self.content_term = bool(content_term and text_dim and not text_tokens)
        self.content_beta = content_beta  # beta at initialisation
        # 0: one Dense projection of the text vector; n > 0: a mixture of n parametric-whitening
        # experts ((x - b_i) W_i, softmax-gated by x; UniSRec's adaptor for frozen text).
        self.text_experts = text_experts
        # Share of items per training step whose id embedding is left out (DropoutNet, Volkovs
        # et al. 2017): the text + metadata path learns to stand alone, as it must for items
        # never seen in training.
        self.id_dropout = id_dropout
        self.rng = None  # set by TwoTowerModel.seed_generator (towers/random_draws.py)
        self.num_items = num_items  # real items are 1..num_items
        self.dim = dim
        self.text_dim = text_dim  # width of text vectors (0 = no text)
        self.num_categories = num_categories
        self.num_brands = num_brands
        self.num_price_buckets = num_price_buckets
        self.text_tokens = text_tokens  # >0: finetune mode, token ids stored, encoder in graph
        self.text_encoder: tf.keras.Model | None = None

    @property
    def score_dim(self) -> int:
        """Width of the vectors that are scored: dim, plus text_dim + 1 with the content term."""
        return self.dim + (self.text_dim + 1 if self.content_term else 0)

    def attach_text_encoder(self, encoder: tf.keras.Model, pooling: str,
                            trainable_layers: int) -> None:
        """Finetune mode: run the Hugging Face encoder inside the graph on the items needed."""
        self.text_encoder = encoder
        self.pooling = pooling
        layers = _transformer_layers(encoder)
        encoder.trainable = True
        for i, layer in enumerate(layers):
            layer.trainable = i >= len(layers) - trainable_layers
        for layer in _embedding_layers(encoder):
            layer.trainable = False

    def build(self, input_shape):
        rows = self.num_items + 1
        def init():  # a fresh initializer per table, so tables don't start identical
            return tf.keras.initializers.TruncatedNormal(stddev=0.02)

        self.id_embedding = self.add_weight("id_embedding", [rows, self.dim], initializer=init())
        # 1 for items seen in training, 0 for cold items: only the former have an id embedding.
        self.seen_in_training = self.add_weight("seen_in_training", [rows], initializer="zeros",
                                                trainable=False)
        if self.text_dim and not self.text_tokens:
            self.text_table = self.add_weight("text_table", [rows, self.text_dim],
                                              initializer="zeros", trainable=False)
        if self.text_tokens:
            self.token_table = self.add_weight("token_table", [rows, self.text_tokens],
                                               dtype=tf.int32, initializer="zeros",
                                               trainable=False)
        if self.text_dim and self.text_experts:
            n, d = self.text_experts, self.text_dim
            self.expert_bias = self.add_weight("expert_bias", [n, d], initializer="zeros")
            self.expert_kernel = self.add_weight("expert_kernel", [n, d, self.dim],
                                                 initializer=init())
            self.expert_gate = self.add_weight("expert_gate", [d, n], initializer="zeros")
        elif self.text_dim:
            # Small init: the text term starts on the scale of the id embeddings, so the
            # pretrained vectors don't swamp SASRec's sqrt(dim)-scaled inputs.
            self.text_projection = tf.keras.layers.Dense(
                self.dim, kernel_initializer=init(), name="text_projection")
            with tf.name_scope("text_projection"):  # weights now, inside any strategy scope
                self.text_projection.build((None, self.text_dim))
        if self.content_term:
            self.log_count = self.add_weight("log_count", [rows], initializer="zeros",
                                             trainable=False)
        if self.content_term:
            self.content = ContentWeight(self.content_beta, name="content_weight")
            with tf.name_scope("content_weight"):
                self.content.build(None)
        self.meta_tables = {}
        for name, size in (("category", self.num_categories), ("brand", self.num_brands),
                           ("price_bucket", self.num_price_buckets)):
            if size:
                self.meta_tables[name] = (
                    self.add_weight(f"{name}_of_item", [rows], dtype=tf.int32,
                                    initializer="zeros", trainable=False),
                    self.add_weight(f"{name}_embedding", [size + 1, self.dim], initializer=init()))
        super().build(input_shape)

    def set_item_features(self, seen_in_training: np.ndarray, text: np.ndarray | None = None,
                          tokens: np.ndarray | None = None,
                          meta: dict[str, np.ndarray] | None = None,
                          train_counts: np.ndarray | None = None) -> None:
        """Fill the feature tables; every array has num_items + 1 rows (row 0 = padding).
        `train_counts` (training interactions per item) feeds the content term."""
        if not self.built:
            self.build(None)
        self.seen_in_training.assign(seen_in_training.astype(np.float32))
        if self.content_term:
            if train_counts is None:
                raise ValueError("the content term needs the items' training counts")
            self.log_count.assign(np.log1p(train_counts.astype(np.float64)).astype(np.float32))
        if self.text_dim and not self.text_tokens:
            self.text_table.assign(unit_rows(text))
        if self.text_tokens:
            self.token_table.assign(tokens.astype(np.int32))
        for name, (table, _) in self.meta_tables.items():
            table.assign(meta[name].astype(np.int32))

    def text_vectors(self, flat_ids: tf.Tensor) -> tf.Tensor:
        """Unit-length text vectors of item ids [n] -> [n, text_dim]: the frozen table, or the
        fine-tuned encoder run on each distinct item once."""
        if self.text_tokens and self.text_encoder is not None:
            # Encode each distinct item once per call, then scatter back.
            unique, position = tf.unique(flat_ids)
            tokens = rows(self.token_table, unique)  # [u, tokens]
            mask = tf.cast(tokens != 0, tf.int32)
            hidden = self.text_encoder(input_ids=tokens, attention_mask=mask,
                                       training=False).last_hidden_state
            pooled = pool_hidden_states(hidden, mask, self.pooling)  # [u, hidden]
            return tf.gather(tf.math.l2_normalize(pooled, axis=-1), position)
        return rows(self.text_table, flat_ids)

    def project_text(self, text: tf.Tensor) -> tf.Tensor:
        """Text vectors [n, text_dim] -> the item tower's space [n, dim]."""
        if not self.text_experts:
            return self.text_projection(text)
        dtype = text.dtype
        whitened = text[:, None, :] - tf.cast(self.expert_bias, dtype)[None]  # [n, e, d]
        experts = tf.einsum("ned,edk->nek", whitened, tf.cast(self.expert_kernel, dtype))
        gate = tf.nn.softmax(tf.matmul(text, tf.cast(self.expert_gate, dtype)))  # [n, e]
        return tf.einsum("nek,ne->nk", experts, gate)

    def has_id(self, ids: tf.Tensor, drop_seed: tf.Tensor | None = None) -> tf.Tensor:
        """1.0 for each item id [n] whose id embedding is used this step (seen in training and
        not id-dropped), else 0.0: [n]."""
        seen = rows(self.seen_in_training, ids)
        if drop_seed is not None:
            seen *= tf.cast(_hash_uniform(ids, drop_seed) >= self.id_dropout, seen.dtype)
        return seen

    def content_parts(self, history: tf.Tensor, drop_seed: tf.Tensor | None = None
                      ) -> tuple[tf.Tensor, tf.Tensor] | None:
        """The query's content term after each position of left-padded histories [batch, seq]:
        (beta [batch, seq], unit text vector of the item at that position [batch, seq,
        text_dim]), beta from what the query knows there (ContentWeight): the item's training
        count counts as 0 when its id is dropped, as a never-trained item's is. None when off."""
        if not self.content_term:
            return None
        ids = tf.cast(history, tf.int32)
        flat = tf.reshape(ids, [-1])
        text = tf.reshape(self.text_vectors(flat), tf.concat([tf.shape(ids), [-1]], axis=0))
        log_count = rows(self.log_count, flat) * self.has_id(flat, drop_seed)
        return self.content.beta(tf.reshape(log_count, tf.shape(ids)), ids > 0), text

    def dropout_seed(self) -> tf.Tensor | None:
        """A fresh seed for one training step's id dropout (None when it is off): every call
        of the step passes it, so an item loses its id embedding everywhere in the step (as
        input, target and negative) or nowhere."""
        if not self.id_dropout:
            return None
        return uniform_draws(self.rng, [], 0, 2**31 - 1, tf.int64)

    def call(self, item_idx: tf.Tensor, drop_seed: tf.Tensor | None = None) -> tf.Tensor:
        shape = tf.shape(item_idx)
        ids = tf.reshape(tf.cast(item_idx, tf.int32), [-1])  # [n]
        seen = self.has_id(ids, drop_seed)[:, None]  # [n, 1]
        vectors = rows(self.id_embedding, ids)  # [n, dim]
        if self.id_max_norm:
            vectors = tf.clip_by_norm(vectors, self.id_max_norm, axes=[1])
        text = self.text_vectors(ids) if self.text_dim else None
        meta = {name: rows(table, ids) for name, (table, _) in self.meta_tables.items()}
        # An item without its id this step (never trained, or dropped) has count 0.
        log_count = (rows(self.log_count, ids) * seen[:, 0]
                     if self.content_term else None)
        vectors = self.compose(vectors * seen, text, meta, log_count)
        vectors *= tf.cast(ids > 0, vectors.dtype)[:, None]  # padding -> zeros
        return tf.reshape(vectors, tf.concat([shape, [self.score_dim]], axis=0))

    def compose(self, id_vectors: tf.Tensor, text: tf.Tensor | None,
                meta: dict[str, tf.Tensor], log_count: tf.Tensor | None) -> tf.Tensor:
        """An item's scored vector from its parts, [n, score_dim]: the id embedding rows
        [n, dim] (zeros for an item without one), unit text vectors [n, text_dim] (None
        without text), metadata codes {name: [n]} and log(1 + training count) [n] (0 without
        an id; None without the content term, which alone reads it). Training and the
        exported item tower (export/signatures.py ItemTowerModule, which places items the
        model never saw) both come here, so a new item gets the computation a never-trained
        catalog item got."""
        vectors = id_vectors
        if self.text_dim:
            text = tf.cast(text, self.compute_dtype)
            vectors += tf.cast(self.project_text(text), vectors.dtype)
        for name, (_, embedding) in self.meta_tables.items():
            vectors += rows(embedding, meta[name])
        if self.content_term:  # [n, dim + text_dim + 1]: [v ; g c ; b], c unprojected
            weight, bias = self.content.item_terms(log_count)
            vectors = tf.concat([vectors, tf.cast(weight[:, None] * text, vectors.dtype),
                                 tf.cast(bias[:, None], vectors.dtype)], axis=1)
        return vectors

    def get_config(self):
        return {**super().get_config(), "num_items": self.num_items, "dim": self.dim,
                "text_dim": self.text_dim, "num_categories": self.num_categories,
                "num_brands": self.num_brands, "num_price_buckets": self.num_price_buckets,
                "text_tokens": self.text_tokens, "id_dropout": self.id_dropout,
                "text_experts": self.text_experts, "content_term": self.content_term,
                "content_beta": self.content_beta, "id_max_norm": self.id_max_norm}


class ContentWeight(tf.keras.layers.Layer):
    """The content term's weights. Score = u . v_i + beta_u * g_i * cosine(c_u, c_i) + b_i:

    - beta_u = softplus(w0 + w1 * x_u + w2 * log(1 + history length)), x_u = log(1 + training
      count) of the newest history item: a query that knows little may lean more on text;
    - g_i = softplus(a0 + a1 * x_i) and b_i = bias * [x_i = 0], x_i the candidate's log(1 +
      training count), 0 for an item without its id embedding (never trained, or id-dropped
      this step): how much text likeness counts for an item, and where items the model knows
      only by text and metadata sit against the others (calibration: id dropout trains both on
      warm items standing in for cold ones).

    Start: beta = beta_init and g = 1 everywhere, b = 0; the id and sequence terms start near
    zero, so step 0 ranks as the text-kNN baseline. Float32 under any precision policy.
    """

    def __init__(self, beta_init: float = 2.0, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.beta_init = beta_init

    def build(self, input_shape):
        def start(values):
            return tf.keras.initializers.Constant(values)

        self.w = self.add_weight("w", [3], initializer=start(
            [_softplus_inverse(self.beta_init), 0.0, 0.0]))
        self.item_w = self.add_weight("item_w", [2], initializer=start(
            [_softplus_inverse(1.0), 0.0]))
        self.no_id_bias = self.add_weight("no_id_bias", [], initializer="zeros")
        super().build(input_shape)

    def beta(self, log_count: tf.Tensor, real: tf.Tensor) -> tf.Tensor:
        """log_count, real [batch, seq] (left-padded) -> beta [batch, seq] (padding: 0)."""
        length = tf.cumsum(tf.cast(real, tf.float32), axis=-1)  # items up to each position
        x = self.w[0] + self.w[1] * tf.cast(log_count, tf.float32) + self.w[2] * tf.math.log1p(
            length)
        return tf.nn.softplus(x) * tf.cast(real, tf.float32)

    def item_terms(self, log_count: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """log(1 + training count) of items [n] (0: no id) -> (g [n], b [n])."""
        x = tf.cast(log_count, tf.float32)
        weight = tf.nn.softplus(self.item_w[0] + self.item_w[1] * x)
        bias = self.no_id_bias * tf.cast(tf.equal(x, 0.0), tf.float32)
        return weight, bias

    def query(self, beta: tf.Tensor, text: tf.Tensor, real: tf.Tensor) -> tf.Tensor:
        """beta [batch, seq], unit text [batch, seq, d] -> [beta c ; 1] [batch, seq, d + 1]."""
        return tf.concat([beta[..., None] * tf.cast(text, tf.float32),
                          tf.cast(real, tf.float32)[..., None]], axis=-1)

    def get_config(self):
        return {**super().get_config(), "beta_init": self.beta_init}


def split_content(vectors: tf.Tensor, dim: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Scored item vectors [..., dim + t + 1] = [v ; g c ; b] -> (g [...], c [..., t], b [...]),
    in float32. g > 0 and c is a unit vector (zero for an item without text), so g and c are
    the length and direction of g c; the one reader of the layout `call` writes."""
    scaled = tf.cast(vectors[..., dim:-1], tf.float32)
    weight = tf.sqrt(tf.reduce_sum(tf.square(scaled), axis=-1) + 1e-12)  # finite gradient at 0
    return weight, scaled / weight[..., None], tf.cast(vectors[..., -1], tf.float32)


def _softplus_inverse(value: float) -> float:
    return float(np.log(np.expm1(value)))


def _hash_uniform(ids: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """A value in [0, 1) per id, the same for equal ids under one seed (an integer mix of the
    two: cheap, no table the size of the catalog)."""
    x = tf.cast(ids, tf.int64) * 2654435761 + seed
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15)) * 2246822519
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 13))
    return tf.cast(tf.math.floormod(x, 1 << 24), tf.float32) / float(1 << 24)


def rows(table: tf.Variable, ids: tf.Tensor) -> tf.Tensor:
    """table[ids]. A ShardedVariable's `tf.gather` (its sparse_read) returns the rows grouped
    by shard, not in the order of `ids` (TensorFlow 2.20; tests/test_distributed.py pins it);
    `tf.nn.embedding_lookup` looks up each shard's rows where they live and puts them back in
    order. On a plain variable it is the same gather."""
    return tf.nn.embedding_lookup(table, ids)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalised rows (zero rows stay zero): text vectors enter the tower on one scale
    whatever the encoder's raw output norm."""
    vectors = vectors.astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _transformer_layers(encoder: tf.keras.Model) -> list:
    """The encoder's transformer blocks, bottom to top (DistilBERT and BERT layouts)."""
    main = encoder.layers[0]
    for path in (("transformer", "layer"), ("encoder", "layer")):
        obj = main
        for attr in path:
            obj = getattr(obj, attr, None)
        if obj is not None:
            return list(obj)
    raise ValueError(f"cannot find transformer layers in {type(encoder).__name__}")


def _embedding_layers(encoder: tf.keras.Model) -> list:
    main = encoder.layers[0]
    return [main.embeddings] if hasattr(main, "embeddings") else []
