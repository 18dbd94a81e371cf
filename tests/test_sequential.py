"""Behaviour of the sequence encoders: causality, padding invariance, saving, learning a rule."""

import numpy as np
import pytest
import tensorflow as tf

from sequential import GRU4Rec, SASRec, padding_mask_from_ids

DIM = 8
MAX_LEN = 20


def make_sasrec(dim: int = DIM, **kwargs) -> SASRec:
    return SASRec(dim, max_len=MAX_LEN, **{"num_heads": 2, **kwargs})


def make_gru4rec(dim: int = DIM, **kwargs) -> GRU4Rec:
    return GRU4Rec(dim, **{"num_layers": 2, **kwargs})


def make_pre_ln_sasrec(dim: int = DIM, **kwargs) -> SASRec:
    return make_sasrec(dim, **{"layout": "pre_ln", **kwargs})


ENCODERS = {"sasrec": make_sasrec, "sasrec-pre-ln": make_pre_ln_sasrec, "gru4rec": make_gru4rec}


@pytest.fixture(params=list(ENCODERS))
def make(request):
    tf.keras.utils.set_random_seed(0)
    return ENCODERS[request.param]


def random_embeddings(batch: int, seq: int, seed: int = 0) -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).normal(size=(batch, seq, DIM)), tf.float32)


def left_padded_mask(lengths: list[int], seq: int) -> tf.Tensor:
    return tf.constant([[i >= seq - n for i in range(seq)] for n in lengths])


