"""The two-tower multitask model: next-item retrieval + ranking, trained jointly with tfrs.

total loss = retrieval_weight * retrieval + ranking_weight * ranking
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from towers import run_dir as run_files
from towers.item_tower import ItemTower
from towers.random_draws import uniform_draws
from towers.spec import ModelSpec
from towers.tasks import NextItemRetrieval
from towers.user_tower import UserTower

RANKING_MODES = ("rating", "purchase", "none")


class RankingHead(tf.keras.layers.Layer):
    """Score of (user vector, item vector) from [u, i, u * i] through a small MLP."""

    def __init__(self, dim: int, hidden: int, **kwargs):
        kwargs["dtype"] = "float32"  # small head; float32 even under mixed precision
        super().__init__(**kwargs)
        self.dim, self.hidden = dim, hidden
        self.mlp = tf.keras.Sequential([
            tf.keras.layers.Dense(hidden, activation="relu", dtype="float32"),
            tf.keras.layers.Dense(1, dtype="float32")])
        # Built eagerly: with ranking_weight 0 the head is never called in training, but it
        # is still part of the model (checkpoints, export).
        self.mlp.build((None, 3 * dim))

    def call(self, users: tf.Tensor, items: tf.Tensor) -> tf.Tensor:
        # The first `dim` columns: the content term's text columns (towers/item_tower.py) are
        # for retrieval only.
        users = tf.cast(users[..., :self.dim], tf.float32)
        items = tf.cast(items[..., :self.dim], tf.float32)
        features = tf.concat([users, items, users * items], axis=-1)  # [..., 3 * dim]
        return tf.squeeze(self.mlp(features), axis=-1)  # [...]

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "hidden": self.hidden}


class TwoTowerModel(tfrs.models.Model):
    """Sequence-aware two-tower model.

    Batch features: `history` int32 [batch, seq] (left-padded input items), `targets`
    [batch, seq] (the next item at each position, 0 = none), optional `event_types`
    [batch, seq], `target_values` float [batch, seq] (rating), `target_purchase` [batch, seq].
    """

    def __init__(self, item_tower: ItemTower, user_tower: UserTower,
                 retrieval: NextItemRetrieval, ranking_mode: str = "none",
                 retrieval_weight: float = 1.0, ranking_weight: float = 0.0,
                 purchase_pos_weight: float = 1.0, positions_per_batch: float = 0.0):
        super().__init__()
        if ranking_mode not in RANKING_MODES:
            raise ValueError(f"ranking mode must be one of {RANKING_MODES}, got {ranking_mode!r}")
        self.item_tower, self.user_tower, self.retrieval = item_tower, user_tower, retrieval
        self.ranking_mode = ranking_mode
        self.retrieval_weight, self.ranking_weight = retrieval_weight, ranking_weight
        self.purchase_pos_weight = purchase_pos_weight
        # Mean positions per batch when batches hold windows of similar length (0 = batches
        # are not length-bucketed): see compute_loss.
        self.positions_per_batch = positions_per_batch
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")  # epoch mean, not last batch
        self.rng = None  # stateful random ops; see seed_generator
        self.ranking_head = RankingHead(item_tower.dim, 2 * item_tower.dim,
                                        name="ranking_head")
        # Without a ranking task the head gets no gradient: keep it out of the optimizer.
        self.ranking_head.trainable = self.ranking_mode != "none"
        loss = (tf.keras.losses.MeanSquaredError(reduction="sum")
                if self.ranking_mode == "rating"
                else tf.keras.losses.BinaryCrossentropy(from_logits=True, reduction="sum"))
        self.ranking = tfrs.tasks.Ranking(loss=loss)

    @classmethod
    def from_spec(cls, spec: ModelSpec, positions_per_batch: float = 0.0,
                  frozen_text: bool = False) -> TwoTowerModel:
        """A new, untrained model of the spec's shape. `frozen_text` builds a text table in
        place of a fine-tuned encoder (a tuned run's text vectors are filled in by from_run)."""
        item_tower = ItemTower(spec.num_items, spec.dim, text_dim=spec.text_dim,
                               num_categories=spec.meta_sizes.get("category", 0),
                               num_brands=spec.meta_sizes.get("brand", 0),
                               num_price_buckets=spec.meta_sizes.get("price_bucket", 0),
                               text_tokens=0 if frozen_text else spec.text_tokens,
                               id_dropout=spec.id_dropout, text_experts=spec.text_experts,
                               content_term=spec.content_term,
                               content_beta=spec.content_beta, id_max_norm=spec.id_max_norm,
                               name="item_tower")
        user_tower = UserTower(spec.user_tower, spec.dim, spec.max_seq_len,
                               num_blocks=spec.num_blocks, num_heads=spec.num_heads,
                               dropout=spec.dropout, gru_layers=spec.gru_layers,
                               num_event_types=spec.num_event_types, layout=spec.sasrec_layout,
                               projection=spec.user_projection, name="user_tower")
        retrieval = NextItemRetrieval(spec.num_items, spec.retrieval_mode, spec.num_negatives,
                                      spec.logq_correction, spec.unseen_negatives,
                                      name="retrieval")
        return cls(item_tower, user_tower, retrieval, spec.ranking_mode, spec.retrieval_weight,
                   spec.ranking_weight, spec.purchase_pos_weight, positions_per_batch)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> tuple[TwoTowerModel, ModelSpec]:
        """The trained model of a finished run, from its spec and best checkpoint alone.

        The item feature tables (seen-in-training flags, text vectors, metadata codes) and the
        popularity the retrieval task samples with are weights in the checkpoint. A run that
        fine-tuned its text encoder left the tuned item text vectors beside it instead, so the
        rebuilt item tower needs no encoder.
        """
        run_dir = run_files.check_run_dir(run_dir)
        spec = ModelSpec.load(run_dir / run_files.SPEC)
        model = cls.from_spec(spec, frozen_text=True)
        model.item_tower.build(None)
        model.retrieval.build(None)
        empty = tf.zeros([1, spec.max_seq_len], tf.int32)
        model.user_vector(empty, event_types=empty if spec.num_event_types else None)
        status = model.load_weights(str(run_dir / run_files.CHECKPOINT))
        status.expect_partial()  # the optimizer's slots are not needed
        if spec.text_tokens:
            vectors = np.load(run_dir / run_files.TEXT_VECTORS)
            model.item_tower.text_table.assign(vectors.astype(np.float32))
        else:
            status.assert_existing_objects_matched()
        return model, spec

    # ---- inference pieces, reused by evaluation and export ----
    def seed_generator(self, seed: int) -> None:
        """Draw this model's training randomness (id dropout, negatives, the user tower's
        dropout masks) from one tf.random.Generator saved with its checkpoints
        (towers/random_draws.py, sequential/dropout.py). Call inside the strategy scope,
        before training."""
        self.rng = tf.random.Generator.from_seed(seed)
        for layer in (self.item_tower, self.retrieval, self.user_tower,
                      *self.user_tower.submodules):
            if hasattr(layer, "rng"):
                layer.rng = self.rng

    def all_item_vectors(self, drop_seed: tf.Tensor | None = None) -> tf.Tensor:
        """Every item's scored vector [num_items + 1, score_dim] (row 0 padding)."""
        ids = tf.range(self.item_tower.num_items + 1)
        return self.item_tower(ids, drop_seed=drop_seed)

    def encode(self, history: tf.Tensor, item_vectors: tf.Tensor | None = None,
               event_types: tf.Tensor | None = None, training: bool | None = None,
               drop_seed: tf.Tensor | None = None):
        """The query after each position in two parts: the user tower's output [batch, seq,
        dim], and with the content term (beta [batch, seq], unit text vector of the item at
        each position [batch, seq, text_dim]), else None. The user tower reads the first
        `dim` columns of the history's item vectors."""
        if item_vectors is None:
            embedded = self.item_tower(history, drop_seed=drop_seed)
        else:
            embedded = tf.gather(item_vectors, history)  # [batch, seq, score_dim]
        encoded = self.user_tower(embedded[..., :self.item_tower.dim], history > 0,
                                  event_types=event_types, training=training)
        return encoded, self.item_tower.content_parts(history, drop_seed)

    def sequence_vectors(self, history: tf.Tensor, item_vectors: tf.Tensor | None = None,
                         event_types: tf.Tensor | None = None, training: bool | None = None,
                         drop_seed: tf.Tensor | None = None) -> tf.Tensor:
        """Query vector after each position: [batch, seq, score_dim] (with the content term
        it ends with [beta c ; 1], c the unit text vector of the item at that position)."""
        encoded, content = self.encode(history, item_vectors, event_types, training,
                                       drop_seed)
        if content is None:
            return encoded
        query = self.item_tower.content.query(*content, history > 0)
        return tf.concat([encoded, tf.cast(query, encoded.dtype)], axis=-1)

    def user_vector(self, history: tf.Tensor, item_vectors: tf.Tensor | None = None,
                    event_types: tf.Tensor | None = None) -> tf.Tensor:
        """Query vector after the newest item of a left-padded history: [batch, score_dim]."""
        return self.sequence_vectors(history, item_vectors, event_types, training=False)[:, -1]

    def rank(self, users: tf.Tensor, items: tf.Tensor) -> tf.Tensor:
        """Ranking-head scores: users [batch, dim], items [batch, n, dim] -> [batch, n]."""
        n = tf.shape(items)[1]
        tiled = tf.repeat(users[:, None, :], n, axis=1)
        return self.ranking_head(tiled, items)

    # ---- training ----
    def compute_loss(self, features, training: bool = False) -> tf.Tensor:
        history, targets = features["history"], features["targets"]
        full = self.retrieval.mode == "full"
        seed = self.item_tower.dropout_seed() if training else None  # id dropout, one per step
        all_items = self.all_item_vectors(seed) if full else None
        sequence, content = self.encode(history, all_items, features.get("event_types"),
                                        training=training, drop_seed=seed)  # [batch, seq, dim]
        has_target = targets > 0
        queries = tf.boolean_mask(sequence, has_target)  # [positions, dim]
        target_ids = tf.boolean_mask(targets, has_target)  # [positions]
        if content is not None:  # (beta [positions], text [positions, text_dim])
            content = tuple(tf.boolean_mask(part, has_target) for part in content)
        if full:
            retrieval_loss = self.retrieval(queries, target_ids, all_items, content=content)
            target_vectors = tf.gather(all_items, target_ids)
        else:
            # Other replicas' targets are in the pool as ids: their vectors are computed here,
            # so this replica's gradient reaches their rows too.
            pool, target_index, draws = self.retrieval.candidate_pool(target_ids)
            pool_vectors = self.item_tower(pool, drop_seed=seed)  # [c, score_dim]
            retrieval_loss = self.retrieval(queries, target_ids, pool_vectors, pool,
                                            target_index, draws, content=content)
            target_vectors = tf.gather(pool_vectors, target_index)
        loss = self.retrieval_weight * retrieval_loss
        if self.ranking_mode != "none":
            loss += self.ranking_weight * self._ranking_loss(
                features, has_target, queries, target_vectors, training, seed)
        if training and self.positions_per_batch:
            # Batches of similar-length windows hold very different numbers of positions;
            # scaling each batch's mean by its share keeps every position's weight the same
            # as in randomly mixed batches. A replica holds 1/replicas of the batch.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            loss *= tf.cast(tf.shape(target_ids)[0], loss.dtype) / (
                self.positions_per_batch / replicas)
        return loss

    def _ranking_loss(self, features, has_target, queries, target_vectors, training, seed):
        queries = tf.cast(queries, tf.float32)
        target_vectors = tf.cast(target_vectors, tf.float32)
        if self.ranking_mode == "rating":
            labels = tf.boolean_mask(features["target_values"], has_target)
            predictions = self.ranking_head(queries, target_vectors)
            weights = tf.ones_like(labels)
        else:
            # Observed next items (label 1 if purchased) against one uniform negative each.
            positives = tf.boolean_mask(features["target_purchase"], has_target)
            negative_ids = uniform_draws(self.rng, tf.shape(positives), 1,
                                         self.item_tower.num_items + 1, tf.int32)
            negatives = tf.cast(self.item_tower(negative_ids, drop_seed=seed), tf.float32)
            predictions = tf.concat([self.ranking_head(queries, target_vectors),
                                     self.ranking_head(queries, negatives)], axis=0)
            labels = tf.concat([positives, tf.zeros_like(positives)], axis=0)
            weights = 1.0 + (self.purchase_pos_weight - 1.0) * labels
        total = self.ranking(labels=labels[:, None], predictions=predictions[:, None],
                             sample_weight=weights, training=training)
        return total / tf.maximum(tf.reduce_sum(weights), 1.0)

    def train_step(self, inputs):
        # Differs from tfrs.Model.train_step in two ways: the loss is divided by the replica
        # count (gradients are summed across replicas), and a mixed-precision LossScaleOptimizer
        # gets a scaled loss so float16 gradients do not underflow.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        scaled_optimizer = isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            loss = self.compute_loss(inputs, training=True)
            total_loss = loss + tf.add_n([tf.reduce_sum(x) for x in self.losses] + [0.0])
            step_loss = total_loss / replicas
            if scaled_optimizer:
                step_loss = self.optimizer.get_scaled_loss(step_loss)
        gradients = tape.gradient(step_loss, self.trainable_variables)
        if scaled_optimizer:
            gradients = self.optimizer.get_unscaled_gradients(gradients)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        self.loss_tracker.update_state(total_loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, inputs):
        self.loss_tracker.update_state(self.compute_loss(inputs, training=False))
        return {"loss": self.loss_tracker.result()}

    @property
    def metrics(self):
        return [self.loss_tracker]  # Keras resets these at the start of every epoch
