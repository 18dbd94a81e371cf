"""Training input for parameter-server workers from sharded data (prepare_data.py --shards N):
each worker reads its own files through tf.data instead of windows shipped inside the dataset
function's graph.

The chief turns the events shards into window files one shard at a time (RUN/input/
part-NNNNN.tfrecord: the shard's users' training windows, built by the same
`training_arrays` as on one machine, so the files together hold exactly the one-process
windows). A shard is a range of users, so no user's windows span two files. Worker w of W reads
files w, w + W, w + 2W, ... (its index comes from the coordinator when its dataset is built),
shuffles them, cuts batches to their longest window and repeats. The chief keeps the whole
data for validation and test, as before; no worker holds anything but its own files.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from recdata.io import load_events_shard
from training.sequences import Sequences, build_sequences, training_arrays

log = logging.getLogger(__name__)

WINDOW_NAMES = ("history", "event_types", "targets", "target_values", "target_purchase")
_DTYPES = {
    "history": tf.int32,
    "event_types": tf.int32,
    "targets": tf.int32,
    "target_values": tf.float32,
    "target_purchase": tf.float32,
}
CHUNK = 1024  # windows per record
INPUT_DIR = "input"


@dataclass(frozen=True)
class WindowShards:
    """The window files and what they hold (the chief's view: no windows in memory)."""

    files: tuple[Path, ...]
    windows: int
    positions: int  # next-item targets
    purchases: float  # targets that are purchases


def write_window_shards(
    data_dir: Path,
    manifest: dict,
    seqs: Sequences,
    max_len: int,
    train_windows: str,
    seed: int,
    cold_fraction: float,
    out_dir: Path,
) -> WindowShards:
    """One window file per events shard, shard by shard (one shard in memory at a time).

    Sequences are built per shard with the whole data's event-type vocabulary and purchase
    rule (`seqs`), so ids and labels match the one-process windows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files, windows, positions, purchases = [], 0, 0, 0.0
    any_purchase = bool(seqs.any_purchase)
    # The shards load_processed has just checked against the manifest (rows, sha256).
    for shard in (Path(data_dir) / entry["file"] for entry in manifest["shards"]):
        events = load_events_shard(shard)
        part = build_sequences(
            events,
            seqs.num_items,
            cold_fraction,
            seed,
            event_vocab=seqs.event_vocab,
            any_purchase=any_purchase,
        )
        arrays = training_arrays(part, max_len, train_windows)
        path = out_dir / (shard.name.removesuffix(".parquet") + ".tfrecord")
        tmp = path.with_name(path.name + ".tmp")
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for start in range(0, len(arrays["history"]), CHUNK):
                writer.write(_record({n: arrays[n][start : start + CHUNK] for n in WINDOW_NAMES}))
        tmp.replace(path)
        files.append(path)
        windows += len(arrays["history"])
        positions += int((arrays["targets"] > 0).sum())
        purchases += float(arrays["target_purchase"][arrays["targets"] > 0].sum())
        log.debug("%s: %d windows from %d events", path.name, len(arrays["history"]), len(events))
    return WindowShards(tuple(files), windows, positions, purchases)


def _record(chunk: dict[str, np.ndarray]) -> bytes:
    feature = {
        name: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[tf.io.serialize_tensor(values).numpy()])
        )
        for name, values in chunk.items()
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_record(record: tf.Tensor) -> dict[str, tf.Tensor]:
    """One record: a chunk of windows, each array [windows, max_len]."""
    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in WINDOW_NAMES}
    fields = tf.io.parse_single_example(record, spec)
    return {
        name: tf.ensure_shape(tf.io.parse_tensor(fields[name], _DTYPES[name]), [None, None])
        for name in WINDOW_NAMES
    }


@dataclass(frozen=True)
class WorkerWindows:
    """A multiworker task's own training windows (from its shards) and the whole data's
    totals, which set the steps of an epoch (training/data.py multiworker_data)."""

    arrays: dict[str, np.ndarray]
    rank: int
    shards: list[str]  # the events shards the windows come from
    windows: int  # the whole data's
    positions: int
    purchases: float


def check_worker_count(shards: int, workers: int) -> None:
    if shards < workers:
        raise ValueError(
            f"the data has {shards} shard(s) for {workers} workers: every worker "
            f"reads its own, so prepare it with --shards {workers} or more"
        )


def sharded_dataset(
    shards: WindowShards,
    workers: int,
    batch_size: int,
    use_events: bool,
    shuffle_windows: int = 8192,
) -> tf.keras.utils.experimental.DatasetCreator:
    """The dataset function each parameter-server worker runs: its own files, shuffled (file
    order, then windows within a buffer), batched, cut to the longest window, repeated.
    Prints which files it reads to the worker's stderr (check_worker_count first)."""
    names = [n for n in WINDOW_NAMES if use_events or n != "event_types"]
    files = tf.constant([str(f) for f in shards.files])

    def cut(batch):
        width = tf.maximum(
            tf.reduce_max(tf.reduce_sum(tf.cast(batch["history"] > 0, tf.int32), axis=1)), 1
        )
        return {name: values[:, -width:] for name, values in batch.items()}

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        worker = tf.distribute.coordinator.experimental_get_current_worker_index()
        mine = tf.gather(files, tf.range(worker, len(shards.files), workers))
        tf.print(
            "towerrec input: worker", worker, "reads", mine, summarize=-1, output_stream=sys.stderr
        )
        seed = tf.cast(tf.timestamp() * 1e6, tf.int64)
        chunks = (
            tf.data.Dataset.from_tensor_slices(mine)
            .shuffle(len(shards.files), seed=seed)
            .interleave(tf.data.TFRecordDataset, cycle_length=2)
            .map(parse_record)
        )
        windows = chunks.map(lambda c: {n: c[n] for n in names}).unbatch()
        return (
            windows.shuffle(shuffle_windows, seed=seed)
            .batch(batch_size)
            .map(cut)
            .repeat()
            .prefetch(2)
        )

    return tf.keras.utils.experimental.DatasetCreator(dataset_fn)
