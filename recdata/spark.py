"""The Spark engine of prepare_data.py (`--engine spark`, requirements-spark.txt): the steps of
recdata/sqlsteps.py in Spark SQL on a Spark cluster (or `local[N]`), for logs that outgrow one
machine.

rn, each row's position in the input, comes from the shard's offset + `_metadata.row_index`
(Parquet) or zipWithIndex (CSV). Outputs: the same rows, ids and splits as the other engines
(tests/test_recdata_spark.py), always as shards events/part-NNNNN.parquet (users in ranges,
each shard sorted by user then time) listed with rows and sha256 in the manifest; Spark's
Parquet writer makes other bytes.

Reads and writes local paths (on a cluster: a path every node sees, e.g. a shared mount); the
output is assembled in a temp dir beside --out and renamed into place. Item metadata (one row
per item) and the per-user counts for the manifest come back to the driver.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recdata.io import (
    EVENTS_DIR,
    ITEMS_FILE,
    MANIFEST_FILE,
    check_replaceable,
    file_sha256,
    items_table,
    scratch_dir,
    shard_name,
    swap_into_place,
)
from recdata.schema import DataError
from recdata.sqlsteps import RAW_IDS, SqlSteps, events_frame
from recdata.tables import input_files

# Leading/trailing whitespace as a Java regex inside a Spark SQL literal (backslash escaped).
_WS = r"^\\p{Space}+|\\p{Space}+$"
_NUMERIC = {"tinyint", "smallint", "int", "bigint", "float", "double", "decimal"}


def check_available() -> None:
    """Exit-2 errors naming what --engine spark lacks: pyspark, or Java."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise DataError(
            "--engine spark needs pyspark: pip install 'pyspark>=4' (the spark extra)"
        ) from None
    java_home = os.environ.get("JAVA_HOME")
    if not shutil.which("java") and not (java_home and Path(java_home, "bin", "java").exists()):
        raise DataError("--engine spark needs Java 17 or newer (no java on PATH or in JAVA_HOME)")


def session(master: str | None, verbose: bool = False):
    """The SparkSession: spark-submit's when there is one, else `master` (default local[*]).
    Spark logs errors only unless verbose."""
    submitted = bool(os.environ.get("SPARK_ENV_LOADED"))
    if not submitted and not verbose:  # a JVM this process starts: quiet from its first line
        config = Path(__file__).with_name("spark-log4j2.properties")
        os.environ.setdefault(
            "PYSPARK_SUBMIT_ARGS",
            f'--driver-java-options "-Dlog4j2.configurationFile=file:{config}" pyspark-shell',
        )
    if not submitted and (master or "local").startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("towerrec-prepare")
    if master or not submitted:
        builder = builder.master(master or "local[*]")
    spark = (
        builder.config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.ansi.enabled", "false")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "8")
        .getOrCreate()
    )
    if not verbose:
        spark.sparkContext.setLogLevel("ERROR")
    return spark


