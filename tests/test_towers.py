"""Towers and the retrieval task: log-Q sign, accidental hits, cold items, padding."""

import numpy as np
import tensorflow as tf

from towers.item_tower import ItemTower
from towers.tasks import NextItemRetrieval, mixed_sampling_probability
from towers.user_tower import UserTower


def _task(**kwargs):
    task = NextItemRetrieval(num_items=4, mode="sampled", num_negatives=2, **kwargs)
    task.build(None)
    task.popularity.assign([0.0, 0.7, 0.1, 0.1, 0.1])
    return task


def test_logq_correction_subtracts_log_q():
    # Two positions, candidate pool [1, 2]; identical raw scores. With the correction, the
    # popular item 1 must get a LOWER logit than the rare item 2 (logit - log q), so a query
    # whose target is the rare item has a lower loss than without correction.
    queries = tf.constant([[1.0, 0.0], [1.0, 0.0]])
    candidates = tf.constant([[1.0, 0.0], [1.0, 0.0]])
    ids = tf.constant([1, 2])
    targets, index = tf.constant([2, 2]), tf.constant([1, 1])
    corrected = _task(logq_correction=True)(queries, targets, candidates, ids, index)
    plain = _task(logq_correction=False)(queries, targets, candidates, ids, index)
    assert float(corrected) < float(plain)
    q = mixed_sampling_probability(ids, _task().popularity, 2, 2, 4).numpy()
    assert q[0] > q[1]


def test_accidental_hits_are_removed():
    # Candidate pool [1, 1(negative duplicate of the positive), 3]: the duplicate must not
    # count as a negative, so the loss equals that of the pool without it.
    queries = tf.constant([[2.0, 0.0]])
    with_dup = _task(logq_correction=False)(
        queries, tf.constant([1]), tf.constant([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),
        tf.constant([1, 1, 3]), tf.constant([0]))
    without = _task(logq_correction=False)(
        queries, tf.constant([1]), tf.constant([[1.0, 0.0], [0.0, 1.0]]),
        tf.constant([1, 3]), tf.constant([0]))
    assert abs(float(with_dup) - float(without)) < 1e-5


def test_full_softmax_ignores_padding_column():
    task = NextItemRetrieval(num_items=3, mode="full")
    task.build(None)
    items = tf.constant([[100.0], [1.0], [0.0], [0.0]])  # padding row would dominate
    loss = task(tf.constant([[1.0]]), tf.constant([1]), items)
    assert float(loss) < 1.0


def test_cold_items_get_finite_text_based_vectors():
    tower = ItemTower(num_items=3, dim=4, text_dim=5, num_categories=2)
    warm = np.array([0, 1, 1, 0], np.float32)  # item 3 is cold
    text = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    tower.set_item_features(warm, text=text, meta={"category": np.array([0, 1, 2, 1])})
    vectors = tower(tf.constant([0, 1, 2, 3])).numpy()
    assert np.isfinite(vectors).all()
    assert np.allclose(vectors[0], 0)  # padding
    assert np.abs(vectors[3]).sum() > 0  # cold item still has a vector
    # The cold item's vector does not use its id embedding.
    tower.id_embedding.assign(tower.id_embedding + 10.0)
    assert np.allclose(tower(tf.constant([3])).numpy()[0], vectors[3], atol=1e-6)
    assert not np.allclose(tower(tf.constant([1])).numpy()[0], vectors[1])


def test_user_tower_projection_is_optional():
    items = tf.random.stateless_normal([2, 5, 8], seed=[0, 1])
    mask = tf.constant([[False, True, True, True, True]] * 2)
    plain = UserTower("sasrec", dim=8, max_len=5, dropout=0.0)
    projected = UserTower("sasrec", dim=8, max_len=5, dropout=0.0, projection=True)
    out = plain(items, mask)
    # Without projection the user vector is the encoder's output itself.
    np.testing.assert_allclose(out, plain.encoder(items, mask), atol=1e-6)
    assert not any("user_projection" in w.name for w in plain.weights)
    projected(items, mask)
    assert any("user_projection" in w.name for w in projected.weights)
    config = projected.get_config()
    assert config["projection"] is True and config["layout"] == "sasrec"
    assert UserTower.from_config(config).get_config() == config
