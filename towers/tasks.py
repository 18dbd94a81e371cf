"""Next-item retrieval loss at every sequence position: full softmax, or sampled softmax over
in-batch items plus uniformly sampled negatives with log-Q correction (Yi et al. 2019), Q being
each item's chance to be in the deduplicated pool.

tfrs.tasks.Retrieval scores every query against every in-batch candidate with diagonal labels,
a [positions, positions] matrix: at 128 sequences x 200 positions that is 25,600^2 logits. Here
the in-batch candidates are the batch's distinct target items, shared by all positions, which
keeps the logits at [positions, distinct targets and negatives]. Each item is in the pool
once, so no negative column can repeat a label (no accidental hits to remove); tfrs's own
layer applies the sampling-probability correction.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

from towers.item_tower import split_content
from towers.random_draws import uniform_draws


def inclusion_probability(candidate_ids: tf.Tensor, popularity: tf.Tensor,
                          num_positives: tf.Tensor, num_sampled: int,
                          num_items: int) -> tf.Tensor:
    """Each candidate's chance to be in the pool, the Q of the log-Q correction.

    The pool is the DISTINCT items of `num_positives` draws by popularity (the batch's targets)
    and `num_sampled` uniform draws, so an item is in it at most once, with probability
    1 - (1 - p)^n (1 - 1/N)^m. Not n * p + m / N (expected draws): a popular item drawn 200
    times per batch still fills one column, and n * p would push its logit down by log 200
    against a rare item's. An item that is always in the pool gets Q = 1 and no correction, so
    a pool that covers the catalog scores like the full softmax.
    """
    positives = tf.cast(num_positives, tf.float32)
    pop = tf.gather(popularity, candidate_ids)  # [candidates]
    log_absent = (positives * tf.math.log1p(-tf.minimum(pop, 1.0 - 1e-7))
                  + num_sampled * tf.math.log1p(-1.0 / num_items))
    return -tf.math.expm1(log_absent)


class NextItemRetrieval(tf.keras.layers.Layer):
    """Softmax cross-entropy of each query's next item against the candidate items.

    `popularity` holds each item's share of training targets (index 0 = padding = 0); it is the
    sampling distribution of in-batch candidates, used for the log-Q correction.
    """

    def __init__(self, num_items: int, mode: str = "full", num_negatives: int = 1024,
                 logq_correction: bool = True, unseen_negatives: bool = False, **kwargs):
        # The loss is computed in float32 even under a mixed-precision policy.
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.rng = None  # set by TwoTowerModel.seed_generator (towers/random_draws.py)
        if mode not in ("full", "sampled"):
            raise ValueError(f"retrieval mode must be 'full' or 'sampled', got {mode!r}")
        self.num_items, self.mode = num_items, mode
        self.num_negatives, self.logq_correction = num_negatives, logq_correction
        # Items with no training interaction (held-out cold items, say) are never a target, so
        # as negatives they could only be pushed down, through the text and metadata they share
        # with the items that will need them: by default they are left out of the softmax.
        self.unseen_negatives = unseen_negatives
        self.logq = tfrs.layers.loss.SamplingProbablityCorrection(dtype="float32")

    def build(self, input_shape):
        self.popularity = self.add_weight("popularity", [self.num_items + 1],
                                          initializer="zeros", trainable=False)
        super().build(input_shape)

    def candidate_pool(self, target_ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Sampled mode: (candidate ids [c], index of each target in them [positions], number of
        in-batch draws for the log-Q correction).

        The pool is the distinct items among the targets of every replica in sync (gathered
        from the others under a multi-replica strategy, so more replicas means more negatives)
        and `num_negatives` uniform draws of this replica: each item once.
        """
        replica = tf.distribute.get_replica_context()
        negatives = uniform_draws(self.rng, [self.num_negatives], 1, self.num_items + 1,
                                  tf.int32)
        if replica is None or replica.num_replicas_in_sync == 1:
            drawn = tf.concat([target_ids, negatives], axis=0)
            draws = tf.shape(target_ids)[0]
        else:
            every = replica.all_gather(target_ids, axis=0)  # [positions of all replicas]
            drawn = tf.concat([target_ids, every, negatives], axis=0)
            draws = tf.shape(every)[0]
        # This replica's targets first: tf.unique keeps first occurrences in order, so the
        # first `positions` indices are the label columns of this replica's targets.
        pool, index = tf.unique(drawn)
        return pool, index[:tf.shape(target_ids)[0]], draws

    def call(self, queries: tf.Tensor, target_ids: tf.Tensor, candidates: tf.Tensor,
             candidate_ids: tf.Tensor | None = None, target_index: tf.Tensor | None = None,
             draws: tf.Tensor | None = None,
             content: tuple[tf.Tensor, tf.Tensor] | None = None) -> tf.Tensor:
        """Mean loss over positions.

        queries [positions, dim]; target_ids [positions]. Full mode: candidates are all items
        [num_items + 1, score_dim] (row 0 padding). Sampled mode: candidates [c, score_dim] for
        `candidate_ids` [c] from `candidate_pool`, `target_index` the label column per position,
        `draws` the in-batch draws (default: the positions). `content`: the query side of the
        content term (towers/item_tower.py ContentWeight), (beta [positions], unit text
        [positions, text_dim]); the item side is in the candidates' last columns.
        """
        queries = tf.cast(queries, tf.float32)
        if self.mode == "full":
            # Row 0 of `candidates` is padding: score items 1..N only, labels shifted by one.
            logits = self._logits(queries, candidates[1:], content)  # [positions, num_items]
            logits = self._without_unseen(logits, self.popularity[1:])
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(target_ids - 1, logits)
            return tf.reduce_mean(losses)
        logits = self._logits(queries, candidates, content)  # [positions, candidates]
        logits = self._without_unseen(logits, tf.gather(self.popularity, candidate_ids))
        if self.logq_correction:
            draws = tf.shape(target_ids)[0] if draws is None else draws
            q = inclusion_probability(candidate_ids, self.popularity, draws,
                                      self.num_negatives, self.num_items)
            logits = self.logq(logits, q[None, :])
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(target_index, logits)
        return tf.reduce_mean(losses)

    @staticmethod
    def _logits(queries: tf.Tensor, candidates: tf.Tensor,
                content: tuple[tf.Tensor, tf.Tensor] | None) -> tf.Tensor:
        """queries [p, dim] . candidates [c, dim (+ ...)] -> [p, c], plus with the content term
        beta * g * cosine(c_u, c_i) + b: the same number as the wide dot product
        [u ; beta c_u ; 1] . [v ; g c_i ; b] that serving computes. The text vectors are
        frozen, so their cosine matrix needs no gradient (beta, g and b get theirs through the
        products): the content term costs one forward matmul per step, not three."""
        dim = queries.shape[-1]
        logits = tf.matmul(queries, tf.cast(candidates[:, :dim], tf.float32), transpose_b=True)
        if content is None:
            return logits
        beta, text = content
        weight, item_text, bias = split_content(candidates, dim)
        cosine = tf.stop_gradient(tf.matmul(tf.cast(text, tf.float32), item_text,
                                            transpose_b=True))  # [p, c]
        return (logits + tf.cast(beta, tf.float32)[:, None] * cosine * weight[None, :]
                + bias[None, :])

    def _without_unseen(self, logits: tf.Tensor, popularity: tf.Tensor) -> tf.Tensor:
        """Logits with the columns of never-trained items (popularity 0) at -1e9."""
        if self.unseen_negatives:
            return logits
        return tf.where(popularity[None, :] > 0, logits, -1e9)

    def get_config(self):
        return {**super().get_config(), "num_items": self.num_items, "mode": self.mode,
                "num_negatives": self.num_negatives, "logq_correction": self.logq_correction,
                "unseen_negatives": self.unseen_negatives}
