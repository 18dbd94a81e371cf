"""The DuckDB engine against the pandas reference: every source, every format, every option
gives the same files (byte for byte: same rows, ids, splits, order, manifest); bad input is
refused the same way; the memory limit is a setting."""

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recdata import DataError, duck, load_processed
from recdata.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "recdata"
FILES = ("items.parquet", "events.parquet", "manifest.json")
EVENT_FLAGS = "--user-col user --item-col item --time-col ts --event-col action --value-col weight"
ITEM_FLAGS = (
    "--item-id-col id --text-cols title,desc --category-col cat --brand-col maker --price-col cost"
)


def argv(*parts) -> list[str]:
    out: list[str] = []
    for part in parts:
        out.extend([str(part)] if isinstance(part, Path) else str(part).split())
    return out


def prepare(tmp_path: Path, engine: str, *parts) -> tuple[int, Path]:
    out = tmp_path / f"out-{engine}"
    return main(argv(*parts, "--engine", engine, "--out", out)), out


def assert_same_outputs(tmp_path: Path, *parts) -> Path:
    """Both engines succeed and write identical files; returns the DuckDB output."""
    code_pandas, pandas_out = prepare(tmp_path, "pandas", *parts)
    code_duckdb, duckdb_out = prepare(tmp_path, "duckdb", *parts)
    assert (code_pandas, code_duckdb) == (0, 0)
    names = sorted(str(f.relative_to(pandas_out)) for f in pandas_out.rglob("*") if f.is_file())
    assert names == sorted(
        str(f.relative_to(duckdb_out)) for f in duckdb_out.rglob("*") if f.is_file()
    )
    assert set(FILES) - {"events.parquet"} <= set(names)
    for name in names:
        a, b = (pandas_out / name).read_bytes(), (duckdb_out / name).read_bytes()
        if a != b and name.endswith(".parquet"):  # say which rows differ before failing
            pd.testing.assert_frame_equal(
                pd.read_parquet(pandas_out / name), pd.read_parquet(duckdb_out / name)
            )
        assert a == b, f"{name} differs between the engines"
    return duckdb_out


