"""LazyAdam: on a toy problem one step equals dense Adam on the touched rows and leaves every
other row and its moments bit-identical; it runs under MirroredStrategy (two CPU replicas) and
mixed precision; checkpoints restore it; `auto` picks it for sampled retrieval only."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from training.optimizers import LazyAdam, make_optimizer, resolve_optimizer

ROOT = Path(__file__).resolve().parents[1]


def _toy(seed: int = 0):
    """A 10-row table and a dense kernel; the loss reads rows 1, 3 (twice) and 7."""
    rng = np.random.default_rng(seed)
    table = tf.Variable(rng.normal(size=(10, 4)).astype(np.float32), name="table")
    kernel = tf.Variable(rng.normal(size=(4, 2)).astype(np.float32), name="kernel")
    return table, kernel


def _step(optimizer, table, kernel, rows):
    with tf.GradientTape() as tape:
        gathered = tf.gather(table, rows)  # IndexedSlices gradient, as an embedding lookup
        loss = tf.reduce_sum(tf.square(gathered @ kernel - 1.0))
    grads = tape.gradient(loss, [table, kernel])
    assert isinstance(grads[0], tf.IndexedSlices)
    optimizer.apply_gradients(zip(grads, [table, kernel]))
    return grads


def _slots(optimizer, variable):
    """Adam's first and second moments of a variable."""
    index = optimizer._index_dict[optimizer._var_key(variable)]
    return [optimizer._momentums[index].numpy(), optimizer._velocities[index].numpy()]


def test_one_step_equals_dense_adam_on_touched_rows_and_leaves_the_rest():
    rows = tf.constant([1, 3, 3, 7])
    lazy_table, lazy_kernel = _toy()
    dense_table, dense_kernel = _toy()
    before = lazy_table.numpy().copy()
    lazy, dense = LazyAdam(0.01), tf.keras.optimizers.Adam(0.01)
    grads = _step(lazy, lazy_table, lazy_kernel, rows)
    # Dense Adam on the same gradient made dense (duplicates summed), as a reference.
    dense.apply_gradients([(tf.convert_to_tensor(grads[0]), dense_table),
                           (grads[1], dense_kernel)])
    touched, untouched = [1, 3, 7], [0, 2, 4, 5, 6, 8, 9]
    assert np.array_equal(lazy_table.numpy()[touched], dense_table.numpy()[touched])
    assert np.array_equal(lazy_kernel.numpy(), dense_kernel.numpy())
    assert np.array_equal(lazy_table.numpy()[untouched], before[untouched])
    for lazy_slot, dense_slot in zip(_slots(lazy, lazy_table), _slots(dense, dense_table)):
        assert np.array_equal(lazy_slot[touched], dense_slot[touched])
        assert not lazy_slot[untouched].any()


def test_later_steps_leave_rows_outside_the_batch_alone():
    table, kernel = _toy()
    lazy, dense = LazyAdam(0.01), tf.keras.optimizers.Adam(0.01)
    dense_table, dense_kernel = _toy()
    _step(lazy, table, kernel, tf.constant([1, 2]))
    _step(dense, dense_table, dense_kernel, tf.constant([1, 2]))
    after_first = table.numpy().copy()
    moments_first = _slots(lazy, table)
    _step(lazy, table, kernel, tf.constant([5]))
    _step(dense, dense_table, dense_kernel, tf.constant([5]))
    assert np.array_equal(table.numpy()[[1, 2]], after_first[[1, 2]])  # bit-identical
    for now, then in zip(_slots(lazy, table), moments_first):
        assert np.array_equal(now[[1, 2]], then[[1, 2]])
    # Dense Adam keeps moving rows 1 and 2 with their decaying momentum: the cost lazy saves.
    assert not np.allclose(dense_table.numpy()[[1, 2]], after_first[[1, 2]])
    assert not np.array_equal(table.numpy()[5], _toy()[0].numpy()[5])