def randomized(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
    """Build `layer` and give every weight random values, as after training: with zero biases
    and LayerNorm offsets a fresh layer maps zeros to zeros and hides padding bugs."""
    layer(random_embeddings(1, 2), tf.ones([1, 2], tf.bool))
    rng = np.random.default_rng(1)
    layer.set_weights([rng.normal(scale=0.3, size=w.shape) for w in layer.get_weights()])
    return layer


def test_padding_mask_from_ids():
    ids = tf.constant([[0, 0, 3, 7], [5, 1, 0, 0]])
    expected = [[False, False, True, True], [True, True, False, False]]
    np.testing.assert_array_equal(padding_mask_from_ids(ids).numpy(), expected)


def test_output_shape_and_padded_positions_are_zero(make):
    layer = randomized(make())
    mask = tf.constant([[False] * 4 + [True] * 3, [True] * 4 + [False] * 3, [True] * 7])
    out = layer(random_embeddings(3, 7), mask).numpy()
    assert out.shape == (3, 7, DIM)
    assert np.all(out[~mask.numpy()] == 0.0)
    assert np.all(np.abs(out[mask.numpy()]).sum(-1) > 0)


def test_causal(make):
    layer = randomized(make())
    seq = 8
    mask = left_padded_mask([8, 5], seq)
    embeddings = random_embeddings(2, seq)
    before = layer(embeddings, mask).numpy()
    for t in range(seq - 1):
        changed = tf.concat([embeddings[:, : t + 1], random_embeddings(2, seq - t - 1, t + 1)], 1)
        after = layer(changed, mask).numpy()
        np.testing.assert_allclose(after[:, : t + 1], before[:, : t + 1], atol=1e-6)
        assert not np.allclose(after[0, t + 1 :], before[0, t + 1 :], atol=1e-3)


def test_same_history_any_padding_gives_same_newest_vector(make):
    layer = randomized(make())
    history = random_embeddings(1, 6)[0]  # [6, dim]
    garbage = random_embeddings(1, MAX_LEN, seed=1)[0]  # padded positions hold arbitrary values
    garbage = tf.where(tf.range(MAX_LEN)[:, None] % 3 == 0, np.nan, garbage)

    def encode(seq: int, left: bool) -> np.ndarray:
        start = seq - 6 if left else 0
        rows = [history[i - start] if start <= i < start + 6 else garbage[i] for i in range(seq)]
        mask = tf.constant([[start <= i < start + 6 for i in range(seq)]])
        return layer(tf.stack(rows)[None], mask).numpy()[0, start + 5]

    reference = encode(10, left=True)
    assert np.all(np.isfinite(reference))
    np.testing.assert_allclose(encode(MAX_LEN, left=True), reference, atol=1e-5)
    np.testing.assert_allclose(encode(10, left=False), reference, atol=1e-5)
    np.testing.assert_allclose(encode(MAX_LEN, left=False), reference, atol=1e-5)


def test_padded_values_never_reach_outputs_or_gradients(make):
    """Padded positions may hold anything, even NaN; a padded query that sees no real key
    (left padding in SASRec) must not turn into NaN either."""
    layer = randomized(make(dropout=0.5))
    mask = tf.constant([[False, False, True, True], [True, False, False, False]])
    embeddings = tf.where(mask[:, :, None], random_embeddings(2, 4), np.nan)
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        out = layer(embeddings, mask, training=True)
        loss = tf.reduce_sum(tf.square(out))
    grads = tape.gradient(loss, [embeddings, *layer.trainable_variables])
    assert np.all(np.isfinite(out.numpy()))
    assert all(np.all(np.isfinite(tf.convert_to_tensor(g).numpy())) for g in grads)


def test_event_types_change_output(make):
    layer = randomized(make(num_event_types=3))
    embeddings, mask = random_embeddings(2, 5), left_padded_mask([5, 3], 5)
    views = tf.ones([2, 5], tf.int32)
    plain = layer(embeddings, mask).numpy()
    with_views = layer(embeddings, mask, event_types=views).numpy()
    with_buys = layer(embeddings, mask, event_types=views + 1).numpy()
    assert not np.allclose(plain, with_views, atol=1e-4)
    assert not np.allclose(with_views[:, -1], with_buys[:, -1], atol=1e-4)


def test_event_types_without_event_embeddings_is_an_error(make):
    events = tf.ones([1, 3], tf.int32)
    with pytest.raises(ValueError, match="num_event_types=0"):
        make()(random_embeddings(1, 3), tf.ones([1, 3], tf.bool), event_types=events)


def test_wrong_width_is_an_error(make):
    with pytest.raises(ValueError, match="width 5"):
        make()(tf.zeros([1, 3, 5]), tf.ones([1, 3], tf.bool))


def test_sasrec_longer_than_max_len_is_an_error():
    with pytest.raises(ValueError, match="length 21"):
        make_sasrec()(tf.zeros([1, MAX_LEN + 1, DIM]), tf.ones([1, MAX_LEN + 1], tf.bool))


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (
            SASRec,
            {"dim": DIM, "max_len": 12, "num_blocks": 1, "num_heads": 4, "dropout": 0.1,
             "num_event_types": 4, "ffn_dim": 6, "epsilon": 1e-6, "layout": "pre_ln"},
        ),
        (GRU4Rec, {"dim": DIM, "num_layers": 3, "dropout": 0.1, "num_event_types": 4}),
    ],
    ids=["sasrec", "gru4rec"],
)
def test_config_round_trip_gives_same_layer(cls, kwargs):
    layer = cls(**kwargs)
    assert {key: layer.get_config()[key] for key in kwargs} == kwargs
    embeddings, mask = random_embeddings(2, 6), left_padded_mask([6, 2], 6)
    events = tf.constant([[1, 2, 3, 1, 2, 3], [0, 0, 0, 0, 1, 2]])
    expected = layer(embeddings, mask, event_types=events).numpy()

    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone(embeddings, mask, event_types=events)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(embeddings, mask, event_types=events), expected, atol=1e-6)


