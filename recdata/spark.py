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
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recdata.duck import Loaded
from recdata.io import (
    EVENTS_DIR,
    ITEMS_FILE,
    MANIFEST_FILE,
    check_replaceable,
    describe_file,
    file_sha256,
    items_table,
    scratch_dir,
    shard_bounds,
    shard_name,
    swap_into_place,
)
from recdata.schema import EVENTS_SCHEMA, DataError
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
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    if not verbose:
        spark.sparkContext.setLogLevel("ERROR")
    return spark


class SparkEngine(SqlSteps):
    def __init__(self, spark):
        self.spark = spark
        self.hadoop = Hadoop(spark)
        self.user_codes = np.zeros(0, np.int64)

    def describe_input(self, location: Path | str) -> dict:
        """An input file for the manifest: name, bytes, sha256 (URIs: hashed by Spark)."""
        if isinstance(location, Path):
            return describe_file(location)
        return self.hadoop.describe([location])[0]

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

    def load_files(self, path: Path | str, columns, skip_bad_lines: bool) -> tuple[int, int, tuple]:
        """An events file or directory of Parquet shards (a local path or a URI), with the
        DuckDB engine's checks; (rows read, rows skipped as bad, files)."""
        from pyspark.sql import functions as F
        from pyspark.sql import types as T

        uri = isinstance(path, str)
        files = self.hadoop.files(path) if uri else input_files(path)
        name = path.rstrip("/").rsplit("/", 1)[-1].lower() if uri else path.name.lower()
        directory = self.hadoop.is_dir(path) if uri else path.is_dir()
        delimiter = None
        if not (directory or name.endswith((".parquet", ".pq"))):
            delimiter = "\t" if ".tsv" in name else ","
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
            rows = (
                (self.hadoop.rows(f) for f in files)
                if uri
                else (pq.ParquetFile(f).metadata.num_rows for f in files)
            )
            offsets = np.cumsum([0, *rows])
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
        return Loaded(rows_read, bad, tuple(files))

    # --- output ------------------------------------------------------------------------

    def write(self, out: Path | str, items: pd.DataFrame, manifest: dict, shards: int) -> None:
        """The data directory, atomically: Spark writes the events shards (users in ranges,
        each sorted by user then time), renamed part-NNNNN.parquet and listed in the manifest
        (a local path, or a URI through Spark's Hadoop file system)."""
        if isinstance(out, str):
            self._write_uri(out, items, manifest, shards)
            return
        out = Path(out)
        check_replaceable(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = scratch_dir(out.parent, f"{out.name}.tmp")
        try:
            written = tmp / "spark-events"
            parts = self._write_events(str(written), shards)
            (tmp / EVENTS_DIR).mkdir()
            listed = []
            for k, part in enumerate(parts):
                target = tmp / shard_name(k)
                if part is None:  # a shard without users
                    pq.write_table(EVENTS_SCHEMA.empty_table(), target, compression="zstd")
                else:
                    Path(part).rename(target)
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

    def _write_events(self, target: str, shards: int) -> list[str | None]:
        """The events under `target`, one file per shard (users split by shard_bounds, as the
        other engines do), each sorted by user then time; each shard's file, None if empty."""
        bounds = shard_bounds(len(self.user_codes), shards)
        owner = pd.DataFrame(
            {
                "u": self.user_codes.astype(np.int32),
                "shard": np.repeat(np.arange(shards), np.diff(bounds)).astype(np.int32),
            }
        )
        self.spark.createDataFrame(owner).createOrReplaceTempView("user_shard")
        (
            self.spark.sql(
                f"SELECT o.*, s.shard FROM ({self.output_query()}) o JOIN user_shard s USING (u)"
            )
            .repartition(shards, "shard")
            .sortWithinPartitions("shard", "u", "timestamp", "rn")
            .drop("u", "rn")
            .write.partitionBy("shard")
            .parquet(target, compression="zstd")
        )
        parts = []
        for k in range(shards):
            directory = f"{target}/shard={k}"
            if isinstance(target, str) and is_uri(target):
                found = self.hadoop.files(directory) if self.hadoop.exists(directory) else []
            else:
                found = sorted(str(f) for f in Path(directory).glob("part-*.parquet"))
            if len(found) > 1:
                raise RuntimeError(f"{directory}: {len(found)} files, expected one")
            parts.append(found[0] if found else None)
        return parts

    def _write_uri(self, out: str, items: pd.DataFrame, manifest: dict, shards: int) -> None:
        """write() on a cluster file system: the same layout, assembled beside `out` and
        renamed into place there."""
        fs = self.hadoop
        out = out.rstrip("/")
        fs.check_replaceable(out)
        parent, name = out.rsplit("/", 1)
        tmp = f"{parent}/.{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            parts = self._write_events(f"{tmp}/spark-events", shards)
            fs.mkdirs(f"{tmp}/{EVENTS_DIR}")
            targets = [f"{tmp}/{shard_name(k)}" for k in range(len(parts))]
            with tempfile.TemporaryDirectory() as local:
                empty = Path(local, "empty.parquet")
                pq.write_table(EVENTS_SCHEMA.empty_table(), empty, compression="zstd")
                for part, target in zip(parts, targets, strict=True):
                    if part is None:  # a shard without users
                        fs.put(empty, target)
                    else:
                        fs.rename(part, target)
            fs.delete(f"{tmp}/spark-events")
            described = fs.describe(targets)
            listed = [
                {"file": shard_name(k), "rows": fs.rows(target), "sha256": d["sha256"]}
                for k, (target, d) in enumerate(zip(targets, described, strict=True))
            ]
            with tempfile.TemporaryDirectory() as local:
                pq.write_table(items_table(items), Path(local, ITEMS_FILE), compression="zstd")
                Path(local, MANIFEST_FILE).write_text(
                    json.dumps(manifest | {"shards": listed}, indent=2) + "\n"
                )
                for file in (ITEMS_FILE, MANIFEST_FILE):
                    fs.put(Path(local, file), f"{tmp}/{file}")
            fs.swap_into_place(tmp, out)
        except BaseException:
            fs.delete(tmp)
            raise


def is_uri(text: str) -> bool:
    """scheme://...: a location for Spark's Hadoop file system (hdfs://, s3a://, file://)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


class Hadoop:
    """The few file operations the Spark engine needs on a URI, through Spark's Hadoop file
    system (whatever the cluster's configuration handles)."""

    def __init__(self, spark):
        self.spark = spark

    def _fs(self, uri: str):
        jvm = self.spark.sparkContext._jvm
        path = jvm.org.apache.hadoop.fs.Path(uri)
        return path.getFileSystem(self.spark.sparkContext._jsc.hadoopConfiguration()), path

    def exists(self, uri: str) -> bool:
        fs, path = self._fs(uri)
        return bool(fs.exists(path))

    def is_dir(self, uri: str) -> bool:
        fs, path = self._fs(uri)
        return bool(fs.exists(path) and fs.getFileStatus(path).isDirectory())

    def files(self, uri: str) -> list[str]:
        """A file itself, or a directory's Parquet files in name order (same columns)."""
        fs, path = self._fs(uri)
        if not fs.exists(path):
            raise DataError(f"{uri}: no such file or directory")
        if not fs.getFileStatus(path).isDirectory():
            return [uri]
        found = sorted(
            (status.getPath().getName(), status.getPath().toString())
            for status in fs.listStatus(path)
            if status.isFile() and status.getPath().getName().lower().endswith((".parquet", ".pq"))
        )
        if not found:
            raise DataError(f"{uri}: directory holds no .parquet files")
        names = [full for _, full in found]
        first = self.spark.read.parquet(names[0]).schema
        for shard in names[1:]:
            schema = self.spark.read.parquet(shard).schema
            if schema != first:
                raise DataError(
                    f"{shard}: schema ({schema.simpleString()}) differs from "
                    f"{found[0][0]}'s ({first.simpleString()})"
                )
        return names

    def rows(self, uri: str) -> int:
        return self.spark.read.parquet(uri).count()

    def describe(self, uris: list[str]) -> list[dict]:
        """name, bytes and sha256 of each file, hashed where the data is (by Spark)."""
        found = {
            row[0]: row
            for row in self.spark.read.format("binaryFile")
            .load(uris)
            .selectExpr("path", "length", "sha2(content, 256)")
            .collect()
        }
        by_name = {path.rsplit("/", 1)[-1]: row for path, row in found.items()}
        return [
            {"name": u.rsplit("/", 1)[-1], "bytes": by_name[u.rsplit("/", 1)[-1]][1],
             "sha256": by_name[u.rsplit("/", 1)[-1]][2]}
            for u in uris
        ]  # fmt: skip

    def mkdirs(self, uri: str) -> None:
        fs, path = self._fs(uri)
        fs.mkdirs(path)

    def rename(self, source: str, target: str) -> None:
        fs, path = self._fs(source)
        if not fs.rename(path, self._fs(target)[1]):
            raise DataError(f"{target}: cannot rename {source} to it")

    def delete(self, uri: str) -> None:
        fs, path = self._fs(uri)
        if fs.exists(path):
            fs.delete(path, True)

    def put(self, local: Path, uri: str) -> None:
        fs, path = self._fs(uri)
        jvm = self.spark.sparkContext._jvm
        fs.copyFromLocalFile(False, True, jvm.org.apache.hadoop.fs.Path(str(local)), path)

    def check_replaceable(self, uri: str) -> None:
        if not self.exists(uri):
            return
        fs, path = self._fs(uri)
        empty = self.is_dir(uri) and len(fs.listStatus(path)) == 0
        if not (empty or self.exists(f"{uri}/{MANIFEST_FILE}")):
            raise DataError(
                f"{uri}: exists and is not a prepare_data.py output directory; refusing to "
                "replace it"
            )

    def swap_into_place(self, tmp: str, out: str) -> None:
        if not self.exists(out):
            self.rename(tmp, out)
            return
        old = f"{tmp}.old"
        self.rename(out, old)
        self.rename(tmp, out)
        self.delete(old)
