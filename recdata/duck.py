"""The DuckDB engine of prepare_data.py (`--engine duckdb`, the default): recdata.process's
steps as SQL over an on-disk DuckDB database, so memory is bounded by `--memory-limit`, not by
the log's size.

Same outputs as the pandas engine (`--engine pandas`, the reference): the same rows, ids,
splits, order, counts and, the Parquet writer being the same, byte-identical files
(tests/test_recdata_engines.py compares them). How each step maps:

  input order        rn: the row's position in the input (files in name order)
  sort (stable)      ORDER BY user, timestamp, rn
  dedupe             first (timestamp, rn) of each (user, item)
  --drop-events      numpy's seeded permutation over the sorted positions (identical draws)
  --max-user-events  row_number() over the user's events, newest first
  min-seq-len/k-core the pandas loop, one round per SQL pass over per-user/item counts
  leave-one-out      row_number() newest first: 1 test, 2 valid
  item_idx           items with events numbered in item_id order

Ids are ranked into integer codes first (string order, as pandas' sorted categoricals), so the
sorts and windows run on integers. An events file (CSV or Parquet, or a directory of Parquet
shards) is read by DuckDB itself, checked row by row as the pandas readers check it; every other
source is read by its reader and handed over as a frame. Item metadata (one row per item) stays
in pandas.
"""

from __future__ import annotations

import csv
import gzip
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from recdata.io import shard_bounds
from recdata.process import LEAVE_ONE_OUT, ProcessOptions, items_with_metadata, length_stats
from recdata.schema import EVENTS_SCHEMA, SPLITS, DataError, RawData
from recdata.tables import EPOCH_MS_THRESHOLD, input_files

# Write batches of this many rows: pyarrow's default row group, so files match the pandas
# engine's write_table byte for byte.
ROW_GROUP = 1024 * 1024
_WHITESPACE = " \t\n\r\x0b\x0c"


