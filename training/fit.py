"""The training loop's pieces: distribution strategy and precision, optimizer, the batched
dataset of training windows, and Keras `fit` with validation callbacks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from towers import run_dir as run_files
from towers.model import TwoTowerModel
from training.config import TrainConfig

log = logging.getLogger(__name__)


def make_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """MirroredStrategy over every visible GPU (or as asked); the default strategy otherwise.

    Mixed precision is switched on with GPUs (float16 compute, float32 variables).
    """
    gpus = tf.config.list_physical_devices("GPU")
    if config.mixed_precision == "on" or (config.mixed_precision == "auto" and gpus):
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
    else:
        tf.keras.mixed_precision.set_global_policy("float32")
    if config.distribute == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if config.distribute == "mirrored" or (config.distribute == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def device_name() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    return f"{len(gpus)} GPU(s)" if gpus else f"CPU ({os.cpu_count()} cores)"


def training_dataset(arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                     use_events: bool, bucket_batches: int = 32) -> tf.data.Dataset:
    """Shuffled batches of left-padded windows, cut to the longest window in each batch.

    Sequences are shuffled, then sorted by length inside groups of `bucket_batches` batches,
    so a batch holds windows of similar length and the all-padding columns on its left can be
    dropped (exact: positions count from the newest item). Saves most of the attention cost
    on data sets whose users are mostly shorter than max_seq_len. Reshuffled every epoch.
    """
    names = ["history", "targets", "target_values", "target_purchase"]
    if use_events:
        names.append("event_types")
    lengths = (arrays["history"] > 0).sum(axis=1)
    rng = np.random.default_rng(seed)
    group = batch_size * max(bucket_batches, 1)  # 0 or 1: plain shuffled batches

    def batches():
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
    return tf.data.Dataset.from_generator(batches, output_signature=signature).prefetch(2)


def fit(model: TwoTowerModel, windows: dict[str, np.ndarray], config: TrainConfig,
        run_dir: Path, validation: tf.keras.callbacks.Callback, use_events: bool) -> None:
    """Keras fit over the training windows until the epochs, patience or budget run out; the
    validation callback logs each epoch's line, CSVLogger and TensorBoard keep the curves."""
    dataset = training_dataset(windows, config.batch_size, config.seed, use_events,
                               config.bucket_batches)
    callbacks = [validation, tf.keras.callbacks.CSVLogger(str(run_dir / run_files.HISTORY)),
                 tf.keras.callbacks.TensorBoard(str(run_dir / "tensorboard"),
                                                write_graph=False, profile_batch=0)]
    model.fit(dataset, epochs=config.epochs, callbacks=callbacks, verbose=0)