def events_csv(tmp_path: Path, text: str, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


SYNTHETIC = "--source synthetic --num-users 400 --num-items 300 --num-events 9000 --seed 4"


# Every source's fixture and every processing option (the Spark test runs a subset).
CASES = {
    "sample": ("--source sample",),
    "online-retail-csv": ("--source online-retail --input", FIXTURES / "online_retail.csv"),
    "movielens-dat": ("--source movielens --ratings", FIXTURES / "ml_ratings.dat",
                      "--movies", FIXTURES / "ml_movies.dat", "--min-seq-len 3"),
    "movielens-csv": ("--source movielens --ratings", FIXTURES / "ml_ratings.csv",
                      "--movies", FIXTURES / "ml_movies.csv", "--min-seq-len 3"),
    "amazon-2018": ("--source amazon --reviews", FIXTURES / "amazon2018_reviews.json",
                    "--meta", FIXTURES / "amazon2018_meta.json"),
    "amazon-2023": ("--source amazon --reviews", FIXTURES / "amazon2023_reviews.jsonl",
                    "--meta", FIXTURES / "amazon2023_meta.jsonl"),
    "events-csv": ("--source events --input", FIXTURES / "events.csv", EVENT_FLAGS,
                   "--items", FIXTURES / "items.csv", ITEM_FLAGS),
    "synthetic": (SYNTHETIC,),
    "keep-repeats": (SYNTHETIC, "--keep-repeats"),
    "kcore": (SYNTHETIC, "--kcore-users 8 --kcore-items 12 --min-seq-len 4"),
    "sparser": (SYNTHETIC, "--max-user-events 9 --drop-events 0.3 --seed 2"),
    "temporal-valid": (SYNTHETIC, "--split temporal --cutoff 1620000000 --valid-cutoff 1615000000"),
    "temporal": (SYNTHETIC, "--split temporal --cutoff 2021-05-01 --min-seq-len 1"),
}  # fmt: skip


@pytest.mark.parametrize("parts", list(CASES.values()), ids=list(CASES))
def test_engines_write_identical_files(tmp_path, parts):
    assert_same_outputs(tmp_path, *parts)


def synthetic_log(tmp_path: Path, shards: int = 1) -> tuple[Path, Path]:
    """A synthetic log written as Parquet (one file, or `shards` files by user) and its items."""
    code = main(argv(SYNTHETIC, "--engine pandas", "--out", tmp_path / "base"))
    assert code == 0
    events = pd.read_parquet(tmp_path / "base" / "events.parquet")
    items = pd.read_parquet(tmp_path / "base" / "items.parquet")
    # Back to a raw log: item ids, file order by time, repeats added, a column of ISO times.
    log = events.assign(item_id=items["item_id"].to_numpy()[events["item_idx"] - 1])
    log = pd.concat([log, log.iloc[::7]]).sort_values("timestamp", kind="stable")
    log = log.drop(columns=["item_idx", "split"]).reset_index(drop=True)
    items_path = tmp_path / "items.parquet"
    items.drop(columns=["item_idx", "count"]).to_parquet(items_path)
    if shards == 1:
        path = tmp_path / "log.parquet"
        log.to_parquet(path)
        return path, items_path
    path = tmp_path / "shards"
    path.mkdir()
    owner = log["user_id"].map(hash) % shards
    for k in range(shards):
        log[owner == k].to_parquet(path / f"part-{k:05d}.parquet")
    return path, items_path


LOG_FLAGS = (
    "--event-col event_type --value-col value --text-cols text --category-col category "
    "--brand-col brand --price-col price"
)


def test_parquet_log_and_item_table_give_identical_files(tmp_path):
    log, items = synthetic_log(tmp_path)
    assert_same_outputs(tmp_path, "--source events --input", log, "--items", items, LOG_FLAGS)


def test_directory_of_shards_is_read_as_one_log(tmp_path):
    log, items = synthetic_log(tmp_path, shards=3)
    out = assert_same_outputs(tmp_path, "--source events --input", log, "--items", items, LOG_FLAGS)
    manifest = (out / "manifest.json").read_text()
    assert all(f"part-{k:05d}.parquet" in manifest for k in range(3))  # each shard an input


def test_gzip_csv_with_iso_times_and_millisecond_times(tmp_path):
    iso = "user,item,ts\n" + "".join(
        f"u{u}, i{(u * 7 + k) % 9} ,2021-03-0{1 + k}T10:00:0{u % 10}+01:00\n"
        for u in range(30)
        for k in range(5)
    )
    path = tmp_path / "iso.csv.gz"
    path.write_bytes(gzip.compress(iso.encode()))
    assert_same_outputs(
        tmp_path, "--source events --input", path, "--user-col user --item-col item --time-col ts"
    )
    ms = "user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{(u + k) % 11},{1_600_000_000_000 + 1000 * (u * 10 + k) + 999}\n"
        for u in range(40)
        for k in range(4)
    )
    assert_same_outputs(tmp_path / "", "--source events --input", events_csv(tmp_path, ms))


def test_skipped_bad_rows_are_counted_alike(tmp_path):
    text = (
        "user,item,ts,w\n"
        + "".join(f"u{u},i{(u + k) % 5},{100 + k},1\n" for u in range(6) for k in range(4))
        + "u1,,105,1\nu2,i1,yesterday,1\n  ,i3,106,1\nu3,i2,107,heavy\n"
    )
    path = events_csv(tmp_path, text)
    out = assert_same_outputs(
        tmp_path, "--source events --input", path,
        "--user-col user --item-col item --time-col ts --value-col w --skip-bad-lines",
    )  # fmt: skip
    assert '"bad_lines_skipped": 4' in (out / "manifest.json").read_text()


