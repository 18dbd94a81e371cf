"""Processed data on disk: the manifest, atomic writing of a data directory, loading it back.

A data directory holds items.parquet, events.parquet and manifest.json. The same input always
gives byte-identical files: no wall-clock times, no absolute paths, fixed column order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recdata.schema import EVENTS_SCHEMA, ITEMS_SCHEMA, SCHEMA_VERSION, SPLITS, DataError

ITEMS_FILE = "items.parquet"
EVENTS_FILE = "events.parquet"
EVENTS_DIR = "events"  # sharded output: events/part-NNNNN.parquet
MANIFEST_FILE = "manifest.json"


def scratch_dir(parent: Path, prefix: str) -> Path:
    """A new directory `parent/.PREFIX-HOST-PID-XXXX`, after removing those of the same prefix
    that a process on this host left when it was killed (its PID no longer runs): a killed
    prepare_data.py leaves no temp output or DuckDB spill behind for long. Other hosts' (a
    shared mount) and live processes' are left alone."""
    host = socket.gethostname().replace("-", "_")
    for old in parent.glob(f".{prefix}-{host}-*-*"):
        pid = old.name[len(f".{prefix}-{host}-") :].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{prefix}-{host}-{os.getpid()}-", dir=parent))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: Path) -> dict:
    """An input file as the manifest lists it."""
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def make_manifest(
    source: str,
    inputs: tuple[Path, ...],
    options: dict,
    counts: dict,
    describe: Callable[[Path], dict] = describe_file,
) -> dict:
    """The manifest: schema version, source, input files (name + sha256), every option, counts.

    Inputs are recorded by file name, not path, so the manifest does not depend on where the
    data sits (`describe` lists one; the Spark engine's also takes URIs).
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "inputs": [describe(p) for p in inputs],
        "options": options,
        "counts": counts,
    }


def _categorical_to_arrow(values: pd.Categorical) -> pa.Array:
    """A categorical column as a plain Arrow string array (decoded once, in Arrow)."""
    categories = pa.array(np.asarray(values.categories, dtype=object), type=pa.string())
    return pc.take(categories, pa.array(values.codes))


def items_table(items: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(
        items, schema=ITEMS_SCHEMA, preserve_index=False
    ).replace_schema_metadata(None)


def events_table(events: pd.DataFrame) -> pa.Table:
    columns = {}
    for name in EVENTS_SCHEMA.names:
        values = events[name]
        if isinstance(values.dtype, pd.CategoricalDtype):
            columns[name] = _categorical_to_arrow(values.array)
        else:
            columns[name] = pa.array(values.to_numpy(), type=EVENTS_SCHEMA.field(name).type)
    return pa.table(columns, schema=EVENTS_SCHEMA)


def shard_bounds(num_users: int, shards: int) -> list[int]:
    """User ranks where each events shard starts (and the end): shard k holds the users of
    rank bounds[k] <= r < bounds[k + 1] in user order, so the shards read in name order are
    the single file's rows and a user's events never straddle two shards."""
    return [k * num_users // shards for k in range(shards + 1)]


def shard_name(k: int) -> str:
    return f"{EVENTS_DIR}/part-{k:05d}.parquet"


def _frame_shards(events: pd.DataFrame, shards: int) -> list[pa.Table]:
    """events (sorted by user) cut into `shards` tables by shard_bounds."""
    users = events["user_id"].to_numpy(dtype=object) if len(events) else np.zeros(0, object)
    first = np.ones(len(users), dtype=bool)
    first[1:] = users[1:] != users[:-1]
    starts = np.flatnonzero(first)  # row where each user (by rank) starts
    rows = [*starts, len(users)]
    bounds = shard_bounds(len(starts), shards)
    table = events_table(events)
    return [table.slice(rows[a], rows[b] - rows[a]) for a, b in zip(bounds, bounds[1:])]


def write_processed(
    out: Path,
    items: pd.DataFrame,
    events: pd.DataFrame | Callable[[int, int], Iterable[pa.Table]],
    manifest: dict,
    shards: int = 1,
) -> None:
    """Write the data directory atomically: into a temp dir beside `out`, then rename it into
    place.

    events: a frame, or a function (shard, shards) -> EVENTS_SCHEMA tables of that shard in
    order (the DuckDB engine streams them; one row group per table). shards > 1 writes
    events/part-NNNNN.parquet (users split by shard_bounds) instead of events.parquet and lists
    each shard in the manifest with its rows and sha256.
    """
    out = Path(out)
    check_replaceable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = scratch_dir(out.parent, f"{out.name}.tmp")
    except OSError as e:
        raise DataError(f"{out}: cannot create output directory ({e.strerror})") from None
    try:
        pq.write_table(items_table(items), tmp / ITEMS_FILE, compression="zstd")
        if isinstance(events, pd.DataFrame):
            parts = [[t] for t in _frame_shards(events, shards)] if shards > 1 else None
            if parts is None:
                pq.write_table(events_table(events), tmp / EVENTS_FILE, compression="zstd")
        else:
            parts = [events(k, shards) for k in range(shards)]
        if parts is not None and shards == 1:
            _write_tables(tmp / EVENTS_FILE, parts[0])
        elif parts is not None:
            (tmp / EVENTS_DIR).mkdir()
            listed = []
            for k, tables in enumerate(parts):
                path = tmp / shard_name(k)
                rows = _write_tables(path, tables)
                listed.append({"file": shard_name(k), "rows": rows, "sha256": file_sha256(path)})
            manifest = manifest | {"shards": listed}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        swap_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{out}: cannot write ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_tables(path: Path, tables: Iterable[pa.Table]) -> int:
    """Tables into one Parquet file, each table a row group (at most 1Mi rows, pyarrow's
    default, so a frame written whole by write_table gives the same bytes); rows written."""
    rows = 0
    with pq.ParquetWriter(path, EVENTS_SCHEMA, compression="zstd") as writer:
        for table in tables:
            writer.write_table(table)
            rows += table.num_rows
    return rows


def check_replaceable(out: Path) -> None:
    """Refuse an existing `out` unless it is a previous output (it has a manifest.json) or an
    empty directory."""
    if out.exists() and not (
        out.is_dir() and ((out / MANIFEST_FILE).is_file() or not any(out.iterdir()))
    ):
        raise DataError(
            f"{out}: exists and is not a prepare_data.py output directory; refusing to replace it"
        )


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`, replacing a previous output."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old / out.name, out)
        old.rmdir()
        raise
    shutil.rmtree(old)


def _check_columns(path: Path, schema: pa.Schema, expected: pa.Schema) -> None:
    for want in expected:
        if want.name not in schema.names:
            found = ", ".join(schema.names)
            raise DataError(f"{path}: missing column '{want.name}' (found: {found})")
        got = schema.field(want.name).type
        if got != want.type:
            raise DataError(f"{path}: column '{want.name}' has type {got}, expected {want.type}")


def _read_checked(path: Path, expected: pa.Schema) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: missing file (run prepare_data.py to create it)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    _check_columns(path, table.schema, expected)
    return table.select(expected.names).to_pandas()


def read_manifest(path: Path) -> dict:
    """The manifest of a prepare_data.py output directory, its schema version checked."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: missing file (run prepare_data.py to create it)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{manifest_path}: not valid JSON ({e})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise DataError(
            f"{manifest_path}: schema_version {version!r}, expected {SCHEMA_VERSION}; "
            "re-run prepare_data.py"
        )
    return manifest


