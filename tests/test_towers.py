"""Towers and the retrieval task: log-Q sign and values, the pool, cold items, padding."""

import numpy as np
import pytest
import tensorflow as tf

from towers.item_tower import ItemTower, unit_rows
from towers.tasks import NextItemRetrieval, inclusion_probability
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
    q = inclusion_probability(ids, _task().popularity, 2, 2, 4).numpy()
    assert q[0] > q[1]


def test_logq_uses_inclusion_probability_of_the_deduplicated_pool():
    # 1,000 popularity draws and 30 uniform ones over 3,000 items: an item with p = 0.5 is in
    # the distinct pool almost surely, one with p = 0.001 with chance
    # 1 - 0.999^1000 * (1 - 1/3000)^30, one never drawn by popularity 1 - (1 - 1/3000)^30.
    # As per-draw shares the first two would differ 500x.
    pop = tf.constant([0.0, 0.5, 0.001, 0.0])
    q = inclusion_probability(tf.constant([1, 2, 3]), pop, 1000, 30, 3000).numpy()
    uniform_absent = (1 - 1 / 3000) ** 30
    np.testing.assert_allclose(q, [1.0, 1 - 0.999 ** 1000 * uniform_absent,
                                   1 - uniform_absent], rtol=1e-4)


def test_sampled_pool_holds_each_item_once_with_targets_first():
    task = NextItemRetrieval(num_items=5, mode="sampled", num_negatives=200)
    task.build(None)
    targets = tf.constant([3, 1, 3, 2])
    pool, index, draws = task.candidate_pool(targets)
    pool = pool.numpy()
    assert len(set(pool)) == len(pool)  # 200 uniform draws over 5 items: all collapse
    assert set(pool) == {1, 2, 3, 4, 5}
    assert list(pool[:3]) == [3, 1, 2]  # distinct targets first, in order
    np.testing.assert_array_equal(pool[index.numpy()], targets.numpy())
    assert int(draws) == 4


def test_full_softmax_ignores_padding_column():
    task = NextItemRetrieval(num_items=3, mode="full")
    task.build(None)
    task.popularity.assign([0.0, 0.4, 0.3, 0.3])
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


def test_id_dropout_drops_whole_items_consistently_within_a_step():
    tower = ItemTower(num_items=2000, dim=4, id_dropout=0.3)
    tower.build(None)
    tower.set_item_features(np.r_[0.0, np.ones(2000)].astype(np.float32))
    tower.id_embedding.assign(np.ones((2001, 4), np.float32))
    ids = tf.range(1, 2001)
    seed = tf.constant(12345, tf.int64)
    kept = tower(ids, drop_seed=seed)[:, 0].numpy() > 0
    assert abs((~kept).mean() - 0.3) < 0.04  # the share of items dropped
    # The same item in another call of the same step (e.g. as a negative): same decision.
    again = tower(tf.reverse(ids, [0]), drop_seed=seed)[:, 0].numpy()[::-1] > 0
    np.testing.assert_array_equal(kept, again)
    other = tower(ids, drop_seed=tf.constant(999, tf.int64))[:, 0].numpy() > 0
    assert (kept != other).mean() > 0.2  # another step drops other items
    assert (tower(ids)[:, 0].numpy() > 0).all()  # no seed (inference): nothing dropped


def test_text_initial_ids_follow_text_similarity():
    from training.features import text_initial_ids

    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 32))
    text = np.vstack([np.zeros(32)] + [base[i % 3] + 0.05 * rng.normal(size=32)
                                       for i in range(30)] + [np.zeros(32)])
    ids = text_initial_ids(text, 8)
    assert ids.shape == (32, 8) and not ids[0].any() and not ids[-1].any()
    assert abs(ids[1:-1].std() - 0.02) < 1e-3
    unit = ids[1:-1] / np.linalg.norm(ids[1:-1], axis=1, keepdims=True)
    sims = unit @ unit.T
    same = np.equal.outer(np.arange(30) % 3, np.arange(30) % 3)
    assert sims[same].mean() > 0.9 > sims[~same].mean()


