"""Reading input files with errors a user can act on.

Every reader goes through these helpers, so a missing file, a truncated gzip, a malformed line, a
bad value or a missing column is reported the same way: the file, the line (or row), what is wrong.
Parsing is pyarrow's; the slow line-by-line scan only runs to locate an error.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recdata.schema import DataError

GZIP_MAGIC = b"\x1f\x8b"
# Epoch values at or above this are milliseconds (1e11 s is in the year 5138).
EPOCH_MS_THRESHOLD = 1e11
_DAT_DELIMITER = "\x1f"  # MovieLens '::' is rewritten to this one-character delimiter


def check_file(path: Path) -> None:
    """Raise DataError unless path is an existing regular file."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if magic == GZIP_MAGIC:
        return True
    if path.name.endswith(".gz"):
        raise DataError(f"{path}: not a gzip file")
    return False


def read_bytes(path: Path) -> bytes:
    """The whole file, gunzipped if it is gzip (detected by content, not by name)."""
    check_file(path)
    gz = _is_gzip(path)
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if gz else data
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: unreadable or truncated gzip ({e})") from None


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for every line, streaming (for large JSON-lines files)."""
    check_file(path)
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rb") as f:
            yield from enumerate(f, start=1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: unreadable or truncated gzip ({e})") from None


def iter_json_lines(path: Path, skip_bad_lines: bool) -> Iterator[tuple[int, dict | None]]:
    """(line number, object) for each non-empty line of a JSON-lines file.

    A line that is not a JSON object raises DataError, or, with skip_bad_lines, comes out as
    (line number, None) for the caller to count.
    """
    for n, raw in iter_lines(path):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            problem = (
                None if isinstance(obj, dict) else f"expected a JSON object, found {obj!r:.40}"
            )
        except json.JSONDecodeError as e:
            obj, problem = None, f"bad JSON ({e.msg})"
        except UnicodeDecodeError:
            obj, problem = None, "bad JSON (not UTF-8)"
        if problem is None:
            yield n, obj
        elif skip_bad_lines:
            yield n, None
        else:
            raise DataError(f"{path} line {n}: {problem}")


def _delimited_records(text: str, delimiter: str, quoting: bool) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of each non-empty record, as pyarrow's parser sees them."""
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter=delimiter,
        quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE,
    )
    start = 1
    for fields in reader:
        line, start = start, reader.line_num + 1
        if fields:
            yield line, fields