class SparkEngine(SqlSteps):
    def __init__(self, spark):
        self.spark = spark
        self.user_codes = np.zeros(0, np.int64)

    # --- the primitives SqlSteps runs on -----------------------------------------------

    def _rows(self, query: str) -> list[tuple]:
        return [tuple(row) for row in self.spark.sql(query).collect()]

    def _frame(self, query: str) -> pd.DataFrame:
        return self.spark.sql(query).toPandas()

    def _store(self, name: str, query: str) -> int:
        frame = self.spark.sql(query).localCheckpoint()
        frame.createOrReplaceTempView(name)
        return frame.count()

    def _trim(self, expr: str) -> str:
        return f"regexp_replace({expr}, '{_WS}', '')"

    def _finite(self, value: str) -> str:
        return f"(NOT isnan({value}) AND abs({value}) != double('inf'))"

    def _timestamp_seconds(self, expr: str) -> str:
        return f"CAST(floor(unix_micros(CAST({expr} AS TIMESTAMP)) / 1000000) AS BIGINT)"

    def _iso(self, expr: str) -> str:
        return f"try_to_timestamp({expr})"

    def _kind(self, kind: str) -> str:
        if kind.startswith(("timestamp", "date")):
            return "time"
        if kind.split("(")[0] in _NUMERIC:
            return "number"
        return "string" if kind == "string" else ""

    def _col(self, name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    def _drop_random(self, fraction: float, seed: int) -> int:
        """The numpy permutation of the other engines over the rows in (u, ts, rn) order."""
        n = self._count("ev")
        rank = np.random.default_rng(seed).permutation(n)
        drop = np.flatnonzero(rank < round(fraction * n)).astype(np.int64)
        del rank
        from pyspark.sql import types as T

        ev = self.spark.sql("SELECT * FROM ev ORDER BY u, ts, rn")
        schema = T.StructType([*ev.schema.fields, T.StructField("pos", T.LongType())])
        ordered = ev.rdd.zipWithIndex().map(lambda r: (*r[0], r[1]))
        self.spark.createDataFrame(ordered, schema).createOrReplaceTempView("ev_pos")
        self.spark.createDataFrame(pd.DataFrame({"pos": drop})).createOrReplaceTempView("drop_pos")
        return self._replace(
            "SELECT CAST(rn AS BIGINT) AS rn, CAST(u AS INT) AS u, CAST(i AS INT) AS i, "
            "CAST(ts AS BIGINT) AS ts, CAST(e AS INT) AS e, CAST(value AS FLOAT) AS value "
            "FROM ev_pos LEFT ANTI JOIN drop_pos USING (pos)"
        )

    # --- input -------------------------------------------------------------------------

    def load_frame(self, events: pd.DataFrame) -> None:
        frame = events_frame(events).astype({"value": np.float64})
        self.spark.createDataFrame(frame).createOrReplaceTempView("source")
        self._encode("source", RAW_IDS, "timestamp", "value")

    def load_files(self, path: Path, columns, skip_bad_lines: bool) -> tuple[int, int, tuple]:
        """An events file or directory of Parquet shards, with the DuckDB engine's checks;
        (rows read, rows skipped as bad, files)."""
        from pyspark.sql import functions as F
        from pyspark.sql import types as T

        files = input_files(path)
        delimiter = None
        if not (path.is_dir() or path.name.lower().endswith((".parquet", ".pq"))):
            delimiter = "\t" if ".tsv" in path.name.lower() else ","
            raw = (
                self.spark.read.option("header", True)
                .option("sep", delimiter)
                .option("multiLine", True)
                .option("escape", '"')
                .option("mode", "DROPMALFORMED" if skip_bad_lines else "FAILFAST")
                .csv(str(files[0]))
            )
            indexed = raw.rdd.zipWithIndex().map(lambda r: (r[1], *r[0]))
            schema = T.StructType([T.StructField("rn", T.LongType()), *raw.schema.fields])
            scan = self.spark.createDataFrame(indexed, schema).withColumn("row", F.lit(None))
        else:
            offsets = np.cumsum([0, *(pq.ParquetFile(f).metadata.num_rows for f in files)])
            parts = []
            for f, base in zip(files, offsets[:-1], strict=True):
                part = self.spark.read.parquet(str(f)).select("*", "_metadata.row_index")
                parts.append(
                    part.withColumn("rn", F.col("row_index") + F.lit(int(base)))
                    .withColumn("row", F.col("row_index") + 1)
                    .withColumn("filename", F.lit(str(f)))
                    .drop("row_index")
                )
            scan = parts[0]
            for part in parts[1:]:
                scan = scan.unionByName(part)
        scan.createOrReplaceTempView("scan")
        rows_read, checks = self._checked_encode(path, columns, dict(scan.dtypes), delimiter)
        bad = rows_read - self._count("ev")
        if bad and not skip_bad_lines:
            raise DataError(self._first_bad(checks, files, delimiter))
        return rows_read, bad, files

    # --- output ------------------------------------------------------------------------

    def write(self, out: Path, items: pd.DataFrame, manifest: dict, shards: int) -> None:
        """The data directory, atomically: Spark writes the events shards (users in ranges,
        each sorted by user then time), renamed part-NNNNN.parquet and listed in the manifest."""
        out = Path(out)
        check_replaceable(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = scratch_dir(out.parent, f"{out.name}.tmp")
        try:
            written = tmp / "spark-events"
            (
                self.spark.sql(self.output_query())
                .repartitionByRange(shards, "u")
                .sortWithinPartitions("u", "timestamp", "rn")
                .drop("u", "rn")
                .write.parquet(str(written), compression="zstd")
            )
            (tmp / EVENTS_DIR).mkdir()
            listed = []
            for k, part in enumerate(sorted(written.glob("part-*.parquet"))):
                target = tmp / shard_name(k)
                part.rename(target)
                rows = pq.ParquetFile(target).metadata.num_rows
                listed.append({"file": shard_name(k), "rows": rows, "sha256": file_sha256(target)})
            shutil.rmtree(written)
            pq.write_table(items_table(items), tmp / ITEMS_FILE, compression="zstd")
            manifest = manifest | {"shards": listed}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