def test_functional_model_reloads_with_same_outputs(make, tmp_path):
    ids = tf.keras.Input([None], dtype=tf.int32)
    mask = tf.keras.Input([None], dtype=tf.bool)
    events = tf.keras.Input([None], dtype=tf.int32)
    item_vectors = tf.keras.layers.Embedding(10, DIM)(ids)
    outputs = make(num_event_types=3)(item_vectors, mask, event_types=events)
    model = tf.keras.Model([ids, mask, events], outputs)

    ids = tf.constant([[0, 0, 4, 5], [1, 2, 3, 9]])
    batch = [ids, padding_mask_from_ids(ids), tf.constant([[0, 0, 1, 2], [1, 1, 2, 2]])]
    model.save(tmp_path / "model.keras")
    reloaded = tf.keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(reloaded(batch), model(batch), atol=1e-6)


@tf.keras.utils.register_keras_serializable(package="test_sequential")
class NewestItemTower(tf.keras.Model):
    """A user tower in miniature: embed item ids, encode, keep the newest position."""

    def __init__(self, encoder_config: dict, **kwargs):
        super().__init__(**kwargs)
        self.encoder_config = encoder_config
        self.items = tf.keras.layers.Embedding(10, DIM)
        self.encoder = tf.keras.utils.deserialize_keras_object(encoder_config)

    def call(self, ids, training=None):
        states = self.encoder(self.items(ids), padding_mask_from_ids(ids), training=training)
        return states[:, -1]  # [batch, dim], ids are left-padded

    def get_config(self):
        return {"encoder_config": self.encoder_config}


def test_subclassed_model_reloads_with_same_outputs(make, tmp_path):
    model = NewestItemTower(tf.keras.utils.serialize_keras_object(make()))
    ids = tf.constant([[0, 0, 4, 5], [1, 2, 3, 9]])
    expected = model(ids).numpy()
    model.save(tmp_path / "model.keras")
    reloaded = tf.keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(reloaded(ids), expected, atol=1e-6)


def test_runs_in_tf_function_with_unknown_batch_and_length(make):
    layer = make()
    encode = tf.function(
        lambda x, m: layer(x, m),
        input_signature=[
            tf.TensorSpec([None, None, DIM], tf.float32),
            tf.TensorSpec([None, None], tf.bool),
        ],
    )
    assert encode(random_embeddings(3, 5), left_padded_mask([5, 1, 2], 5)).shape == (3, 5, DIM)
    assert encode(random_embeddings(1, 9), left_padded_mask([4], 9)).shape == (1, 9, DIM)


def test_learns_next_item_rule(make):
    """next = current + 1 (mod 20) on items 1..20: a tiny model reaches HR@1 = 1."""
    num_items, seq = 20, 8
    rng = np.random.default_rng(0)
    starts = rng.integers(0, num_items, size=(256, 1))
    items = (starts + np.arange(seq + 1)) % num_items + 1  # [256, seq + 1], ids 1..20
    lengths = rng.integers(2, seq + 2, size=(256, 1))
    items[np.arange(seq + 1) < seq + 1 - lengths] = 0  # left-pad to random lengths
    inputs, targets = tf.constant(items[:, :-1]), tf.constant(items[:, 1:])
    target_mask = padding_mask_from_ids(inputs) & padding_mask_from_ids(targets)

    item_table = tf.keras.layers.Embedding(num_items + 1, 16)
    encoder = make(dim=16, dropout=0.0)
    optimizer = tf.keras.optimizers.Adam(0.02)

    def logits_of(ids, training=False):
        states = encoder(item_table(ids), padding_mask_from_ids(ids), training=training)
        return tf.einsum("bsd,nd->bsn", states, item_table.embeddings)  # [batch, seq, items]

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.keras.losses.sparse_categorical_crossentropy(
                tf.boolean_mask(targets, target_mask),
                tf.boolean_mask(logits_of(inputs, training=True), target_mask),
                from_logits=True,
            )
            loss = tf.reduce_mean(loss)
        variables = item_table.trainable_variables + encoder.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    for _ in range(150):
        train_step()
    predicted = tf.argmax(logits_of(inputs), -1, output_type=targets.dtype)
    hits = tf.boolean_mask(tf.equal(predicted, targets), target_mask)
    assert tf.reduce_mean(tf.cast(hits, tf.float32)).numpy() == 1.0