def test_expert_adaptor_is_a_gated_mixture_of_whitened_projections():
    tower = ItemTower(num_items=3, dim=2, text_dim=3, text_experts=2)
    tower.build(None)
    text = tf.constant([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    tower.expert_bias.assign([[1.0, 0, 0], [0, 0, 0]])
    tower.expert_kernel.assign([np.eye(3)[:, :2], 2 * np.eye(3)[:, :2]])
    tower.expert_gate.assign(np.zeros((3, 2)))  # equal weights
    out = tower.project_text(text).numpy()
    # item 1: expert 0 sees [0, 0, 0], expert 1 [1, 0, 0] -> 2 * [1, 0]; mean [1, 0].
    # item 2: expert 0 sees [-1, 1, 0] -> [-1, 1], expert 1 -> [0, 2]; mean [-0.5, 1.5].
    np.testing.assert_allclose(out, [[1.0, 0.0], [-0.5, 1.5]], atol=1e-6)


def test_never_trained_items_are_not_negatives():
    # Item 3 has no training interaction (popularity 0): a huge score for it must not raise
    # the loss, unless unseen_negatives asks for the old behaviour.
    queries = tf.constant([[1.0, 0.0]])
    items = tf.constant([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [50.0, 0.0], [0.0, 0.0]])
    masked, kept = (NextItemRetrieval(num_items=4, mode="full", unseen_negatives=u)
                    for u in (False, True))
    for task in (masked, kept):
        task.build(None)
        task.popularity.assign([0.0, 0.5, 0.3, 0.0, 0.2])
    assert float(masked(queries, tf.constant([1]), items)) < 2.0
    assert float(kept(queries, tf.constant([1]), items)) > 40.0
    # Sampled: the same item drawn as a uniform negative.
    sampled = _task()
    sampled.popularity.assign([0.0, 0.7, 0.3, 0.0, 0.0])
    loss = sampled(queries, tf.constant([1]), tf.constant([[1.0, 0.0], [50.0, 0.0]]),
                   tf.constant([1, 3]), tf.constant([0]))
    assert float(loss) < 1e-3


def test_auto_id_dropout_only_with_never_trained_items_and_text():
    from types import SimpleNamespace

    from training.config import TrainConfig
    from training.data import AUTO_ID_DROPOUT, id_dropout

    def data(counts, text_dim=8, meta=None):
        return SimpleNamespace(train_counts=np.array([0, *counts]),
                               seqs=SimpleNamespace(num_items=len(counts)),
                               features=SimpleNamespace(text_dim=text_dim, meta_sizes=meta or {}))

    warm = data([3] * 200)
    cold = data([3] * 198 + [0, 0])  # 1% never trained
    auto = TrainConfig()
    assert id_dropout(auto, warm) == 0.0
    assert id_dropout(auto, cold) == AUTO_ID_DROPOUT
    assert id_dropout(auto, data([3] * 198 + [0, 0], text_dim=0)) == 0.0  # nothing to stand on
    assert id_dropout(auto, data([3] * 198 + [0, 0], 0, {"category": 4})) == AUTO_ID_DROPOUT
    assert id_dropout(TrainConfig(id_dropout="0.5"), warm) == 0.5
    with pytest.raises(ValueError, match="id_dropout"):
        TrainConfig(id_dropout="lots").validate()


def test_auto_dropout_follows_training_events_per_user():
    from types import SimpleNamespace

    from training.config import TrainConfig
    from training.data import DENSE_DROPOUT, SPARSE_DROPOUT, SPARSE_EVENTS_PER_USER, dropout_rate

    def data(users, events_per_user):
        return SimpleNamespace(seqs=SimpleNamespace(user_ids=np.arange(users),
                                                    items=np.ones(users * events_per_user)))

    auto = TrainConfig()
    assert dropout_rate(auto, data(100, SPARSE_EVENTS_PER_USER - 1)) == SPARSE_DROPOUT
    assert dropout_rate(auto, data(100, SPARSE_EVENTS_PER_USER)) == DENSE_DROPOUT
    assert dropout_rate(TrainConfig(dropout="0.3"), data(100, 2)) == 0.3
    for bad in ("lots", "1.0", "-0.1"):
        with pytest.raises(ValueError, match="config dropout"):
            TrainConfig(dropout=bad).validate()


def test_content_term_logits_equal_the_wide_dot_product():
    # Training scores u . v + beta * g * cos(c_u, c_i) + b without building the wide vectors;
    # serving scores [u ; beta c_u ; 1] . [v ; g c_i ; b]. Both must be the same number.
    rng = np.random.default_rng(0)
    queries = tf.constant(rng.normal(size=(3, 4)), tf.float32)
    text = tf.constant(unit_rows(rng.normal(size=(3, 5))))
    beta = tf.constant([0.5, 2.0, 3.0])
    items = rng.normal(size=(6, 4)).astype(np.float32)
    item_text = unit_rows(rng.normal(size=(6, 5)))
    weight = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    bias = np.r_[0.0, 0.0, -1.5, 0.0, -1.5, 0.0].astype(np.float32)
    candidates = tf.constant(np.c_[items, weight[:, None] * item_text, bias], tf.float32)
    logits = NextItemRetrieval._logits(queries, candidates, (beta, text)).numpy()
    wide = np.c_[queries.numpy(), beta.numpy()[:, None] * text.numpy(), np.ones(3)]
    np.testing.assert_allclose(logits, wide @ candidates.numpy().T, rtol=1e-5, atol=1e-5)


def _content_model(text):
    from towers.model import TwoTowerModel
    from towers.spec import ModelSpec

    spec = ModelSpec(num_items=len(text) - 1, num_event_types=0, event_vocab=[],
                     default_event=0, text_dim=text.shape[1], text_tokens=0, text_source="t",
                     meta_sizes={}, ranking_mode="none", retrieval_mode="full",
                     purchase_pos_weight=1.0, user_tower="sasrec", dim=8, max_seq_len=4,
                     num_blocks=1, num_heads=1, dropout=0.0, gru_layers=1,
                     sasrec_layout="sasrec", user_projection=False, num_negatives=4,
                     logq_correction=True, retrieval_weight=1.0, ranking_weight=0.0,
                     text_pooling="mean", finetune_layers=0, content_term=True,
                     content_beta=2.0)
    model = TwoTowerModel.from_spec(spec)
    counts = np.r_[0, np.arange(1, len(text))].astype(np.float32)
    model.item_tower.set_item_features((counts > 0).astype(np.float32), text=text,
                                       train_counts=counts)
    model.user_vector(tf.zeros([1, 4], tf.int32))
    return model


def test_content_term_makes_the_text_knn_baseline_a_special_case():
    rng = np.random.default_rng(1)
    text = np.r_[np.zeros((1, 6)), rng.normal(size=(9, 6))].astype(np.float32)
    model = _content_model(text)
    items = model.all_item_vectors().numpy()
    assert items.shape == (10, 8 + 6 + 1)
    np.testing.assert_allclose(items[:, 8:14], unit_rows(text), atol=1e-6)  # g = 1 at start
    assert not items[:, 14].any()  # no bias at the start
    assert not items[0].any()  # padding
    history = tf.constant([[0, 3, 5, 2], [0, 0, 0, 7]])
    queries = model.user_vector(history).numpy()
    np.testing.assert_allclose(queries[:, 8:14], 2.0 * unit_rows(text)[[2, 7]], rtol=1e-5)
    np.testing.assert_allclose(queries[:, 14], 1.0)
    # With every trained weight of the towers at zero, only the content term is left: the
    # model ranks items exactly as the text kNN baseline does (cosine with the last item).
    for weight in model.item_tower.trainable_weights + model.user_tower.trainable_weights:
        if "content_weight" not in weight.name:
            weight.assign(tf.zeros_like(weight))
    scores = model.user_vector(history).numpy() @ model.all_item_vectors().numpy().T
    cosine = unit_rows(text)[[2, 7]] @ unit_rows(text).T
    np.testing.assert_allclose(scores, 2.0 * cosine, atol=1e-5)


def test_content_item_terms_weigh_text_and_calibrate_items_known_only_by_text():
    text = np.r_[np.zeros((1, 3)), np.eye(3)].astype(np.float32)
    model = _content_model(text)  # training counts 1, 2, 3
    tower = model.item_tower
    tower.content.item_w.assign([0.0, -1.0])  # text counts less for items trained on more
    tower.content.no_id_bias.assign(0.7)
    tower.seen_in_training.assign([0.0, 1.0, 1.0, 0.0])  # item 3: cold
    tower.log_count.assign(np.log1p([0.0, 1.0, 2.0, 0.0]).astype(np.float32))
    items = model.all_item_vectors().numpy()
    x = np.log1p([1.0, 2.0, 0.0])
    np.testing.assert_allclose(np.linalg.norm(items[1:, 8:11], axis=1), np.log1p(np.exp(-x)),
                               rtol=1e-5)
    np.testing.assert_allclose(items[1:, 11], [0.0, 0.0, 0.7])  # bias only without an id
    # Id dropout: an item whose id is dropped this step gets what a cold item gets.
    tower.id_dropout = 0.999
    dropped = model.item_tower(tf.constant([1, 2]), drop_seed=tf.constant(7, tf.int64)).numpy()
    np.testing.assert_allclose(dropped[:, 11], 0.7)
    np.testing.assert_allclose(np.linalg.norm(dropped[:, 8:11], axis=1), np.log(2.0),
                               rtol=1e-5)


def test_content_beta_depends_on_what_the_query_knows():
    text = np.r_[np.zeros((1, 3)), np.eye(3)].astype(np.float32)
    model = _content_model(text)
    weight = model.item_tower.content
    history = tf.constant([[0, 0, 1], [0, 3, 1], [0, 0, 3]])
    beta = model.item_tower.content_parts(history)[0].numpy()
    np.testing.assert_allclose(beta[:, -1], 2.0, rtol=1e-5)  # one beta at the start
    assert (beta[history.numpy() == 0] == 0).all()  # padding adds nothing
    weight.w.assign([0.5, 1.0, -1.0])  # rarer newest item, shorter history: other betas
    beta = model.item_tower.content_parts(history)[0].numpy()[:, -1]
    expected = np.log1p(np.exp(0.5 + np.log1p([1.0, 1.0, 3.0]) - np.log1p([1.0, 2.0, 1.0])))
    np.testing.assert_allclose(beta, expected, rtol=1e-5)


def test_content_term_auto_only_with_frozen_text_and_never_trained_items():
    from types import SimpleNamespace

    from training.config import TrainConfig
    from training.data import content_term

    def data(never_trained, text=True):
        counts = np.r_[0, np.zeros(never_trained), np.ones(100 - never_trained)]
        return SimpleNamespace(train_counts=counts, seqs=SimpleNamespace(num_items=100),
                               features=SimpleNamespace(text=np.ones((101, 4)) if text
                                                        else None))

    auto, on, off = (TrainConfig(content_term=v) for v in ("auto", "on", "off"))
    assert content_term(auto, data(1)) and not content_term(auto, data(0))
    assert content_term(on, data(0)) and not content_term(off, data(5))
    assert not content_term(on, data(5, text=False))  # no frozen text vectors: nothing to score


def test_id_max_norm_bounds_the_id_offset_of_warm_items():
    tower = ItemTower(num_items=3, dim=4, id_max_norm=0.5)
    tower.build(None)
    tower.id_embedding.assign(np.array([[0, 0, 0, 0], [3, 0, 0, 4], [0.1, 0, 0, 0],
                                        [1, 1, 1, 1]], np.float32))
    tower.set_item_features(np.array([0, 1, 1, 0], np.float32))  # item 3 never trained
    norms = np.linalg.norm(tower(tf.constant([1, 2, 3])).numpy(), axis=1)
    np.testing.assert_allclose(norms, [0.5, 0.1, 0.0], atol=1e-6)  # clipped, kept, cold


def test_content_term_gradients_reach_beta_g_and_b_as_through_the_wide_product():
    # The cosine is computed without gradient; beta, g and b must still get exactly the
    # gradients the wide dot product gives them.
    rng = np.random.default_rng(2)
    text = tf.constant(unit_rows(rng.normal(size=(3, 5))))
    item_text = tf.constant(unit_rows(rng.normal(size=(4, 5))))
    queries = tf.constant(rng.normal(size=(3, 2)), tf.float32)
    items = tf.constant(rng.normal(size=(4, 2)), tf.float32)
    beta, weight = tf.Variable([0.5, 1.0, 2.0]), tf.Variable([0.3, 1.0, 1.5, 2.0])
    bias = tf.Variable([0.0, -0.7, 0.0, 0.2])
    upstream = tf.constant(rng.normal(size=(3, 4)), tf.float32)

    def gradients(wide_product: bool):
        with tf.GradientTape() as tape:
            candidates = tf.concat([items, weight[:, None] * item_text, bias[:, None]], axis=1)
            if wide_product:
                query = tf.concat([queries, beta[:, None] * text, tf.ones([3, 1])], axis=1)
                logits = tf.matmul(query, candidates, transpose_b=True)
            else:
                logits = NextItemRetrieval._logits(queries, candidates, (beta, text))
            loss = tf.reduce_sum(logits * upstream)
        return tape.gradient(loss, [beta, weight, bias])

    for got, expected in zip(gradients(False), gradients(True)):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
