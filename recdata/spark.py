"""The Spark engine of prepare_data.py (`--engine spark`, the `spark` extra): recdata.process's
steps on a Spark cluster (or `local[N]`), for logs that outgrow one machine.

The same steps and rules as the DuckDB engine (recdata/duck.py), in Spark SQL: rn is each row's
position in the input (Parquet: the shard's offset + `_metadata.row_index`; CSV: zipWithIndex),
ids become integer codes in string order, dedupe keeps the first (timestamp, rn), windows pick
the newest events, the k-core loop runs round for round, items are numbered in item_id order.
Outputs: the same rows, ids and splits as the other engines (tests/test_recdata_spark.py),
always as shards events/part-NNNNN.parquet (users in ranges, each shard sorted by user then
time) listed with rows and sha256 in the manifest; Spark's Parquet writer makes other bytes.

Reads and writes local paths (on a cluster: a path every node sees, e.g. a shared mount); the
output is assembled in a temp dir beside --out and renamed into place. Item metadata (one row
per item) and the per-user counts for the manifest come back to the driver.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recdata.io import (
    EVENTS_DIR,
    ITEMS_FILE,
    MANIFEST_FILE,
    _replaceable,
    _swap_into_place,
    file_sha256,
    items_table,
    shard_name,
)
from recdata.process import LEAVE_ONE_OUT, ProcessOptions, items_with_metadata, length_stats
from recdata.schema import SPLITS, DataError, RawData
from recdata.tables import EPOCH_MS_THRESHOLD, input_files

# Leading/trailing whitespace as a Java regex inside a Spark SQL literal (backslash escaped).
_WS = r"^\\p{Space}+|\\p{Space}+$"


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


class SparkEngine:
    def __init__(self, spark):
        self.spark = spark
        self.sql = spark.sql

    def _count(self, view: str) -> int:
        return self.sql(f"SELECT count(*) FROM {view}").collect()[0][0]

    def _view(self, name: str, query: str) -> int:
        """Materialise query as temp view `name` (cached); its row count."""
        frame = self.sql(query).localCheckpoint()
        frame.createOrReplaceTempView(name)
        return frame.count()

    # --- input -------------------------------------------------------------------------

    def load_frame(self, events: pd.DataFrame) -> None:
        frame = pd.DataFrame(
            {
                "rn": np.arange(len(events), dtype=np.int64),
                "user_id": events["user_id"].astype(object).astype(str),
                "item_id": events["item_id"].astype(object).astype(str),
                "timestamp": events["timestamp"].to_numpy(np.int64),
                "event_type": events["event_type"].astype(object).astype(str),
                "value": events["value"].to_numpy(np.float32).astype(np.float64),
            }
        )
        self.spark.createDataFrame(frame).createOrReplaceTempView("source")
        self._encode("source", ("user_id", "item_id", "event_type"), "timestamp", "value")

    def load_files(self, path: Path, columns, skip_bad_lines: bool) -> tuple[int, int, tuple]:
        """An events file or directory of Parquet shards, with the DuckDB engine's checks;
        (rows read, rows skipped as bad, files)."""
        from pyspark.sql import functions as F

        files = input_files(path)
        is_csv = not (path.is_dir() or path.name.lower().endswith((".parquet", ".pq")))
        if is_csv:
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
            scan = indexed.toDF(["rn", *raw.columns]).withColumn("row", F.lit(None))
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
        types = dict(scan.dtypes)
        c = columns
        found = [n for n in scan.columns if n not in ("rn", "row", "filename")]
        for name in [c.user, c.item, c.time, *(x for x in (c.event, c.value) if x)]:
            if name not in found:
                where = f"{path} line 1" if is_csv else str(path)
                raise DataError(f"{where}: missing column '{name}' (found: {', '.join(found)})")
        checks = [
            (c.user, _id_sql(c.user), "an id"),
            (c.item, _id_sql(c.item), "an id"),
            (c.time, self._time_sql(c.time, types[c.time], path),
             "a time (epoch seconds/ms or ISO 8601)"),
        ]  # fmt: skip
        if c.value:
            checks.append((c.value, _number_sql(c.value, types[c.value]), "a number"))
        if c.event:
            checks.append((c.event, _id_sql(c.event), "an event type"))
        exprs = {name: expr for name, expr, _ in checks}
        rows_read = self._count("scan")
        self._encode(
            "scan",
            (_col(c.user), _col(c.item), _col(c.event) if c.event else "'interaction'"),
            exprs[c.time],
            exprs[c.value] if c.value else "1.0",
        )
        bad = rows_read - self._count("ev")
        if bad and not skip_bad_lines:
            raise DataError(self._first_bad(checks, files, is_csv))
        return rows_read, bad, files

    def _time_sql(self, name: str, kind: str, path: Path) -> str:
        col = _col(name)
        if kind.startswith(("timestamp", "date")):
            return f"CAST(floor(unix_micros(CAST({col} AS TIMESTAMP)) / 1000000) AS BIGINT)"
        if _is_numeric(kind):
            return self._scaled(_number_sql(name, kind))
        if kind != "string":
            raise DataError(f"{path}: column '{name}' has type {kind}, expected times")
        number = _number_sql(name, kind)
        iso = f"try_to_timestamp(regexp_replace({col}, '{_WS}', ''))"
        bad_number, bad_iso = self.sql(
            f"SELECT count_if(({number}) IS NULL), count_if(({iso}) IS NULL) FROM scan"
        ).collect()[0]
        if bad_number == 0 or bad_iso > bad_number:
            return self._scaled(number)
        return f"CAST(floor(unix_micros({iso}) / 1000000) AS BIGINT)"

    def _scaled(self, number: str) -> str:
        top = self.sql(f"SELECT max(abs({number})) FROM scan").collect()[0][0]
        scale = 1000.0 if top is not None and top >= EPOCH_MS_THRESHOLD else 1.0
        return f"CAST(floor(({number}) / {scale}) AS BIGINT)"

    def _first_bad(self, checks, files, is_csv: bool) -> str:
        from recdata.duck import _csv_line

        cases = " ".join(f"WHEN ({e}) IS NULL THEN {i}" for i, (_, e, _) in enumerate(checks))
        place = "NULL AS f, NULL AS r" if is_csv else "filename AS f, row AS r"
        first = self.sql(
            f"SELECT rn, CASE {cases} END AS which, {place} FROM scan "
            f"WHERE CASE {cases} END IS NOT NULL ORDER BY rn LIMIT 1"
        ).collect()[0]
        name, _, expected = checks[first["which"]]
        raw = self.sql(f"SELECT {_col(name)} FROM scan WHERE rn = {int(first['rn'])}").collect()
        value = raw[0][0]
        if is_csv:
            delimiter = "\t" if ".tsv" in files[0].name.lower() else ","
            where = f"{files[0]} line {_csv_line(files[0], int(first['rn']), delimiter)}"
        else:
            where = f"{first['f']} row {first['r']}"
        if value is None or (isinstance(value, str) and not value.strip()):
            return f"{where}: missing {name}"
        return f"{where}: {name} {value!r} is not {expected}"

    def _encode(self, source: str, ids: tuple[str, str, str], timestamp: str, value: str) -> None:
        """As duck.Engine._encode: code tables users, item_ids, kinds and the view `ev`."""
        for table, expr in zip(("users", "item_ids", "kinds"), ids, strict=True):
            self._view(
                table,
                f"""SELECT raw, id, CAST(dense_rank() OVER (ORDER BY id) - 1 AS INT) AS code
                FROM (SELECT raw, nullif(regexp_replace(raw, '{_WS}', ''), '') AS id
                FROM (SELECT DISTINCT CAST({expr} AS STRING) AS raw FROM {source}))
                WHERE id IS NOT NULL""",
            )
        u, i, k = (f"CAST({expr} AS STRING)" for expr in ids)
        self._view(
            "ev",
            f"""SELECT s.rn, u.code AS u, i.code AS i, s.ts, k.code AS e,
            CAST(s.value AS FLOAT) AS value FROM (SELECT rn, {u} AS u_raw, {i} AS i_raw,
            {k} AS k_raw, {timestamp} AS ts, {value} AS value FROM {source}) s
            JOIN users u ON u.raw = s.u_raw JOIN item_ids i ON i.raw = s.i_raw
            JOIN kinds k ON k.raw = s.k_raw WHERE s.ts IS NOT NULL AND s.value IS NOT NULL""",
        )

    # --- processing --------------------------------------------------------------------

    def _replace(self, query: str) -> int:
        before = self._count("ev")
        return before - self._view("ev", query)

    def process(self, raw: RawData, options: ProcessOptions) -> tuple[pd.DataFrame, dict]:
        dropped = dict(raw.dropped)
        if options.dedupe:
            dropped["duplicate"] = self._replace(
                "SELECT rn, u, i, ts, e, value FROM (SELECT *, row_number() OVER "
                "(PARTITION BY u, i ORDER BY ts, rn) AS k FROM ev) WHERE k = 1"
            )
        if options.drop_events > 0:
            dropped["drop_events"] = self._drop_random(options.drop_events, options.seed)
        if options.max_user_events is not None:
            dropped["max_user_events"] = self._replace(
                "SELECT rn, u, i, ts, e, value FROM (SELECT *, row_number() OVER (PARTITION BY "
                f"u ORDER BY ts DESC, rn DESC) AS k FROM ev) WHERE k <= {options.max_user_events}"
            )
        dropped.update(self._filter(options))
        if options.split == LEAVE_ONE_OUT:
            self._view(
                "ev",
                """SELECT *, CAST(CASE row_number() OVER (PARTITION BY u ORDER BY ts DESC,
                rn DESC) WHEN 1 THEN 2 WHEN 2 THEN 1 ELSE 0 END AS TINYINT) AS s FROM ev""",
            )
        else:
            valid = options.valid_cutoff
            valid_case = f"WHEN ts >= {int(valid)} THEN 1 " if valid is not None else ""
            self._view(
                "ev",
                f"""SELECT *, CAST(CASE WHEN ts >= {int(options.cutoff)} THEN 2
                {valid_case}ELSE 0 END AS TINYINT) AS s FROM ev""",
            )
            dropped["no_train_history"] = self._replace(
                "SELECT * FROM ev WHERE u IN (SELECT u FROM ev WHERE s = 0)"
            )
        n_events = self._count("ev")
        if n_events == 0:
            sources = ", ".join(str(p) for p in raw.inputs) or "generated data"
            reasons = ", ".join(f"{k} {v}" for k, v in dropped.items() if v)
            raise DataError(
                f"{sources}: no events left after filtering ({raw.rows_read} rows read; "
                f"dropped: {reasons or 'none'})"
            )
        self._view(
            "idx",
            """SELECT i, CAST(row_number() OVER (ORDER BY i) AS INT) AS item_idx,
            count_if(s = 0) AS train FROM ev GROUP BY i""",
        )
        present = self.sql(
            "SELECT n.id AS item_id, x.train FROM idx x JOIN (SELECT DISTINCT code, id FROM "
            "item_ids) n ON n.code = x.i ORDER BY x.item_idx"
        ).toPandas()
        items = items_with_metadata(
            present["item_id"].to_numpy(dtype=object), present["train"].to_numpy(), raw.items
        )
        lengths = self.sql("SELECT count(*) AS n FROM ev GROUP BY u").toPandas()["n"]
        lengths = np.sort(lengths.to_numpy(np.int64))
        per_split = {
            r[0]: r[1] for r in self.sql("SELECT s, count(*) FROM ev GROUP BY s").collect()
        }
        with_metadata = int(items["item_id"].isin(raw.items["item_id"]).sum())
        counts = {
            "rows_read": int(raw.rows_read),
            "num_users": int(len(lengths)),
            "num_items": int(len(items)),
            "num_events": int(n_events),
            "events_per_split": {name: int(per_split.get(i, 0)) for i, name in enumerate(SPLITS)},
            "dropped": {k: int(v) for k, v in dropped.items()},
            "items_without_metadata": int(len(items) - with_metadata),
            "item_rows_skipped": int(raw.item_rows_skipped),
            "sequence_length": length_stats(lengths),
        }
        return items, counts

    def _drop_random(self, fraction: float, seed: int) -> int:
        """The numpy permutation of the other engines over the rows in (u, ts, rn) order."""
        n = self._count("ev")
        rank = np.random.default_rng(seed).permutation(n)
        drop = np.flatnonzero(rank < round(fraction * n)).astype(np.int64)
        del rank
        ordered = self.sql("SELECT * FROM ev ORDER BY u, ts, rn").rdd.zipWithIndex()
        ordered.map(lambda r: (*r[0], r[1])).toDF(
            ["rn", "u", "i", "ts", "e", "value", "pos"]
        ).createOrReplaceTempView("ev_pos")
        self.spark.createDataFrame(pd.DataFrame({"pos": drop})).createOrReplaceTempView("drop_pos")
        return self._replace(
            "SELECT CAST(rn AS BIGINT) AS rn, CAST(u AS INT) AS u, CAST(i AS INT) AS i, "
            "CAST(ts AS BIGINT) AS ts, CAST(e AS INT) AS e, CAST(value AS FLOAT) AS value "
            "FROM ev_pos LEFT ANTI JOIN drop_pos USING (pos)"
        )

    def _filter(self, options: ProcessOptions) -> dict[str, int]:
        dropped = {"min_seq_len": 0, "kcore_items": 0, "kcore_users": 0}
        k_items, k_users = options.kcore_items, options.kcore_users
        while True:
            before = self._count("ev")
            if k_items > 0:
                dropped["kcore_items"] += self._replace(
                    "SELECT * FROM ev LEFT ANTI JOIN (SELECT i FROM ev GROUP BY i "
                    f"HAVING count(*) < {k_items}) USING (i)"
                )
            self._view("user_n", "SELECT u, count(*) AS n FROM ev GROUP BY u")
            dropped["min_seq_len"] += self._replace(
                "SELECT * FROM ev LEFT ANTI JOIN (SELECT u FROM user_n WHERE n < "
                f"{options.min_seq_len}) USING (u)"
            )
            if k_users > 0:
                dropped["kcore_users"] += self._replace(
                    f"SELECT * FROM ev LEFT ANTI JOIN (SELECT u FROM user_n WHERE n < {k_users}) "
                    "USING (u)"
                )
            if self._count("ev") == before or (k_items == 0 and k_users == 0):
                break
        if k_items == 0:
            del dropped["kcore_items"]
        if k_users == 0:
            del dropped["kcore_users"]
        return dropped

    # --- output ------------------------------------------------------------------------

    def write(self, out: Path, items: pd.DataFrame, manifest: dict, shards: int) -> None:
        """The data directory, atomically: Spark writes the events shards (users in ranges,
        each sorted by user then time), renamed part-NNNNN.parquet and listed in the manifest."""
        out = Path(out)
        if out.exists() and not _replaceable(out):
            raise DataError(
                f"{out}: exists and is not a prepare_data.py output directory; refusing to "
                "replace it"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            cases = " ".join(f"WHEN {i} THEN '{s}'" for i, s in enumerate(SPLITS))
            events = self.sql(
                f"""SELECT u.id AS user_id, CAST(x.item_idx AS INT) AS item_idx,
                CAST(ev.ts AS BIGINT) AS timestamp, k.id AS event_type,
                CAST(ev.value AS FLOAT) AS value, CASE ev.s {cases} END AS split, ev.u, ev.rn
                FROM ev
                JOIN (SELECT DISTINCT code, id FROM users) u ON u.code = ev.u
                JOIN idx x ON x.i = ev.i JOIN (SELECT DISTINCT code, id FROM kinds) k
                ON k.code = ev.e"""
            )
            written = tmp / "spark-events"
            (
                events.repartitionByRange(shards, "u")
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
            import json

            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _col(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _is_numeric(kind: str) -> bool:
    return kind.split("(")[0] in {"tinyint", "smallint", "int", "bigint", "float", "double",
                                   "decimal"}  # fmt: skip


def _id_sql(name: str) -> str:
    return f"nullif(regexp_replace(CAST({_col(name)} AS STRING), '{_WS}', ''), '')"


def _number_sql(name: str, kind: str) -> str:
    col = _col(name)
    value = (
        f"CAST({col} AS DOUBLE)"
        if _is_numeric(kind)
        else f"try_cast(nullif(regexp_replace({col}, '{_WS}', ''), '') AS DOUBLE)"
    )
    return f"CASE WHEN NOT isnan({value}) AND abs({value}) != double('inf') THEN {value} END"