def load_processed(
    path: str | Path, shards: Sequence[int] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Read a prepare_data.py output directory: (items, events, manifest).

    Checks the files, columns and types, the schema version, that item_idx runs 1..N in
    items and that events only use those indices and known splits. `shards` (sharded data
    only): the events of those shards (by position in the manifest) alone, only they checked
    and read.
    """
    path = Path(path)
    manifest = read_manifest(path)
    items = _read_checked(path / ITEMS_FILE, ITEMS_SCHEMA)
    if "shards" in manifest:
        events = pd.concat(
            [_read_checked(f, EVENTS_SCHEMA) for f in event_shards(path, manifest, shards)],
            ignore_index=True,
        )
    elif shards is not None:
        raise DataError(f"{path}: the events are one file, not shards (prepare_data.py --shards)")
    else:
        events = _read_checked(path / EVENTS_FILE, EVENTS_SCHEMA)
    n_items = len(items)
    if not np.array_equal(items["item_idx"].to_numpy(), np.arange(1, n_items + 1)):
        raise DataError(f"{path / ITEMS_FILE}: item_idx is not 1..{n_items} in row order")
    idx = events["item_idx"].to_numpy()
    if len(idx) and (idx.min() < 1 or idx.max() > n_items):
        raise DataError(f"{path / EVENTS_FILE}: item_idx outside 1..{n_items}")
    unknown = set(events["split"].unique()) - set(SPLITS)
    if unknown:
        raise DataError(f"{path / EVENTS_FILE}: unknown split values {sorted(unknown)}")
    return items, events, manifest


def event_shards(path: Path, manifest: dict, pick: Sequence[int] | None = None) -> list[Path]:
    """The events shards of a sharded data directory, checked against its manifest: every
    listed file there with its rows and sha256, and no other file in events/. `pick`: only
    the shards at those positions of the list are checked and returned."""
    listed = manifest.get("shards")
    if not isinstance(listed, list) or not listed:
        raise DataError(f"{path / MANIFEST_FILE}: 'shards' is not a list of events shards")
    names = {entry.get("file") for entry in listed if isinstance(entry, dict)}
    found = sorted((path / EVENTS_DIR).glob("*.parquet")) if (path / EVENTS_DIR).is_dir() else []
    for file in found:
        if f"{EVENTS_DIR}/{file.name}" not in names:
            raise DataError(f"{file}: shard not listed in {path / MANIFEST_FILE}")
    files = []
    for entry in listed if pick is None else [listed[k] for k in pick]:
        file = path / str(entry.get("file"))
        if not file.is_file():
            raise DataError(f"{file}: missing shard (listed in {path / MANIFEST_FILE})")
        try:
            rows = pq.ParquetFile(file).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{file}: not a readable Parquet file ({e})") from None
        if rows != entry.get("rows"):
            raise DataError(f"{file}: {rows} rows, {MANIFEST_FILE} says {entry.get('rows')}")
        if file_sha256(file) != entry.get("sha256"):
            raise DataError(
                f"{file}: sha256 does not match {MANIFEST_FILE} (changed since prepare_data.py "
                "wrote it)"
            )
        files.append(file)
    return files


def load_events_shard(file: Path) -> pd.DataFrame:
    """One events shard (from event_shards), columns and types checked."""
    return _read_checked(file, EVENTS_SCHEMA)