def default_memory_limit() -> int:
    """A quarter of the machine's memory: DuckDB's buffers stay there, spilling beyond it."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def reads_directly(path: Path | None) -> bool:
    """Whether the engine reads this --input itself (else the source's reader does)."""
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


class Engine:
    """One DuckDB database in a scratch directory (removed on close)."""

    def __init__(self, memory_limit: int, scratch_parent: Path, threads: int | None = None):
        import duckdb

        self._duckdb = duckdb
        scratch_parent.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix=".prepare-duckdb-", dir=scratch_parent))
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

    def _one(self, sql: str, params: list | None = None):
        rows = self.con.execute(sql, params or []).fetchall()
        return rows[0] if rows else None

    # --- input -------------------------------------------------------------------------

    def load_frame(self, events: pd.DataFrame) -> None:
        """RawData.events (file order) as the `ev` table."""
        frame = pd.DataFrame(
            {
                "rn": np.arange(len(events), dtype=np.int64),
                "user_id": events["user_id"].astype(object).astype(str),
                "item_id": events["item_id"].astype(object).astype(str),
                "timestamp": events["timestamp"].to_numpy(np.int64),
                "event_type": events["event_type"].astype(object).astype(str),
                "value": events["value"].to_numpy(np.float32),
            }
        )
        self.con.register("frame_in", frame)
        try:
            self._encode("frame_in", ids=("user_id", "item_id", "event_type"))
        finally:
            self.con.unregister("frame_in")

    def load_files(self, path: Path, columns, skip_bad_lines: bool) -> Loaded:
        """An events file or directory of shards, checked like recdata.readers.read_events:
        ids trimmed and non-empty, times as epoch s/ms (by the column's magnitude), ISO 8601 or
        timestamps, values numbers. Good rows become the `ev` table."""
        files = input_files(path)
        delimiter = self._scan(path, files, skip_bad_lines)
        csv_header = delimiter is not None
        described = self.con.execute("DESCRIBE SELECT * FROM scan").fetchall()
        types = {row[0]: row[1] for row in described}
        found = [row[0] for row in described if row[0] not in ("rn", "row", "filename")]
        c = columns
        for name in [c.user, c.item, c.time, *(x for x in (c.event, c.value) if x)]:
            if name not in found:
                where = f"{path} line 1" if csv_header else str(path)
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
        try:
            rows_read = self._one("SELECT count(*) FROM scan")[0]
            self._encode(
                "scan",
                ids=(_col(c.user), _col(c.item), _col(c.event) if c.event else "'interaction'"),
                timestamp=exprs[c.time],
                value=exprs[c.value] if c.value else "1.0",
            )
        except self._duckdb.Error as e:
            raise DataError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
        bad = rows_read - self._one("SELECT count(*) FROM ev")[0]
        rejected = self._rejected_lines() if csv_header and skip_bad_lines else 0
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
        header = _csv_header(path, delimiter)
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
            return self._one("SELECT count(DISTINCT line) FROM reject_errors")[0]
        except self._duckdb.Error:
            return 0

    def _time_sql(self, name: str, kind: str, path: Path) -> str:
        """SQL for a time column as BIGINT epoch seconds (NULL when not a time)."""
        col = _col(name)
        kind = kind.upper()
        if kind.startswith(("TIMESTAMP", "DATE")):
            return f"CAST(floor(epoch_ms({col}) / 1000) AS BIGINT)"
        if _is_numeric(kind):
            number = _number_sql(name, kind)
            return self._scaled(number)
        if kind != "VARCHAR":
            raise DataError(f"{path}: column '{name}' has type {kind}, expected times")
        number = _number_sql(name, kind)
        iso = f"try_cast(trim({col}, '{_WHITESPACE}') AS TIMESTAMPTZ)"
        bad_number, bad_iso = self._one(
            f"SELECT count(*) FILTER ({number} IS NULL), count(*) FILTER ({iso} IS NULL) FROM scan"
        )
        if bad_number == 0 or bad_iso > bad_number:
            return self._scaled(number)
        return f"CAST(floor(epoch_ms({iso}) / 1000) AS BIGINT)"

    def _scaled(self, number: str) -> str:
        top = self._one(f"SELECT max(abs({number})) FROM scan")[0]
        scale = 1000.0 if top is not None and top >= EPOCH_MS_THRESHOLD else 1.0
        return f"CAST(floor(({number}) / {scale}) AS BIGINT)"

    def _first_bad(self, checks, files, delimiter: str | None) -> str:
        """The message for the first bad row: where it is, which column, what is wrong."""
        cases = " ".join(f"WHEN ({expr}) IS NULL THEN {i}" for i, (_, expr, _) in enumerate(checks))
        csv_header = delimiter is not None
        place = "NULL, NULL" if csv_header else "filename, row"
        rn, which, filename, row = self._one(
            f"SELECT rn, CASE {cases} END AS which, {place} FROM scan "
            f"WHERE CASE {cases} END IS NOT NULL ORDER BY rn LIMIT 1"
        )
        name, _, expected = checks[which]
        raw = self._one(f"SELECT {_col(name)} FROM scan WHERE rn = ?", [rn])[0]
        if csv_header:
            where = f"{files[0]} line {_csv_line(files[0], rn, delimiter)}"
        else:
            where = f"{filename} row {row}"
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return f"{where}: missing {name}"
        return f"{where}: {name} {raw!r} is not {expected}"

    def _encode(
        self,
        source: str,
        ids: tuple[str, str, str],
        timestamp: str = "timestamp",
        value: str = "value",
    ) -> None:
        """Rows of `source` -> table `ev` (rn, u, i, ts, e, value) with integer codes for the
        user, item and event-type expressions `ids`, numbered in the order of their trimmed
        strings (the pandas engine's sorted categoricals). Code tables: users, item_ids, kinds
        (raw string, id, code; one id may have several raw spellings, e.g. with spaces).
        Rows whose id is missing or blank, or whose timestamp or value is NULL, are left out.
        Ids are trimmed per distinct value, not per row: the big pass joins on raw strings."""
        q = self.con.execute
        tables = ("users", "item_ids", "kinds")
        for table, expr in zip(tables, ids, strict=True):
            q(
                f"""CREATE TABLE {table} AS SELECT raw, id, CAST(dense_rank() OVER (ORDER BY id)
                - 1 AS INTEGER) AS code FROM (SELECT raw, NULLIF(trim(raw, '{_WHITESPACE}'), '')
                AS id FROM (SELECT DISTINCT CAST({expr} AS VARCHAR) AS raw FROM {source}))
                WHERE id IS NOT NULL"""
            )
        u, i, k = (f"CAST({expr} AS VARCHAR)" for expr in ids)
        q(
            f"""CREATE TABLE ev AS SELECT s.rn, u.code AS u, i.code AS i, s.ts, k.code AS e,
            CAST(s.value AS FLOAT) AS value FROM (SELECT rn, {u} AS u_raw, {i} AS i_raw,
            {k} AS k_raw, {timestamp} AS ts, {value} AS value FROM {source}) s
            JOIN users u ON u.raw = s.u_raw JOIN item_ids i ON i.raw = s.i_raw
            JOIN kinds k ON k.raw = s.k_raw WHERE s.ts IS NOT NULL AND s.value IS NOT NULL"""
        )

    # --- processing --------------------------------------------------------------------

    def process(self, raw: RawData, options: ProcessOptions) -> tuple[pd.DataFrame, dict]:
        """recdata.process.build_processed over the loaded events (`ev`): (items, counts); the
        events stay in the database for `events_reader`."""
        q = self.con.execute
        dropped = dict(raw.dropped)
        if options.dedupe:
            dropped["duplicate"] = self._replace(
                "SELECT * FROM ev QUALIFY row_number() OVER (PARTITION BY u, i ORDER BY ts, rn) = 1"
            )
        if options.drop_events > 0:
            dropped["drop_events"] = self._drop_random(options.drop_events, options.seed)
        if options.max_user_events is not None:
            dropped["max_user_events"] = self._replace(
                "SELECT * FROM ev QUALIFY row_number() OVER "
                f"(PARTITION BY u ORDER BY ts DESC, rn DESC) <= {int(options.max_user_events)}"
            )
        dropped.update(self._filter(options))
        if options.split == LEAVE_ONE_OUT:
            q(
                """CREATE OR REPLACE TABLE ev AS SELECT *, CAST(CASE row_number() OVER
                (PARTITION BY u ORDER BY ts DESC, rn DESC) WHEN 1 THEN 2 WHEN 2 THEN 1 ELSE 0
                END AS TINYINT) AS s FROM ev"""
            )
        else:
            valid = options.valid_cutoff
            valid_case = f"WHEN ts >= {int(valid)} THEN 1 " if valid is not None else ""
            q(
                f"""CREATE OR REPLACE TABLE ev AS SELECT *, CAST(CASE
                WHEN ts >= {int(options.cutoff)} THEN 2 {valid_case}ELSE 0 END AS TINYINT) AS s
                FROM ev"""
            )
            dropped["no_train_history"] = self._replace(
                "SELECT * FROM ev WHERE u IN (SELECT u FROM ev WHERE s = 0)"
            )
        n_events = self._one("SELECT count(*) FROM ev")[0]
        if n_events == 0:
            sources = ", ".join(str(p) for p in raw.inputs) or "generated data"
            reasons = ", ".join(f"{k} {v}" for k, v in dropped.items() if v)
            raise DataError(
                f"{sources}: no events left after filtering ({raw.rows_read} rows read; "
                f"dropped: {reasons or 'none'})"
            )
        q(
            """CREATE TABLE idx AS SELECT i, CAST(row_number() OVER (ORDER BY i) AS INTEGER)
            AS item_idx, count(*) FILTER (s = 0) AS train FROM ev GROUP BY i"""
        )
        present = self.con.execute(
            "SELECT n.id AS item_id, x.train FROM idx x "
            "JOIN (SELECT DISTINCT code, id FROM item_ids) n ON n.code = x.i ORDER BY x.item_idx"
        ).fetch_df()
        items = items_with_metadata(
            present["item_id"].to_numpy(dtype=object), present["train"].to_numpy(), raw.items
        )
        per_user = self.con.execute("SELECT u, count(*) AS n FROM ev GROUP BY u ORDER BY u")
        per_user = per_user.fetchnumpy()
        self._user_codes = per_user["u"].astype(np.int64)
        lengths = np.sort(per_user["n"].astype(np.int64))
        per_split = dict(self.con.execute("SELECT s, count(*) FROM ev GROUP BY s").fetchall())
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

    def _replace(self, select: str) -> int:
        """Replace `ev` by select's rows; the number of rows that went."""
        before = self._one("SELECT count(*) FROM ev")[0]
        self.con.execute(f"CREATE OR REPLACE TABLE ev AS {select}")
        return before - self._one("SELECT count(*) FROM ev")[0]

    def _drop_random(self, fraction: float, seed: int) -> int:
        """recdata.process.drop_random: the same numpy permutation over the sorted rows."""
        n = self._one("SELECT count(*) FROM ev")[0]
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

    def _filter(self, options: ProcessOptions) -> dict[str, int]:
        """recdata.process.filter_sequences, round for round."""
        dropped = {"min_seq_len": 0, "kcore_items": 0, "kcore_users": 0}
        k_items, k_users = options.kcore_items, options.kcore_users
        while True:
            before = self._one("SELECT count(*) FROM ev")[0]
            if k_items > 0:
                dropped["kcore_items"] += self._replace(
                    "SELECT * FROM ev WHERE i NOT IN "
                    f"(SELECT i FROM ev GROUP BY i HAVING count(*) < {int(k_items)})"
                )
            self.con.execute(
                "CREATE OR REPLACE TABLE user_n AS SELECT u, count(*) AS n FROM ev GROUP BY u"
            )
            dropped["min_seq_len"] += self._replace(
                "SELECT * FROM ev WHERE u NOT IN "
                f"(SELECT u FROM user_n WHERE n < {int(options.min_seq_len)})"
            )
            if k_users > 0:
                dropped["kcore_users"] += self._replace(
                    "SELECT * FROM ev WHERE u NOT IN "
                    f"(SELECT u FROM user_n WHERE n < {int(k_users)})"
                )
            after = self._one("SELECT count(*) FROM ev")[0]
            if after == before or (k_items == 0 and k_users == 0):
                break
        if k_items == 0:
            del dropped["kcore_items"]
        if k_users == 0:
            del dropped["kcore_users"]
        return dropped

    # --- output ------------------------------------------------------------------------

    def events_reader(self, shard: int = 0, shards: int = 1) -> Iterator[pa.Table]:
        """The processed events of one shard (recdata.io.shard_bounds) in EVENTS_SCHEMA,
        sorted by user then time, in tables of ROW_GROUP rows (the last one shorter)."""
        bounds = shard_bounds(len(self._user_codes), shards)
        codes = [*self._user_codes.tolist(), np.iinfo(np.int32).max]
        low, high = codes[bounds[shard]], codes[bounds[shard + 1]]
        reader = self.con.sql(
            f"""SELECT u.id AS user_id, x.item_idx, ev.ts AS timestamp, k.id AS event_type,
            ev.value, CASE ev.s {" ".join(f"WHEN {i} THEN '{s}'" for i, s in enumerate(SPLITS))}
            END AS split FROM ev JOIN (SELECT DISTINCT code, id FROM users) u ON u.code = ev.u
            JOIN idx x ON x.i = ev.i JOIN (SELECT DISTINCT code, id FROM kinds) k
            ON k.code = ev.e WHERE ev.u >= {low} AND ev.u < {high} ORDER BY ev.u, ev.ts, ev.rn"""
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


def _col(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _is_numeric(kind: str) -> bool:
    return kind.split("(")[0] in {
        "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
        "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE", "DECIMAL",
    }  # fmt: skip


def _id_sql(name: str) -> str:
    """An id as a trimmed non-empty string, else NULL."""
    return f"NULLIF(trim(CAST({_col(name)} AS VARCHAR), '{_WHITESPACE}'), '')"


def _number_sql(name: str, kind: str) -> str:
    """A finite number as DOUBLE, else NULL (missing, not a number, NaN or infinite)."""
    col = _col(name)
    value = (
        f"CAST({col} AS DOUBLE)"
        if _is_numeric(kind.upper())
        else f"try_cast(NULLIF(trim({col}, '{_WHITESPACE}'), '') AS DOUBLE)"
    )
    return f"CASE WHEN isfinite({value}) THEN {value} END"


def _open_text(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return (gzip.open if gz else open)(path, "rt", encoding="utf-8-sig", newline="")


def _csv_header(path: Path, delimiter: str) -> list[str]:
    try:
        with _open_text(path) as f:
            for fields in csv.reader(f, delimiter=delimiter):
                if fields:
                    return fields
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    raise DataError(f"{path}: empty file (no header line)")


def _csv_line(path: Path, row: int, delimiter: str) -> int:
    """The line where data record `row` (0-based) starts: a streaming scan, memory-bounded."""
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        start, seen_header, i = 1, False, 0
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not fields:
                continue
            if not seen_header:
                seen_header = True
                continue
            if i == row:
                return line
            i += 1
    return row + 2
