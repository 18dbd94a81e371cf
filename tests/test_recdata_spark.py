"""--engine spark (local[2]) against the DuckDB engine: the same rows, ids, splits, items and
manifest counts on every source's fixture and on Parquet shards; events always as shards listed
in the manifest; bad rows and a missing Java are refused with one line, exit 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_recdata_engines import CASES, LOG_FLAGS, argv, synthetic_log

from recdata import load_processed
from recdata.cli import main

# make test installs pyspark and .ci/run a Java runtime: a missing one fails, not skips.
assert shutil.which("java") or os.environ.get("JAVA_HOME"), (
    "the Spark tests need Java 17+ (apt-get install default-jre-headless)"
)

ROOT = Path(__file__).resolve().parents[1]
SPARK = "--engine spark --spark-master local[2]"


def assert_same_as_duckdb(tmp_path: Path, *parts, shards: int = 2) -> Path:
    """Spark and DuckDB with --shards `shards` (>= 2): the same tables, the same shards (rows
    and order), the same manifest but for the shards' checksums (other Parquet bytes)."""
    spark_out, duck_out = tmp_path / "spark", tmp_path / "duckdb"
    assert main(argv(*parts, SPARK, "--shards", shards, "--out", spark_out)) == 0
    assert main(argv(*parts, "--engine duckdb --shards", shards, "--out", duck_out)) == 0
    items_s, events_s, manifest_s = load_processed(spark_out)
    items_d, events_d, manifest_d = load_processed(duck_out)
    pd.testing.assert_frame_equal(items_s, items_d)
    pd.testing.assert_frame_equal(events_s, events_d)  # same rows, ids, splits and order
    for entry in manifest_d["shards"]:
        pd.testing.assert_frame_equal(
            pd.read_parquet(spark_out / entry["file"]), pd.read_parquet(duck_out / entry["file"])
        )
    for manifest in (manifest_s, manifest_d):
        for entry in manifest["shards"]:
            del entry["sha256"]
    assert manifest_s == manifest_d
    return spark_out


SPARK_CASES = ("sample", "online-retail-csv", "movielens-dat", "amazon-2023", "events-csv",
               "kcore", "sparser", "temporal-valid")  # fmt: skip


@pytest.mark.parametrize("case", SPARK_CASES)
def test_spark_writes_what_duckdb_writes(tmp_path, case):
    assert_same_as_duckdb(tmp_path, *CASES[case])


def test_spark_reads_parquet_shards_itself(tmp_path):
    log, items = synthetic_log(tmp_path, shards=3)
    out = assert_same_as_duckdb(
        tmp_path, "--source events --input", log, "--items", items, LOG_FLAGS, shards=3
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [
        f"events/part-{k:05d}.parquet" for k in range(len(manifest["shards"]))
    ]
    users = [set(pd.read_parquet(out / s["file"])["user_id"]) for s in manifest["shards"]]
    assert sum(map(len, users)) == len(set().union(*users))  # a user in one shard only


def test_spark_names_a_bad_csv_row_by_line(tmp_path, capsys):
    text = "user,item,ts\n" + "".join(f"u{k},i{k},{k}\n" for k in range(5)) + "u9,i1,soon\n"
    (tmp_path / "log.csv").write_text(text)
    code = main(argv("--source events --input", tmp_path / "log.csv",
                     "--user-col user --item-col item --time-col ts", SPARK,
                     "--out", tmp_path / "out"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "log.csv line 7: ts 'soon' is not a time" in err, err
    assert not (tmp_path / "out").exists()


def test_spark_without_java_is_refused_by_name(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env["PATH"] = str(Path(sys.executable).parent)  # python, no java
    result = subprocess.run(
        [sys.executable, str(ROOT / "prepare_data.py"), "--source", "sample", "--engine",
         "spark", "--out", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "prepare_data.py: error: --engine spark needs Java 17 or newer (no java on PATH or in "
        "JAVA_HOME)"
    )
    assert not (tmp_path / "out").exists()


def test_spark_refuses_a_log_with_a_header_only(tmp_path, capsys):
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n")
    code = main(argv("--source events --input", tmp_path / "log.csv", SPARK,
                     "--out", tmp_path / "out"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "log.csv: no events left after filtering (0 rows read" in err, err


def test_spark_reads_and_writes_uris_as_it_does_paths(tmp_path):
    # file:// goes through the same Hadoop file system calls as hdfs:// or s3a:// would.
    log, items = synthetic_log(tmp_path, shards=3)
    flags = ("--source events --items", items, LOG_FLAGS, SPARK, "--shards 2")
    assert main(argv(*flags, "--input", f"file://{log}", "--out", f"file://{tmp_path}/uri")) == 0
    assert main(argv(*flags, "--input", log, "--out", tmp_path / "path")) == 0
    items_u, events_u, manifest_u = load_processed(tmp_path / "uri")
    items_p, events_p, manifest_p = load_processed(tmp_path / "path")
    pd.testing.assert_frame_equal(items_u, items_p)
    pd.testing.assert_frame_equal(events_u, events_p)
    assert manifest_u == manifest_p  # inputs (names, bytes, sha256) and shards alike
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    # Again onto the same URI: the previous output is replaced.
    assert main(argv(*flags, "--input", f"file://{log}", "--out", f"file://{tmp_path}/uri")) == 0
    assert load_processed(tmp_path / "uri")[2] == manifest_p
