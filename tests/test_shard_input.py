"""Window files for parameter-server workers: together they hold exactly the windows one
process trains on, one file per events shard, and too few shards for the workers is refused."""

import numpy as np
import pytest
import tensorflow as tf
from support import write_processed

from recdata import load_processed
from recdata.schema import DataError
from training.config import TrainConfig
from training.data import load_training_data
from training.sequences import build_sequences, training_arrays
from training.shard_input import (
    WINDOW_NAMES,
    check_worker_count,
    parse_record,
    write_window_shards,
)


def read_window_file(path) -> dict[str, np.ndarray]:
    """A window file's windows, as a worker's dataset parses them."""
    parts = [parse_record(r) for r in tf.data.TFRecordDataset(str(path))]
    return {name: np.concatenate([p[name].numpy() for p in parts]) for name in WINDOW_NAMES}


def _rows(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Windows as sortable rows (all arrays side by side)."""
    table = np.concatenate([arrays[n].astype(np.float64) for n in WINDOW_NAMES], axis=1)
    return table[np.lexsort(table.T[::-1])]


@pytest.mark.parametrize("windows", ["all", "last"])
def test_window_files_hold_the_one_process_windows(tmp_path, windows):
    data = write_processed(tmp_path / "data", num_users=90, seq_len=14,
                           event_types=("view", "purchase"), shards=4)
    _, events, manifest = load_processed(data)
    seqs = build_sequences(events, 24, cold_fraction=0.1, seed=3)
    whole = training_arrays(seqs, 5, windows)
    shards = write_window_shards(data, manifest, seqs, 5, windows, 3, 0.1, tmp_path / "input")
    assert [f.name for f in shards.files] == [f"part-{k:05d}.tfrecord" for k in range(4)]
    parts = [read_window_file(f) for f in shards.files]
    assert all(len(p["history"]) for p in parts)
    joined = {n: np.concatenate([p[n] for p in parts]) for n in WINDOW_NAMES}
    assert np.array_equal(_rows(joined), _rows(whole))
    assert shards.windows == len(whole["history"])
    assert shards.positions == int((whole["targets"] > 0).sum())
    assert shards.purchases == pytest.approx(
        float(whole["target_purchase"][whole["targets"] > 0].sum()))


def test_training_data_keeps_windows_out_of_memory_only_for_sharded_data(tmp_path):
    config = TrainConfig(max_seq_len=6, text_model="none")
    sharded = write_processed(tmp_path / "sharded", num_users=50, shards=2)
    data = load_training_data(config, sharded, window_dir=tmp_path / "input")
    assert data.windows is None and len(data.window_shards.files) == 2
    single = load_training_data(config, write_processed(tmp_path / "single", num_users=50),
                                window_dir=tmp_path / "input2")
    assert single.window_shards is None and data.window_count == single.window_count
    assert data.positions == single.positions
    with pytest.raises(ValueError, match="2 shard\\(s\\) for 3 workers.*--shards 3"):
        check_worker_count(len(data.window_shards.files), 3)


def test_a_worker_reads_and_checks_only_its_own_shards(tmp_path):
    data = write_processed(tmp_path / "data", num_users=80, shards=4)
    _, whole, _ = load_processed(data)
    with open(data / "events" / "part-00000.parquet", "ab") as shard:  # not worker 1's
        shard.write(b"changed")
    items, events, manifest = load_processed(data, shards=[1, 3])
    bounds = [0, 20, 40, 60, 80]  # users per shard: prepare_data's shard_bounds
    users = sorted(whole["user_id"].unique())
    own = set(users[bounds[1]:bounds[2]] + users[bounds[3]:bounds[4]])
    assert set(events["user_id"]) == own and len(items) == 24
    assert len(events) == int(whole["user_id"].isin(own).sum())
    with pytest.raises(DataError, match="part-00000.parquet: not a readable Parquet"):
        load_processed(data, shards=[0])
    with pytest.raises(DataError, match="part-00000.parquet"):
        load_processed(data)
    with pytest.raises(DataError, match="one file, not shards"):
        load_processed(write_processed(tmp_path / "single", num_users=10), shards=[0])