def test_checkpoint_restores_weights_and_moments(tmp_path):
    table, kernel = _toy()
    optimizer = LazyAdam(0.01)
    _step(optimizer, table, kernel, tf.constant([2, 4]))
    path = tf.train.Checkpoint(optimizer=optimizer, table=table, kernel=kernel).save(
        str(tmp_path / "ckpt"))
    table2, kernel2 = _toy(seed=1)
    restored = LazyAdam(0.01)
    restored.build([table2, kernel2])
    tf.train.Checkpoint(optimizer=restored, table=table2, kernel=kernel2).restore(
        path).assert_consumed()
    assert np.array_equal(table2.numpy(), table.numpy())
    for a, b in zip(_slots(restored, table2), _slots(optimizer, table)):
        assert np.array_equal(a, b)
    assert int(restored.iterations) == 1
    _step(restored, table2, kernel2, tf.constant([2]))  # and it keeps training from there
    _step(optimizer, table, kernel, tf.constant([2]))
    assert np.array_equal(table2.numpy(), table.numpy())


def test_mixed_precision_loss_scaled():
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        optimizer = make_optimizer("lazy_adam", 0.01, 0.98)
        assert isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        assert isinstance(optimizer.inner_optimizer, LazyAdam)
        embedding = tf.keras.layers.Embedding(10, 4)
        dense = tf.keras.layers.Dense(1)
        ids = tf.constant([[1, 3], [3, 8]])
        dense(embedding(ids))
        before = embedding.embeddings.numpy().copy()
        variables = embedding.trainable_variables + dense.trainable_variables
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.cast(dense(embedding(ids)), tf.float32) ** 2)
            scaled = optimizer.get_scaled_loss(loss)
        grads = optimizer.get_unscaled_gradients(tape.gradient(scaled, variables))
        optimizer.apply_gradients(zip(grads, variables))
        after = embedding.embeddings.numpy()
        assert after.dtype == np.float32
        assert np.array_equal(after[[0, 2, 4, 5, 6, 7, 9]], before[[0, 2, 4, 5, 6, 7, 9]])
        assert not np.array_equal(after[[1, 3, 8]], before[[1, 3, 8]])
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)


MIRRORED = r"""
import sys
sys.path.insert(0, {root!r})
import tfenv
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from training.optimizers import LazyAdam

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
init = np.arange(40, dtype=np.float32).reshape(10, 4) / 40
with strategy.scope():
    table = tf.Variable(init)
    optimizer = LazyAdam(0.01)
    optimizer.build([table])
rows = tf.constant([[1, 3], [3, 7]])  # replica 0 reads rows 1, 3; replica 1 rows 3, 7

@tf.function
def step(batch):
    def replica_step(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(table, ids) ** 2)
        optimizer.apply_gradients([(tape.gradient(loss, table), table)])
    strategy.run(replica_step, args=(batch,))

dataset = strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensor_slices(rows).batch(2))
for batch in dataset:
    step(batch)
values = [v.numpy() for v in strategy.experimental_local_results(table)]
print("REPLICAS", strategy.num_replicas_in_sync)
print("SAME", all(np.array_equal(values[0], v) for v in values))
print("UNTOUCHED", np.array_equal(values[0][[0, 2, 4, 5, 6, 8, 9]], init[[0, 2, 4, 5, 6, 8, 9]]))
print("TOUCHED", not np.array_equal(values[0][[1, 3, 7]], init[[1, 3, 7]]))
"""


def test_mirrored_strategy_two_cpu_replicas():
    result = subprocess.run([sys.executable, "-c", MIRRORED.format(root=str(ROOT))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines["REPLICAS"] == "2"
    assert lines["SAME"] == lines["UNTOUCHED"] == lines["TOUCHED"] == "True"


@pytest.mark.parametrize("name, mode, expected", [
    ("auto", "sampled", "lazy_adam"), ("auto", "full", "adam"),
    ("adam", "sampled", "adam"), ("lazy_adam", "full", "lazy_adam")])
def test_auto_is_lazy_only_for_sampled_retrieval(name, mode, expected):
    assert resolve_optimizer(name, mode) == expected


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="optimizer"):
        resolve_optimizer("sgd", "full")