@pytest.mark.parametrize(
    "row, message",
    [
        ("u9,,5\n", "log.csv line 7: missing item"),
        ("u9,i1,soon\n", "log.csv line 7: ts 'soon' is not a time"),
    ],
)
def test_bad_csv_row_is_named_by_line_like_the_pandas_engine(tmp_path, capsys, row, message):
    text = "user,item,ts\n" + "".join(f"u{k},i{k},{k}\n" for k in range(5)) + row
    path = events_csv(tmp_path, text)
    for engine in ("pandas", "duckdb"):
        code, out = prepare(
            tmp_path, engine, "--source events --input", path,
            "--user-col user --item-col item --time-col ts",
        )  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and message in err, (engine, err)
        assert len(err.strip().splitlines()) == 1
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left


def test_bad_parquet_row_names_the_shard_and_row(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    good = pa.table(
        {"user_id": ["a", "a", "a"], "item_id": ["x", "y", "z"], "timestamp": [1, 2, 3]}
    )
    pq.write_table(good, shards / "part-0.parquet")
    pq.write_table(
        good.set_column(1, "item_id", pa.array(["x", None, "z"])), shards / "part-1.parquet"
    )
    for engine in ("pandas", "duckdb"):
        code, _ = prepare(tmp_path, engine, "--source events --input", shards)
        err = capsys.readouterr().err
        assert code == 2 and "part-1.parquet row 2: missing item_id" in err, (engine, err)


def test_shards_with_mismatched_schemas_are_refused_by_name(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    table = pa.table({"user_id": ["a"] * 3, "item_id": ["x", "y", "z"], "timestamp": [1, 2, 3]})
    pq.write_table(table, shards / "part-0.parquet")
    pq.write_table(table.set_column(2, "timestamp", pa.array(["1", "2", "3"])),
                   shards / "part-1.parquet")  # fmt: skip
    for engine in ("pandas", "duckdb"):
        code, out = prepare(tmp_path, engine, "--source events --input", shards)
        err = capsys.readouterr().err
        assert code == 2 and "part-1.parquet: schema (" in err and "differs" in err, err
        assert not out.exists()


def test_memory_limit_is_a_setting(tmp_path, capsys, monkeypatch):
    limits = []
    real = duck.Engine.__init__

    def spy(self, memory_limit, *args, **kwargs):
        real(self, memory_limit, *args, **kwargs)
        limits.append(self._rows("SELECT current_setting('memory_limit')")[0][0])

    monkeypatch.setattr(duck.Engine, "__init__", spy)
    code, out = prepare(tmp_path, "duckdb", SYNTHETIC, "--memory-limit 256MB")
    assert code == 0 and (out / "events.parquet").is_file()
    assert limits == ["244.0 MiB"]  # 256 * 10**6 bytes, as DuckDB reports it
    code, _ = prepare(tmp_path, "pandas", SYNTHETIC, "--memory-limit 256MB")
    assert code == 2 and "--memory-limit applies to --engine duckdb" in capsys.readouterr().err
    code, _ = prepare(tmp_path, "duckdb", SYNTHETIC, "--memory-limit lots")
    assert code == 2 and "'lots' is not a size" in capsys.readouterr().err


# --- Sharded output --------------------------------------------------------------------------


def test_shards_split_users_and_match_the_single_file(tmp_path):
    out = assert_same_outputs(tmp_path / "sharded", SYNTHETIC, "--shards 3")
    code, single = prepare(tmp_path, "duckdb", SYNTHETIC)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [
        f"events/part-{k:05d}.parquet" for k in range(3)
    ]
    assert not (out / "events.parquet").exists()
    parts = [pd.read_parquet(out / s["file"]) for s in manifest["shards"]]
    assert [len(p) for p in parts] == [s["rows"] for s in manifest["shards"]]
    users = [set(p["user_id"]) for p in parts]
    assert all(users) and not (users[0] & users[1] or users[1] & users[2] or users[0] & users[2])
    whole = pd.read_parquet(single / "events.parquet")
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)
    _, events, _ = load_processed(out)
    pd.testing.assert_frame_equal(events, whole)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("extra", "part-00003.parquet: shard not listed in"),
        ("missing", "part-00001.parquet: missing shard (listed in"),
        ("changed", "part-00002.parquet: sha256 does not match manifest.json"),
        ("rows", "part-00000.parquet: 5 rows, manifest.json says"),
    ],
)
def test_damaged_shards_are_refused_by_name(tmp_path, damage, message):
    code, out = prepare(tmp_path, "duckdb", SYNTHETIC, "--shards 3")
    assert code == 0
    shard = out / "events" / "part-00000.parquet"
    if damage == "extra":
        shutil.copy(shard, out / "events" / "part-00003.parquet")
    elif damage == "missing":
        (out / "events" / "part-00001.parquet").unlink()
    elif damage == "changed":  # same rows, other bytes
        path = out / "events" / "part-00002.parquet"
        pq.write_table(pq.read_table(path), path, compression="snappy")
    else:
        pq.write_table(pq.read_table(shard).slice(0, 5), shard)
    with pytest.raises(DataError, match=re.escape(message)):
        load_processed(out)


