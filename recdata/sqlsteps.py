"""recdata.process's steps as SQL, shared by the DuckDB engine (recdata/duck.py) and the Spark
engine (recdata/spark.py); each engine supplies how to run a query, store a table and read the
input, and the few expressions whose spelling differs.

How each step maps (the pandas engine being the reference):

  input order        rn: the row's position in the input (files in name order)
  ids                integer codes in the order of the trimmed strings (pandas' sorted
                     categoricals), trimmed per distinct value so the big pass joins raw strings
  sort (stable)      ORDER BY user, timestamp, rn
  dedupe             first (timestamp, rn) of each (user, item)
  --drop-events      numpy's seeded permutation over the sorted positions (identical draws)
  --max-user-events  row_number() over the user's events, newest first
  min-seq-len/k-core the pandas loop, one round per pass over per-user/item counts
  leave-one-out      row_number() newest first: 1 test, 2 valid
  item_idx           items with events numbered in item_id order

Tables: `ev` (rn, u, i, ts, e, value[, s]) and the code tables users, item_ids, kinds (raw
string, id, code), idx (i, item_idx, train).
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pandas as pd

from recdata.process import (
    LEAVE_ONE_OUT,
    ProcessOptions,
    items_with_metadata,
    nothing_left,
    processed_counts,
)
from recdata.schema import SPLITS, DataError, RawData
from recdata.tables import EPOCH_MS_THRESHOLD

TIME_EXPECTED = "a time (epoch seconds/ms or ISO 8601)"


class SqlSteps:
    """The steps over an engine's primitives (subclasses implement the `_` methods below)."""

    # --- what an engine supplies -------------------------------------------------------

    def _rows(self, query: str) -> list[tuple]:
        raise NotImplementedError

    def _frame(self, query: str) -> pd.DataFrame:
        raise NotImplementedError

    def _store(self, name: str, query: str) -> int:
        """Materialise query as table `name` (replacing it; the query may read it); rows."""
        raise NotImplementedError

    def _drop_random(self, fraction: float, seed: int) -> int:
        raise NotImplementedError

    def _trim(self, expr: str) -> str:
        """expr with leading and trailing whitespace removed."""
        raise NotImplementedError

    def _finite(self, value: str) -> str:
        """SQL true when the DOUBLE `value` is neither NaN nor infinite."""
        raise NotImplementedError

    def _timestamp_seconds(self, expr: str) -> str:
        """A TIMESTAMP/DATE expression as BIGINT epoch seconds (floor)."""
        raise NotImplementedError

    def _iso(self, expr: str) -> str:
        """A string as a UTC timestamp when it is ISO 8601, else NULL."""
        raise NotImplementedError

    def _kind(self, kind: str) -> str:
        """'time', 'number' or 'string' for a column type name, else ''."""
        raise NotImplementedError

    def _col(self, name: str) -> str:
        """A column name, quoted."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------

    def _count(self, table: str) -> int:
        return self._rows(f"SELECT count(*) FROM {table}")[0][0]

    def _replace(self, query: str) -> int:
        """Replace `ev` by query's rows; the number of rows that went."""
        before = self._count("ev")
        return before - self._store("ev", query)

    def _id_sql(self, name: str) -> str:
        """An id as a trimmed non-empty string, else NULL."""
        return f"nullif({self._trim(f'CAST({self._col(name)} AS STRING)')}, '')"

    def _number_sql(self, name: str, kind: str) -> str:
        """A finite number as DOUBLE, else NULL (missing, not a number, NaN or infinite)."""
        value = (
            f"CAST({self._col(name)} AS DOUBLE)"
            if self._kind(kind) == "number"
            else f"try_cast(nullif({self._trim(self._col(name))}, '') AS DOUBLE)"
        )
        return f"CASE WHEN {self._finite(value)} THEN {value} END"

    def _time_sql(self, name: str, kind: str, path: Path) -> str:
        """A time column as BIGINT epoch seconds (NULL when not a time): timestamps, epoch
        seconds or milliseconds (by the column's magnitude), ISO 8601 strings, as the pandas
        reader decides (numbers when every value is one or ISO fails more often)."""
        kind_of = self._kind(kind)
        if kind_of == "time":
            return self._timestamp_seconds(self._col(name))
        if kind_of == "number":
            return self._scaled(self._number_sql(name, kind))
        if kind_of != "string":
            raise DataError(f"{path}: column '{name}' has type {kind}, expected times")
        number = self._number_sql(name, kind)
        iso = self._iso(self._trim(self._col(name)))
        bad_number, bad_iso = self._rows(
            f"SELECT coalesce(count_if(({number}) IS NULL), 0), "
            f"coalesce(count_if(({iso}) IS NULL), 0) FROM scan"
        )[0]
        if bad_number == 0 or bad_iso > bad_number:
            return self._scaled(number)
        return self._timestamp_seconds(iso)

    def _scaled(self, number: str) -> str:
        top = self._rows(f"SELECT max(abs({number})) FROM scan")[0][0]
        scale = 1000.0 if top is not None and top >= EPOCH_MS_THRESHOLD else 1.0
        return f"CAST(floor(({number}) / {scale}) AS BIGINT)"

    def _checked_encode(
        self, path: Path, columns, types: dict[str, str], delimiter: str | None
    ) -> tuple[int, list[tuple[str, str, str]]]:
        """The view `scan` checked like recdata.readers.read_events (ids trimmed and
        non-empty, times, values numbers) and encoded into `ev`: (rows read, checks)."""
        c = columns
        found = [n for n in types if n not in ("rn", "row", "filename")]
        for name in [c.user, c.item, c.time, *(x for x in (c.event, c.value) if x)]:
            if name not in found:
                where = f"{path} line 1" if delimiter else str(path)
                raise DataError(f"{where}: missing column '{name}' (found: {', '.join(found)})")
        checks = [
            (c.user, self._id_sql(c.user), "an id"),
            (c.item, self._id_sql(c.item), "an id"),
            (c.time, self._time_sql(c.time, types[c.time], path), TIME_EXPECTED),
        ]
        if c.value:
            checks.append((c.value, self._number_sql(c.value, types[c.value]), "a number"))
        if c.event:
            checks.append((c.event, self._id_sql(c.event), "an event type"))
        exprs = {name: expr for name, expr, _ in checks}
        rows_read = self._count("scan")
        self._encode(
            "scan",
            (
                self._col(c.user),
                self._col(c.item),
                self._col(c.event) if c.event else "'interaction'",
            ),
            exprs[c.time],
            exprs[c.value] if c.value else "1.0",
        )
        return rows_read, checks

    def _first_bad(self, checks, files: tuple[Path, ...], delimiter: str | None) -> str:
        """The message for the first bad row: where it is, which column, what is wrong."""
        cases = " ".join(f"WHEN ({e}) IS NULL THEN {i}" for i, (_, e, _) in enumerate(checks))
        place = "NULL, NULL" if delimiter else "filename, row"
        rn, which, filename, row = self._rows(
            f"SELECT rn, CASE {cases} END, {place} FROM scan "
            f"WHERE CASE {cases} END IS NOT NULL ORDER BY rn LIMIT 1"
        )[0]
        name, _, expected = checks[which]
        raw = self._rows(f"SELECT {self._col(name)} FROM scan WHERE rn = {int(rn)}")[0][0]
        if delimiter and isinstance(files[0], Path):
            where = f"{files[0]} line {csv_line(files[0], int(rn), delimiter)}"
        elif delimiter:  # a URI: no local file to count lines in
            where = f"{files[0]} data row {int(rn) + 1}"
        else:
            where = f"{filename} row {row}"
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return f"{where}: missing {name}"
        return f"{where}: {name} {raw!r} is not {expected}"

    def _encode(self, source: str, ids: tuple[str, str, str], timestamp: str, value: str) -> None:
        """Rows of `source` -> `ev` with integer codes for the user, item and event-type
        expressions `ids`; rows with a missing or blank id, or a NULL timestamp or value, are
        left out."""
        for table, expr in zip(("users", "item_ids", "kinds"), ids, strict=True):
            self._store(
                table,
                f"""SELECT raw, id, CAST(dense_rank() OVER (ORDER BY id) - 1 AS INT) AS code
                FROM (SELECT raw, nullif({self._trim("raw")}, '') AS id
                FROM (SELECT DISTINCT CAST({expr} AS STRING) AS raw FROM {source}) r) t
                WHERE id IS NOT NULL""",
            )
        u, i, k = (f"CAST({expr} AS STRING)" for expr in ids)
        self._store(
            "ev",
            f"""SELECT s.rn, u.code AS u, i.code AS i, s.ts, k.code AS e,
            CAST(s.value AS FLOAT) AS value FROM (SELECT rn, {u} AS u_raw, {i} AS i_raw,
            {k} AS k_raw, {timestamp} AS ts, {value} AS value FROM {source}) s
            JOIN users u ON u.raw = s.u_raw JOIN item_ids i ON i.raw = s.i_raw
            JOIN kinds k ON k.raw = s.k_raw WHERE s.ts IS NOT NULL AND s.value IS NOT NULL""",
        )

    def process(self, raw: RawData, options: ProcessOptions) -> tuple[pd.DataFrame, dict]:
        """recdata.process.build_processed over `ev`: (items, counts); the events stay in the
        engine for writing."""
        dropped = dict(raw.dropped)
        keep = "SELECT rn, u, i, ts, e, value FROM (SELECT *, row_number() OVER"
        if options.dedupe:
            dropped["duplicate"] = self._replace(
                f"{keep} (PARTITION BY u, i ORDER BY ts, rn) AS k FROM ev) d WHERE k = 1"
            )
        if options.drop_events > 0:
            dropped["drop_events"] = self._drop_random(options.drop_events, options.seed)
        if options.max_user_events is not None:
            dropped["max_user_events"] = self._replace(
                f"{keep} (PARTITION BY u ORDER BY ts DESC, rn DESC) AS k FROM ev) d "
                f"WHERE k <= {int(options.max_user_events)}"
            )
        dropped.update(self._filter(options))
        if options.split == LEAVE_ONE_OUT:
            self._store(
                "ev",
                """SELECT *, CAST(CASE row_number() OVER (PARTITION BY u ORDER BY ts DESC,
                rn DESC) WHEN 1 THEN 2 WHEN 2 THEN 1 ELSE 0 END AS TINYINT) AS s FROM ev""",
            )
        else:
            valid = options.valid_cutoff
            valid_case = f"WHEN ts >= {int(valid)} THEN 1 " if valid is not None else ""
            self._store(
                "ev",
                f"""SELECT *, CAST(CASE WHEN ts >= {int(options.cutoff)} THEN 2
                {valid_case}ELSE 0 END AS TINYINT) AS s FROM ev""",
            )
            dropped["no_train_history"] = self._replace(
                "SELECT * FROM ev WHERE u IN (SELECT u FROM ev WHERE s = 0)"
            )
        num_events = self._count("ev")
        if num_events == 0:
            raise nothing_left(raw, dropped)
        self._store(
            "idx",
            """SELECT i, CAST(row_number() OVER (ORDER BY i) AS INT) AS item_idx,
            count_if(s = 0) AS train FROM ev GROUP BY i""",
        )
        present = self._frame(
            "SELECT n.id AS item_id, x.train FROM idx x JOIN (SELECT DISTINCT code, id FROM "
            "item_ids) n ON n.code = x.i ORDER BY x.item_idx"
        )
        items = items_with_metadata(
            present["item_id"].to_numpy(dtype=object), present["train"].to_numpy(), raw.items
        )
        per_user = self._frame("SELECT u, count(*) AS n FROM ev GROUP BY u ORDER BY u")
        self.user_codes = per_user["u"].to_numpy(np.int64)
        per_split = dict(self._rows("SELECT s, count(*) FROM ev GROUP BY s"))
        counts = processed_counts(
            raw,
            dropped,
            num_events,
            items,
            per_user["n"].to_numpy(np.int64),
            [per_split.get(i, 0) for i in range(len(SPLITS))],
        )
        return items, counts

    def _filter(self, options: ProcessOptions) -> dict[str, int]:
        """recdata.process.filter_sequences, round for round."""
        dropped = {"min_seq_len": 0, "kcore_items": 0, "kcore_users": 0}
        k_items, k_users = options.kcore_items, options.kcore_users
        while True:
            before = self._count("ev")
            if k_items > 0:
                dropped["kcore_items"] += self._replace(
                    "SELECT * FROM ev WHERE i NOT IN "
                    f"(SELECT i FROM ev GROUP BY i HAVING count(*) < {int(k_items)})"
                )
            self._store("user_n", "SELECT u, count(*) AS n FROM ev GROUP BY u")
            dropped["min_seq_len"] += self._replace(
                "SELECT * FROM ev WHERE u NOT IN "
                f"(SELECT u FROM user_n WHERE n < {int(options.min_seq_len)})"
            )
            if k_users > 0:
                dropped["kcore_users"] += self._replace(
                    f"SELECT * FROM ev WHERE u NOT IN (SELECT u FROM user_n WHERE n < {k_users})"
                )
            if self._count("ev") == before or (k_items == 0 and k_users == 0):
                break
        if k_items == 0:
            del dropped["kcore_items"]
        if k_users == 0:
            del dropped["kcore_users"]
        return dropped

    def output_query(self, where: str = "TRUE") -> str:
        """The processed events (EVENTS_SCHEMA columns, then u and rn for ordering)."""
        cases = " ".join(f"WHEN {i} THEN '{s}'" for i, s in enumerate(SPLITS))
        return f"""SELECT u.id AS user_id, CAST(x.item_idx AS INT) AS item_idx,
            CAST(ev.ts AS BIGINT) AS timestamp, k.id AS event_type,
            CAST(ev.value AS FLOAT) AS value, CASE ev.s {cases} END AS split, ev.u, ev.rn
            FROM ev JOIN (SELECT DISTINCT code, id FROM users) u ON u.code = ev.u
            JOIN idx x ON x.i = ev.i JOIN (SELECT DISTINCT code, id FROM kinds) k
            ON k.code = ev.e WHERE {where}"""


def events_frame(events: pd.DataFrame) -> pd.DataFrame:
    """RawData.events (file order) as plain columns with rn, for an engine to load."""
    return pd.DataFrame(
        {
            "rn": np.arange(len(events), dtype=np.int64),
            "user_id": events["user_id"].astype(object).astype(str),
            "item_id": events["item_id"].astype(object).astype(str),
            "timestamp": events["timestamp"].to_numpy(np.int64),
            "event_type": events["event_type"].astype(object).astype(str),
            "value": events["value"].to_numpy(np.float32),
        }
    )


RAW_IDS = ("user_id", "item_id", "event_type")


def _open_text(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return (gzip.open if gz else open)(path, "rt", encoding="utf-8-sig", newline="")


def csv_header(path: Path, delimiter: str) -> list[str]:
    try:
        with _open_text(path) as f:
            for fields in csv.reader(f, delimiter=delimiter):
                if fields:
                    return fields
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    raise DataError(f"{path}: empty file (no header line)")


def csv_line(path: Path, row: int, delimiter: str) -> int:
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
