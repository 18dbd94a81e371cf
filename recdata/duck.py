"""The DuckDB engine of prepare_data.py (`--engine duckdb`, the default): recdata.process's
steps as SQL (recdata/sqlsteps.py) over an on-disk DuckDB database, so memory is bounded by
`--memory-limit`, not by the log's size.

Same outputs as the pandas engine (`--engine pandas`, the reference): the same rows, ids,
splits, order, counts and, the Parquet writer being the same, byte-identical files
(tests/test_recdata_engines.py compares them). An events file (CSV or Parquet, or a directory
of Parquet shards) is read by DuckDB itself, checked row by row as the pandas readers check it;
every other source is read by its reader and handed over as a frame. Item metadata (one row per
item) stays in pandas.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from recdata.io import scratch_dir, shard_bounds
from recdata.schema import EVENTS_SCHEMA, DataError
from recdata.sqlsteps import RAW_IDS, SqlSteps, csv_header, events_frame
from recdata.tables import input_files

# Write batches of this many rows: pyarrow's default row group, so files match the pandas
# engine's write_table byte for byte.
ROW_GROUP = 1024 * 1024
_WHITESPACE = " \t\n\r\x0b\x0c"
_NUMERIC = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
            "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE", "DECIMAL"}  # fmt: skip


# A container's memory limit: cgroup v2, then v1 ("max" / a huge number: none).
CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


def machine_memory(cgroup_limits: tuple[Path, ...] = CGROUP_LIMITS) -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit if lower."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in cgroup_limits:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            memory = min(memory, int(text))
    return memory


def default_memory_limit() -> int:
    """A quarter of machine_memory(): DuckDB's buffers stay there, spilling beyond it."""
    return machine_memory() // 4


def reads_directly(path: Path | None) -> bool:
    """Whether the DuckDB and Spark engines read this --input themselves (else the source's
    reader does)."""
    if path is None:
        return False
    name = path.name.lower()
    return path.is_dir() or name.endswith((".parquet", ".pq", ".csv", ".csv.gz", ".tsv", ".tsv.gz"))


@dataclass(frozen=True)
class Loaded:
    """What reading the events gave: rows seen, rows skipped as bad, the input files."""

    rows_read: int
    bad_lines: int
    files: tuple[Path, ...]