def test_spark_engine_without_pyspark_is_refused_by_name(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # import pyspark -> ImportError
    code, out = prepare(tmp_path, "spark", "--source sample")
    err = capsys.readouterr().err
    assert code == 2 and "--engine spark needs pyspark" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_what_a_killed_run_left_is_removed_by_the_next(tmp_path):
    host = socket.gethostname().replace("-", "_")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a PID that no longer runs: a killed prepare_data.py's
    left = [tmp_path / f".prepare-duckdb-{host}-{gone.pid}-x1",
            tmp_path / f".out-duckdb.tmp-{host}-{gone.pid}-x2"]  # fmt: skip
    kept = [tmp_path / f".prepare-duckdb-{host}-{os.getpid()}-x3",  # a live process's
            tmp_path / f".prepare-duckdb-otherhost-{gone.pid}-x4"]  # another host's
    for directory in left + kept:
        directory.mkdir()
        (directory / "spill.bin").write_bytes(b"x" * 1000)
    code, out = prepare(tmp_path, "duckdb", SYNTHETIC)
    assert code == 0 and (out / "manifest.json").is_file()
    assert [d.exists() for d in left] == [False, False]
    assert [d.exists() for d in kept] == [True, True]


def test_a_log_with_a_header_only_is_refused_alike(tmp_path, capsys):
    path = events_csv(tmp_path, "user_id,item_id,timestamp\n")
    for engine in ("pandas", "duckdb"):
        code, out = prepare(tmp_path, engine, "--source events --input", path)
        err = capsys.readouterr().err
        assert code == 2 and "log.csv: no events left after filtering (0 rows read" in err, err
        assert not out.exists()


@pytest.mark.parametrize("engine", ["duckdb", "pandas"])
def test_uris_need_the_spark_engine(tmp_path, capsys, engine):
    code, out = prepare(tmp_path, engine, "--source events --input hdfs://head/logs")
    err = capsys.readouterr().err
    assert code == 2 and "--input hdfs://head/logs: URIs need --engine spark" in err, err


def test_default_memory_limit_follows_a_container_limit(tmp_path):
    physical = duck.machine_memory(())
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")  # cgroup v2 without a limit
    v1.write_text(f"{2**63 - 4096}\n")  # cgroup v1 without a limit: a huge number
    assert duck.machine_memory((v2, v1, tmp_path / "absent")) == physical
    v2.write_text(f"{2 * 2**30}\n")  # a 2 GiB container
    assert duck.machine_memory((v2, v1)) == min(physical, 2 * 2**30)
