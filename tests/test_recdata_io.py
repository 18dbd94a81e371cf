"""recdata.io: writing is atomic, load_processed validates with errors that name the problem."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recdata import io as rio
from recdata.io import load_processed, make_manifest, write_processed
from recdata.process import ProcessOptions, build_processed
from recdata.schema import DataError
from recdata.synthetic import generate


@pytest.fixture(scope="module")
def processed():
    return build_processed(
        generate(num_users=50, num_items=40, num_events=800, seed=2), ProcessOptions()
    )


@pytest.fixture
def out(tmp_path, processed):
    path = tmp_path / "data"
    manifest = make_manifest("synthetic", (), {"seed": 2}, processed.counts)
    write_processed(path, processed.items, processed.events, manifest)
    return path


def test_round_trip_keeps_values_and_types(out, processed):
    items, events, manifest = load_processed(out)
    assert list(items.columns) == rio.ITEMS_SCHEMA.names
    assert list(events.columns) == rio.EVENTS_SCHEMA.names
    assert "count" in items.columns and "split" in events.columns
    assert items["item_idx"].dtype == np.int32 and items["count"].dtype == np.int64
    assert events["item_idx"].dtype == np.int32 and events["timestamp"].dtype == np.int64
    assert events["value"].dtype == np.float32 and items["price"].dtype == np.float64
    assert events["user_id"].tolist() == processed.events["user_id"].astype(str).tolist()
    assert events["split"].tolist() == processed.events["split"].astype(str).tolist()
    assert items["text"].tolist() == processed.items["text"].tolist()
    assert manifest["counts"] == json.loads(json.dumps(processed.counts))


def test_missing_file_is_named(out):
    (out / "events.parquet").unlink()
    with pytest.raises(DataError, match=r"events\.parquet: missing file"):
        load_processed(out)
    with pytest.raises(DataError, match=r"manifest\.json: missing file"):
        load_processed(out.parent / "nowhere")


def test_missing_column_is_named(out):
    table = pq.read_table(out / "events.parquet").drop_columns(["split"])
    pq.write_table(table, out / "events.parquet")
    with pytest.raises(
        DataError, match=r"events\.parquet: missing column 'split' \(found: user_id"
    ):
        load_processed(out)


def test_wrong_column_type_is_named(out):
    table = pq.read_table(out / "items.parquet")
    table = table.set_column(1, "item_idx", table.column("item_idx").cast("int64"))
    pq.write_table(table, out / "items.parquet")
    with pytest.raises(DataError, match="column 'item_idx' has type int64, expected int32"):
        load_processed(out)


def test_schema_version_is_checked(out):
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="schema_version 99, expected 1"):
        load_processed(out)


def test_non_contiguous_item_idx_is_rejected(out):
    table = pq.read_table(out / "items.parquet")
    shifted = table.column("item_idx").to_numpy() + 1
    table = table.set_column(1, "item_idx", pa.array(shifted))
    pq.write_table(table, out / "items.parquet")
    with pytest.raises(DataError, match="item_idx is not 1.."):
        load_processed(out)


def test_failed_write_leaves_nothing_behind(tmp_path, processed, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rio, "events_table", disk_full)
    target = tmp_path / "data"
    with pytest.raises(DataError, match="No space left on device"):
        write_processed(target, processed.items, processed.events, {})
    assert list(tmp_path.iterdir()) == []