class Engine(SqlSteps):
    """One DuckDB database in a scratch directory (removed on close)."""

    def __init__(self, memory_limit: int, scratch_parent: Path, threads: int | None = None):
        import duckdb

        self._duckdb = duckdb
        self.user_codes = np.zeros(0, np.int64)
        scratch_parent.mkdir(parents=True, exist_ok=True)
        self.scratch = scratch_dir(scratch_parent, "prepare-duckdb")
        try:
            self.con = duckdb.connect(str(self.scratch / "work.duckdb"))
            self.con.execute(f"SET memory_limit = '{int(memory_limit) // 2**20}MiB'")
            self.con.execute(f"SET temp_directory = '{self.scratch / 'spill'}'")
            self.con.execute("SET preserve_insertion_order = true")
            self.con.execute("SET TimeZone = 'UTC'")
            if threads:
                self.con.execute(f"SET threads = {int(threads)}")
        except BaseException:
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the primitives SqlSteps runs on -----------------------------------------------

    def _rows(self, query: str) -> list[tuple]:
        return self.con.execute(query).fetchall()

    def _frame(self, query: str) -> pd.DataFrame:
        return self.con.execute(query).fetch_df()

    def _store(self, name: str, query: str) -> int:
        self.con.execute(f"CREATE OR REPLACE TABLE {name} AS {query}")
        return self._count(name)

    def _trim(self, expr: str) -> str:
        return f"trim({expr}, '{_WHITESPACE}')"

    def _finite(self, value: str) -> str:
        return f"isfinite({value})"

    def _timestamp_seconds(self, expr: str) -> str:
        return f"CAST(floor(epoch_ms({expr}) / 1000) AS BIGINT)"

    def _iso(self, expr: str) -> str:
        return f"try_cast({expr} AS TIMESTAMPTZ)"

    def _kind(self, kind: str) -> str:
        kind = kind.upper()
        if kind.startswith(("TIMESTAMP", "DATE")):
            return "time"
        if kind.split("(")[0] in _NUMERIC:
            return "number"
        return "string" if kind == "VARCHAR" else ""

    def _col(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    def _drop_random(self, fraction: float, seed: int) -> int:
        """recdata.process.drop_random: the same numpy permutation over the sorted rows."""
        n = self._count("ev")
        rank = np.random.default_rng(seed).permutation(n)
        drop = pa.table({"pos": np.flatnonzero(rank < round(fraction * n)).astype(np.int64)})
        del rank
        self.con.register("drop_pos", drop)
        try:
            return self._replace(
                "SELECT rn, u, i, ts, e, value FROM (SELECT *, row_number() OVER "
                "(ORDER BY u, ts, rn) - 1 AS pos FROM ev) "
                "WHERE pos NOT IN (SELECT pos FROM drop_pos)"
            )
        finally:
            self.con.unregister("drop_pos")

    # --- input -------------------------------------------------------------------------

    def load_frame(self, events: pd.DataFrame) -> None:
        """RawData.events (file order) as the `ev` table."""
        self.con.register("frame_in", events_frame(events))
        try:
            self._encode("frame_in", RAW_IDS, "timestamp", "value")
        finally:
            self.con.unregister("frame_in")

    def load_files(self, path: Path, columns, skip_bad_lines: bool) -> Loaded:
        """An events file or directory of shards, checked like recdata.readers.read_events;
        good rows become the `ev` table."""
        files = input_files(path)
        delimiter = self._scan(path, files, skip_bad_lines)
        types = dict(self._rows("SELECT column_name, column_type FROM (DESCRIBE scan)"))
        try:
            rows_read, checks = self._checked_encode(path, columns, types, delimiter)
        except self._duckdb.Error as e:
            raise DataError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
        bad = rows_read - self._count("ev")
        rejected = self._rejected_lines() if delimiter and skip_bad_lines else 0
        if bad and not skip_bad_lines:
            raise DataError(self._first_bad(checks, files, delimiter))
        return Loaded(rows_read + rejected, bad + rejected, files)

    def _scan(self, path: Path, files: tuple[Path, ...], skip: bool) -> str | None:
        """Create the view `scan`: the input's columns, rn (the row's position in the input)
        and, for Parquet, filename and row (1-based, in its file). Returns the CSV delimiter
        (None for Parquet)."""
        if path.is_dir() or path.name.lower().endswith((".parquet", ".pq")):
            # Row numbers from each shard's offset: the scan stays parallel.
            offsets = np.cumsum([0, *(_parquet_rows(f) for f in files)])[:-1]
            self.con.execute("CREATE TABLE shards (filename VARCHAR, base BIGINT)")
            self.con.executemany(
                "INSERT INTO shards VALUES (?, ?)",
                [[str(f), int(o)] for f, o in zip(files, offsets, strict=True)],
            )
            names = [str(f) for f in files]
            self.con.execute(
                "CREATE VIEW scan AS SELECT s.base + p.file_row_number AS rn, "
                "p.file_row_number + 1 AS row, p.* EXCLUDE (file_row_number) "
                f"FROM read_parquet({names!r}, filename = true, file_row_number = true) p "
                "JOIN shards s USING (filename)"
            )
            return None
        delimiter = "\t" if ".tsv" in path.name.lower() else ","
        header = csv_header(path, delimiter)
        cols = "{" + ", ".join(f"'{_quote(h)}': 'VARCHAR'" for h in header) + "}"
        tab = "\\t" if delimiter == "\t" else ","
        options = (
            f"header = true, auto_detect = false, columns = {cols}, delim = E'{tab}', "
            "quote = '\"', escape = '\"', compression = 'auto', strict_mode = true"
        )
        if skip:
            options += ", ignore_errors = true, store_rejects = true"
        # The streaming row_number keeps the file's order (a single-threaded scan).
        self.con.execute(
            "CREATE VIEW scan AS SELECT row_number() OVER () - 1 AS rn, * "
            f"FROM read_csv('{_quote(str(files[0]))}', {options})"
        )
        return delimiter

    def _rejected_lines(self) -> int:
        try:
            return self._rows("SELECT count(DISTINCT line) FROM reject_errors")[0][0]
        except self._duckdb.Error:
            return 0

    # --- output ------------------------------------------------------------------------

    def events_reader(self, shard: int = 0, shards: int = 1) -> Iterator[pa.Table]:
        """The processed events of one shard (recdata.io.shard_bounds) in EVENTS_SCHEMA,
        sorted by user then time, in tables of ROW_GROUP rows (the last one shorter)."""
        bounds = shard_bounds(len(self.user_codes), shards)
        codes = [*self.user_codes.tolist(), np.iinfo(np.int32).max]
        low, high = codes[bounds[shard]], codes[bounds[shard + 1]]
        query = self.output_query(f"ev.u >= {low} AND ev.u < {high}")
        reader = self.con.sql(
            f"SELECT * EXCLUDE (u, rn) FROM ({query}) ORDER BY u, timestamp, rn"
        ).to_arrow_reader(ROW_GROUP)
        pending: list[pa.RecordBatch] = []
        size = 0
        for batch in reader:
            pending.append(batch)
            size += batch.num_rows
            while size >= ROW_GROUP:
                table = pa.Table.from_batches(pending)
                yield _conform(table.slice(0, ROW_GROUP))
                rest = table.slice(ROW_GROUP)
                pending, size = rest.to_batches(), rest.num_rows
        if size or not pending:
            yield _conform(pa.Table.from_batches(pending, schema=reader.schema))


def _conform(table: pa.Table) -> pa.Table:
    return pa.table(
        [table.column(i).combine_chunks().cast(f.type) for i, f in enumerate(EVENTS_SCHEMA)],
        schema=EVENTS_SCHEMA,
    )


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _quote(text: str) -> str:
    return str(text).replace("'", "''")