@dataclass
class Table:
    """Columns read from one input file, and where each row came from (for error messages).

    locate(row) says where a data row is ("file line 12"). rows_read counts every data row
    seen, bad_lines those skipped as malformed (--skip-bad-lines). layout: the name of the
    column layout found (see read_table); sheets: the workbook sheets read, in order.
    """

    path: Path
    data: pa.Table
    rows_read: int
    locate: Callable[[int], str]
    bad_lines: int = 0
    layout: str | None = None
    sheets: tuple[str, ...] = ()

    def column(self, name: str) -> pa.ChunkedArray:
        return self.data.column(name)

    def text(self, name: str) -> pd.Series:
        """A column as strings, missing values as ""."""
        col = self.column(name)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            col = pc.cast(col, pa.string())
        return pd.Series(pc.fill_null(col, "").to_numpy(zero_copy_only=False), dtype=object)

    def ids(self, name: str) -> tuple[pd.Categorical, np.ndarray]:
        """An id column as a categorical of strings, and the rows where it is missing."""
        col = self.column(name)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            col = pc.cast(col, pa.string())
        col = pc.utf8_trim_whitespace(col)
        bad = _to_bool(pc.or_kleene(pc.is_null(col), pc.equal(col, "")))
        encoded = col.combine_chunks().dictionary_encode()
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        codes = np.where(bad, -1, codes).astype(np.int32)
        categories = pd.Index(encoded.dictionary.to_numpy(zero_copy_only=False), dtype=object)
        return pd.Categorical.from_codes(codes, categories=categories), bad

    def number(
        self, name: str, *, integer: bool = False, nullable: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """A column as float64 (NaN where missing) and the rows whose value is not a number.

        With nullable=False a missing value counts as bad; with integer=True so does a fraction.
        """
        values, missing = self._numbers(name)
        bad = np.isnan(values) & ~missing
        bad |= np.isinf(values)
        if integer:
            with np.errstate(invalid="ignore"):
                bad |= np.isfinite(values) & (values != np.floor(values))
        if not nullable:
            bad |= missing
        return values, bad

    def _numbers(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        col = self.column(name)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            missing = _to_bool(pc.is_null(col))
            return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), missing
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = pc.utf8_trim_whitespace(col)
            col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
            missing = _to_bool(pc.is_null(col))
            try:
                values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
            except pa.ArrowInvalid:
                values = pd.to_numeric(col.to_pandas(), errors="coerce").to_numpy(np.float64)
            return values, missing
        raise DataError(f"{self.path}: column '{name}' has type {col.type}, expected numbers")

    def epoch_seconds(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A time column as int64 epoch seconds, and the rows that are not a time.

        Accepts timestamps/dates, epoch seconds or milliseconds (numbers; the unit is decided
        per column by magnitude) and ISO 8601 strings (naive times are taken as UTC).
        """
        col = self.column(name)
        if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
            return _timestamps_to_seconds(col)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            return _epoch_to_seconds(*self.number(name))
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise DataError(f"{self.path}: column '{name}' has type {col.type}, expected times")
        values, bad_number = self.number(name)
        if not bad_number.any():
            return _epoch_to_seconds(values, bad_number)
        try:
            return _timestamps_to_seconds(pc.cast(col, pa.timestamp("s")))
        except pa.ArrowInvalid:
            pass
        parsed = pd.to_datetime(col.to_pandas(), format="ISO8601", utc=True, errors="coerce")
        bad_iso = parsed.isna().to_numpy()
        if bad_iso.sum() > bad_number.sum():
            return _epoch_to_seconds(values, bad_number)
        seconds = parsed.to_numpy(dtype="datetime64[s]", na_value=np.datetime64(0, "s"))
        return seconds.astype(np.int64), bad_iso

    def keep_good_rows(
        self, checks: Sequence[tuple[str, np.ndarray, str]], skip: bool
    ) -> np.ndarray:
        """Apply per-column validity masks: raise on the first bad row, or skip and count them.

        checks: (column, bad-row mask, what the value should be), e.g. ("rating", m, "a number").
        Returns the mask of rows to use.
        """
        bad = np.zeros(self.data.num_rows, dtype=bool)
        for _, mask, _ in checks:
            bad |= mask
        if bad.any() and not skip:
            row = int(np.argmax(bad))
            for name, mask, expected in checks:
                if mask[row]:
                    value = self.column(name)[row].as_py()
                    if value is None or (isinstance(value, str) and not value.strip()):
                        raise DataError(f"{self.locate(row)}: missing {name}")
                    raise DataError(f"{self.locate(row)}: {name} {value!r} is not {expected}")
        self.bad_lines += int(bad.sum())
        return ~bad


def _to_bool(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _timestamps_to_seconds(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    bad = _to_bool(pc.is_null(col))
    if pa.types.is_date(col.type):
        col = pc.cast(col, pa.timestamp("s"))
    seconds = pc.cast(col, pa.timestamp("s", tz=col.type.tz), safe=False)
    out = pc.fill_null(pc.cast(seconds, pa.int64()), 0).to_numpy(zero_copy_only=False)
    return out.astype(np.int64), bad


def _epoch_to_seconds(values: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    finite = values[~bad]
    scale = 1000.0 if finite.size and np.nanmax(np.abs(finite)) >= EPOCH_MS_THRESHOLD else 1.0
    seconds = np.floor(np.where(bad, 0.0, values) / scale)
    return seconds.astype(np.int64), bad


def read_table(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    *,
    layouts: Mapping[str, Sequence[str]] | None = None,
    skip_bad_lines: bool,
) -> Table:
    """Read the named columns of a CSV (plain or gzip), Parquet or Excel file (all its sheets).

    CSV cells are read as strings (ids such as "007" stay intact); conversions happen through
    the Table methods. layouts: for files that come in several versions, named sets of columns
    of which the header must hold one (the first complete one is read, its name is
    Table.layout). A missing column raises DataError naming the columns found.
    """
    if path.is_dir():
        return _read_parquet_shards(path, required, optional, layouts)
    check_file(path)
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return _read_parquet(path, required, optional, layouts)
    if name.endswith((".xlsx", ".xlsm")):
        return _read_excel(path, required, optional, layouts)
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        delimiter = "\t" if ".tsv" in name else ","
        return read_delimited(
            path,
            required,
            optional,
            layouts=layouts,
            delimiter=delimiter,
            skip_bad_lines=skip_bad_lines,
        )
    raise DataError(
        f"{path}: unsupported file type (expected .csv, .csv.gz, .tsv, .parquet or .xlsx)"
    )


def _missing_column(where: str, missing: str, found: Sequence[str]) -> DataError:
    return DataError(f"{where}: missing column '{missing}' (found: {', '.join(map(str, found))})")


def _select(
    found: Sequence[str],
    required: Sequence[str],
    optional: Sequence[str],
    where: str,
    layouts: Mapping[str, Sequence[str]] | None = None,
) -> tuple[list[str], str | None]:
    """The columns to read, and the name of the first of `layouts` whose columns are all found."""
    for col in required:
        if col not in found:
            raise _missing_column(where, col, found)
    layout = None
    if layouts:
        layout = next((name for name, cols in layouts.items() if set(cols) <= set(found)), None)
        if layout is None:
            expected = "; ".join(f"{name} needs {', '.join(c)}" for name, c in layouts.items())
            raise DataError(
                f"{where}: columns match no known layout: {expected} "
                f"(found: {', '.join(map(str, found))})"
            )
        required = [*required, *layouts[layout]]
    return list(dict.fromkeys([*required, *(c for c in optional if c in found)])), layout


def _read_parquet(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str],
    layouts: Mapping[str, Sequence[str]] | None,
) -> Table:
    try:
        found = pq.read_schema(path).names
        columns, layout = _select(found, required, optional, str(path), layouts)
        data = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return Table(path, data, data.num_rows, lambda row: f"{path} row {row + 1}", layout=layout)


def parquet_shards(path: Path) -> list[Path]:
    """The Parquet files of a directory input (`part-*.parquet` or any `*.parquet`), in name
    order; every shard must have the first one's columns and types."""
    try:
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.name.lower().endswith((".parquet", ".pq"))
        )
    except OSError as e:
        raise DataError(f"{path}: cannot list ({e.strerror})") from None
    if not files:
        raise DataError(f"{path}: directory holds no .parquet files")
    first = _parquet_schema(files[0])
    for shard in files[1:]:
        schema = _parquet_schema(shard)
        if not schema.equals(first):
            raise DataError(
                f"{shard}: schema ({_describe(schema)}) differs from {files[0].name}'s "
                f"({_describe(first)})"
            )
    return files


def input_files(path: Path) -> tuple[Path, ...]:
    """The files an input path stands for: itself, or a directory's Parquet shards."""
    return tuple(parquet_shards(path)) if path.is_dir() else (path,)


def _parquet_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path).remove_metadata()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} {f.type}" for f in schema)


