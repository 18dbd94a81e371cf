"""The training loop's pieces: distribution strategy and precision, the batched dataset of
training windows (a generator on one machine, a per-worker dataset function for parameter
servers), and Keras `fit` with validation callbacks."""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from towers import run_dir as run_files
from towers.model import TwoTowerModel
from training.cluster import ClusterTask, parameter_server_strategy
from training.config import TrainConfig
from training.precision import Precision
from training.resume import epoch_seed
from training.shard_input import WindowShards, WorkerWindows, sharded_dataset

log = logging.getLogger(__name__)


def make_strategy(config: TrainConfig, task: ClusterTask, precision: Precision,
                  catalog_rows: int = 0) -> tf.distribute.Strategy:
    """The strategy of `config.distribute`: MirroredStrategy over every visible GPU (or as
    asked), MultiWorkerMirroredStrategy or ParameterServerStrategy over TF_CONFIG's cluster
    (`task`; item tables of `catalog_rows` rows sharded across the ps tasks), else the default.
    Sets the Keras policy of `precision` (training/precision.py) first.
    """
    gpus = tf.config.list_physical_devices("GPU")
    tf.keras.mixed_precision.set_global_policy(precision.policy)
    if task.mode == "parameter_server":
        return parameter_server_strategy(task, config.ps_shards, catalog_rows)
    if task.mode == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if config.distribute == "mirrored" or (config.distribute == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def device_name() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    return f"{len(gpus)} GPU(s)" if gpus else f"CPU ({os.cpu_count()} cores)"


def training_dataset(arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                     use_events: bool, bucket_batches: int = 32,
                     epoch_of: Callable[[], int] | None = None) -> tf.data.Dataset:
    """Shuffled batches of left-padded windows, cut to the longest window in each batch.

    Sequences are shuffled, then sorted by length inside groups of `bucket_batches` batches,
    so a batch holds windows of similar length and the all-padding columns on its left can be
    dropped (exact: positions count from the newest item). Saves most of the attention cost
    on data sets whose users are mostly shorter than max_seq_len. Reshuffled every epoch, in
    an order that depends on the seed and the epoch number only, so a resumed run sees the
    batches the uninterrupted one would. `epoch_of()` says which epoch a pass is for (default:
    0, 1, 2, ... per pass). Keras starts and drops one extra iterator before the first epoch,
    which may or may not reach the generator: fit's epoch number comes from a callback.
    """
    names = ["history", "targets", "target_values", "target_purchase"]
    if use_events:
        names.append("event_types")
    lengths = (arrays["history"] > 0).sum(axis=1)
    group = batch_size * max(bucket_batches, 1)  # 0 or 1: plain shuffled batches
    if epoch_of is None:
        passes = itertools.count()
        epoch_of = lambda: next(passes)  # noqa: E731

    def batches():
        rng = epoch_seed(seed, epoch_of())
        order = rng.permutation(len(lengths))
        chunks = []
        for start in range(0, len(order), group):
            part = order[start:start + group]
            part = part[np.argsort(lengths[part], kind="stable")]
            chunks += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
        for b in rng.permutation(len(chunks)):
            rows = np.sort(chunks[b])
            width = max(int(lengths[rows].max()), 1)
            yield {name: arrays[name][rows, -width:] for name in names}

    signature = {name: tf.TensorSpec([None, None], arrays[name].dtype) for name in names}
    # A known length: Keras then runs exactly that many steps from the first epoch on. Without
    # it, the first epoch of a process ends with a step that fails on the exhausted iterator,
    # and that step's random draws (which do not wait for the data) would still advance the
    # model's generator: a resumed run would drift from the uninterrupted one.
    n = len(lengths)
    size = sum(math.ceil(min(group, n - start) / batch_size) for start in range(0, n, group))
    return (tf.data.Dataset.from_generator(batches, output_signature=signature)
            .apply(tf.data.experimental.assert_cardinality(size)).prefetch(2))


# Constants inside a graph travel in one protobuf, capped at 2 GB (less the graph itself).
GRAPH_CONSTANT_LIMIT = int(os.environ.get("TOWERREC_GRAPH_CONSTANT_LIMIT", 2**31 - 2**26))


def check_graph_windows(arrays: dict[str, np.ndarray]) -> None:
    """Refuse windows that cannot travel inside parameter_server_dataset's graph (the
    parameter-server chief calls it before connecting to the cluster)."""
    size = sum(values.nbytes for values in arrays.values())
    if size > GRAPH_CONSTANT_LIMIT:
        raise ValueError(
            f"{len(arrays['history']):,} training windows ({size / 2**20:,.1f} MiB) do not fit "
            f"in the dataset function's graph (limit {GRAPH_CONSTANT_LIMIT / 2**20:,.1f} MiB): "
            "prepare the data with --shards N (N >= workers) and each worker reads its own")


def parameter_server_dataset(arrays: dict[str, np.ndarray], batch_size: int,
                             use_events: bool) -> tf.keras.utils.experimental.DatasetCreator:
    """The training windows for parameter-server workers: each worker runs this dataset
    function itself, so it is built from tensors (`from_generator` cannot run remotely):
    shuffled, batched, cut to the longest window in each batch, repeated.

    The windows travel inside the function's graph (a 2 GB protobuf limit). Every worker
    shuffles with its own seed (its clock when the dataset is built): steps go to whichever
    worker is free, so training is not reproducible under this strategy anyway. No length
    bucketing.
    """
    names = ["history", "targets", "target_values", "target_purchase"]
    if use_events:
        names.append("event_types")
    windows = {name: arrays[name] for name in names}

    def cut(batch):
        width = tf.maximum(tf.reduce_max(tf.reduce_sum(
            tf.cast(batch["history"] > 0, tf.int32), axis=1)), 1)
        return {name: values[:, -width:] for name, values in batch.items()}

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        seed = tf.cast(tf.timestamp() * 1e6, tf.int64)
        return (tf.data.Dataset.from_tensor_slices(windows)
                .shuffle(len(arrays["history"]), seed=seed).batch(batch_size).map(cut)
                .repeat().prefetch(2))

    return tf.keras.utils.experimental.DatasetCreator(dataset_fn)


def worker_dataset(
    own: WorkerWindows, batch_size: int, seed: int, use_events: bool, bucket_batches: int,
    first_epoch: int = 0,
) -> tf.keras.utils.experimental.DatasetCreator:
    """The dataset function of a multiworker task: its own windows in length-bucketed batches
    of its share of the global `batch_size`, reshuffled every pass over them (seeded by the
    seed, its rank and the pass, counted from `first_epoch` so a resumed run does not repeat
    the first order), repeated: the epoch's length is set by the whole data's steps, the same
    on every task, since one that ran out would leave the others waiting in an all-reduce."""

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = -(-batch_size // context.num_replicas_in_sync)
        passes = itertools.count(first_epoch)
        return training_dataset(own.arrays, per_replica, seed * 1000 + own.rank, use_events,
                                bucket_batches, epoch_of=lambda: next(passes)).repeat()

    return tf.keras.utils.experimental.DatasetCreator(dataset_fn)


def fit(model: TwoTowerModel, windows: dict[str, np.ndarray] | WindowShards | WorkerWindows,
        config: TrainConfig, run_dir: Path, callbacks: list[tf.keras.callbacks.Callback],
        use_events: bool, first_epoch: int = 0, workers: int = 1) -> None:
    """Keras fit over the training windows from `first_epoch` until the epochs, patience or
    budget run out; `callbacks` (validation first) log each epoch's line, CSVLogger and
    TensorBoard keep the curves. Under ParameterServerStrategy the chief schedules an epoch's
    steps on the `workers` workers, which read window files when `windows` is WindowShards;
    every task of a multiworker cluster trains on its own windows when they are WorkerWindows."""
    steps = None
    strategy = model.distribute_strategy
    if isinstance(windows, WorkerWindows):
        dataset = worker_dataset(windows, config.batch_size, config.seed, use_events,
                                 config.bucket_batches, first_epoch)
        steps = math.ceil(windows.windows / config.batch_size)
    elif isinstance(windows, WindowShards):
        dataset = sharded_dataset(windows, workers, config.batch_size, use_events)
        steps = math.ceil(windows.windows / config.batch_size)
    elif isinstance(strategy, tf.distribute.ParameterServerStrategy):
        dataset = parameter_server_dataset(windows, config.batch_size, use_events)
        steps = math.ceil(len(windows["history"]) / config.batch_size)
    else:
        upcoming = [first_epoch]  # the epoch the next pass over the data is for
        dataset = training_dataset(windows, config.batch_size, config.seed, use_events,
                                   config.bucket_batches, epoch_of=lambda: upcoming[0])
        callbacks = [*callbacks, tf.keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: upcoming.__setitem__(0, epoch + 1))]
    callbacks = [*callbacks,
                 tf.keras.callbacks.CSVLogger(str(run_dir / run_files.HISTORY),
                                              append=first_epoch > 0),
                 tf.keras.callbacks.TensorBoard(str(run_dir / "tensorboard"),
                                                write_graph=False, profile_batch=0)]
    model.fit(dataset, epochs=config.epochs, steps_per_epoch=steps, callbacks=callbacks,
              verbose=0, initial_epoch=first_epoch)