def _read_parquet_shards(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str],
    layouts: Mapping[str, Sequence[str]] | None,
) -> Table:
    """A directory of Parquet shards read as one table, shard after shard in name order."""
    files = parquet_shards(path)
    columns, layout = _select(
        _parquet_schema(files[0]).names, required, optional, str(path), layouts
    )
    tables = []
    for shard in files:
        try:
            tables.append(pq.read_table(shard, columns=columns))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{shard}: not a readable Parquet file ({e})") from None
    data = pa.concat_tables(tables)
    starts = np.cumsum([0, *(t.num_rows for t in tables)])

    def locate(row: int) -> str:
        shard = int(np.searchsorted(starts, row, side="right")) - 1
        return f"{files[shard]} row {row - starts[shard] + 1}"

    return Table(path, data, data.num_rows, locate, layout=layout)


def _read_excel(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str],
    layouts: Mapping[str, Sequence[str]] | None,
) -> Table:
    """Every non-empty sheet, one after the other (Online Retail II has one sheet per year);
    the first sheet decides the columns and the others must have them too."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # openpyxl complains about missing default styles
            sheets = pd.read_excel(path, sheet_name=None, dtype=str, engine="openpyxl")
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .xlsx file ({e})") from None
    sheets = {name: frame for name, frame in sheets.items() if len(frame.columns)}
    if not sheets:
        raise DataError(f"{path}: every sheet is empty")
    names = list(sheets)
    headers = {name: [str(c) for c in frame.columns] for name, frame in sheets.items()}
    where = {name: f"{path} sheet '{name}' row 1" for name in names}
    columns, layout = _select(headers[names[0]], required, optional, where[names[0]], layouts)
    for name in names[1:]:
        _select(headers[name], columns, (), where[name])
    frames = [sheets[name].set_axis(headers[name], axis=1)[columns] for name in names]
    data = pa.Table.from_pandas(pd.concat(frames, ignore_index=True), preserve_index=False)
    starts = np.cumsum([0, *map(len, frames)])

    def locate(row: int) -> str:
        sheet = int(np.searchsorted(starts, row, side="right")) - 1
        # Sheet row numbers: the header is row 1.
        return f"{path} sheet '{names[sheet]}' row {row - starts[sheet] + 2}"

    return Table(path, data, data.num_rows, locate, layout=layout, sheets=tuple(names))


def read_delimited(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    *,
    layouts: Mapping[str, Sequence[str]] | None = None,
    delimiter: str = ",",
    names: Sequence[str] | None = None,
    encoding: str = "utf-8",
    double_colon: bool = False,
    skip_bad_lines: bool,
) -> Table:
    """Read delimited text: with a header line, or headerless with `names`.

    double_colon reads MovieLens '.dat' files ('::' between fields, no quoting). layouts: as
    in read_table (header files only).
    """
    raw = read_bytes(path)
    try:
        # utf-8-sig drops a byte-order mark (spreadsheet exports), as pyarrow would.
        text = raw.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid {encoding} text") from None
    quoting = not double_colon
    if double_colon:
        delimiter = _DAT_DELIMITER
        text = text.replace("::", _DAT_DELIMITER)
    records = _delimited_records(text, delimiter, quoting)
    if names is None:
        first = next(records, None)
        if first is None:
            raise DataError(f"{path}: empty file (no header line)")
        header_line, header = first
        columns, layout = _select(header, required, optional, f"{path} line {header_line}", layouts)
        ncols = len(header)
    else:
        header, columns, ncols, layout = list(names), list(names), len(names), None

    invalid: list[int] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append(row.actual_columns)
        return "skip"

    try:
        data = pacsv.read_csv(
            io.BytesIO(text.encode("utf-8")),
            read_options=pacsv.ReadOptions(
                column_names=None if names is None else header, use_threads=True
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                quote_char='"' if quoting else False,
                newlines_in_values=quoting,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types={c: pa.string() for c in columns},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: cannot parse ({e})") from None

    def data_records() -> Iterator[tuple[int, list[str]]]:
        scan = _delimited_records(text, delimiter, quoting)
        if names is None:
            next(scan, None)
        return scan

    if invalid and not skip_bad_lines:
        for line, fields in data_records():
            if len(fields) != ncols:
                raise DataError(f"{path} line {line}: expected {ncols} fields, found {len(fields)}")
        raise DataError(f"{path}: malformed line (expected {ncols} fields, found {invalid[0]})")

    def locate(row: int) -> str:
        # Only used when no line was skipped, so data rows and records correspond one to one.
        for i, (line, _) in enumerate(data_records()):
            if i == row:
                return f"{path} line {line}"
        return f"{path} data row {row + 1}"

    return Table(
        path, data, data.num_rows + len(invalid), locate, bad_lines=len(invalid), layout=layout
    )
