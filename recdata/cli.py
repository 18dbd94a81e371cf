"""prepare_data.py's command line: read a source, process it, write a data directory.

    python prepare_data.py --source online-retail --input online_retail.parquet \\
        --out data/processed/retail

Bad input ends with exit code 2 and one message on stderr naming the file (and line); nothing
is written to --out then.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import time
from pathlib import Path

import pandas as pd

from recdata import readers, synthetic
from recdata.io import make_manifest, write_processed
from recdata.process import LEAVE_ONE_OUT, TEMPORAL, ProcessOptions, build_processed
from recdata.schema import DataError, RawData

log = logging.getLogger("recdata")

ENGINES = ("duckdb", "pandas", "spark")
SOURCES = ("amazon", "movielens", "online-retail", "events", "sample", "synthetic")
# Flags each source takes (dest names); the first group is required.
_INPUTS = {
    "amazon": (("reviews",), ("meta",)),
    "movielens": (("ratings",), ("movies",)),
    "online-retail": (("input",), ()),
    "events": (
        ("input",),
        (
            "items",
            "user_col",
            "item_col",
            "time_col",
            "event_col",
            "value_col",
            "text_cols",
            "item_id_col",
            "category_col",
            "brand_col",
            "price_col",
        ),
    ),
    "sample": ((), ()),
    "synthetic": ((), ("num_users", "num_items", "num_events")),
}
_SOURCE_FLAGS = sorted({f for required, optional in _INPUTS.values() for f in required + optional})
_ITEM_TABLE_FLAGS = ("item_id_col", "text_cols", "category_col", "brand_col", "price_col")
_DEFAULT_MIN_SEQ_LEN = {"movielens": 5}  # the protocol's MovieLens setting
_SYNTHETIC_DEFAULTS = {"num_users": 10_000, "num_items": 5_000, "num_events": 200_000}


def _time_arg(text: str) -> int:
    """Epoch seconds, or an ISO date/datetime (naive means UTC)."""
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        stamp = pd.Timestamp(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither epoch seconds nor an ISO date"
        ) from None
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return int(stamp.timestamp())


def _location(text: str) -> Path | str:
    """A local path, or a URI kept as text (scheme://..., for --engine spark)."""
    return text if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) else Path(text)


def _size(text: str) -> int:
    """Bytes from '4GB', '512MB', '2GiB' or a plain number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).upper() not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GB or 512MB")
    value = int(float(match.group(1)) * units[match.group(2).upper()])
    if value < 64 * 2**20:
        raise argparse.ArgumentTypeError(f"{text!r} is below the 64MB DuckDB needs to work")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 0 and < 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_data.py",
        usage="%(prog)s --source SOURCE [inputs] --out DIR [options]  (see --help)",
        description="Turn a raw interaction data set into items.parquet, events.parquet and "
        "manifest.json (leave-one-out or temporal split, contiguous item_idx 1..N).",
    )
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument(
        "--out",
        required=True,
        type=_location,
        help="output directory (replaced atomically; --engine spark: also a URI such as "
        "hdfs://...)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")

    g = p.add_argument_group("inputs (which ones depend on --source)")
    g.add_argument("--reviews", type=Path, help="amazon: reviews JSON lines (.json[.gz], .jsonl)")
    g.add_argument("--meta", type=Path, help="amazon: metadata JSON lines (optional)")
    g.add_argument("--ratings", type=Path, help="movielens: ratings.dat[.gz] or ratings.csv")
    g.add_argument("--movies", type=Path, help="movielens: movies.dat or movies.csv (optional)")
    g.add_argument(
        "--input",
        type=_location,
        help="online-retail / events: the data file (events: or a directory of Parquet shards; "
        "--engine spark: also a URI such as hdfs://...)",
    )
    g.add_argument("--items", type=Path, help="events: item table, CSV or Parquet (optional)")
    g.add_argument(
        "--live-db",
        metavar="URL",
        help="add the events POSTed to the API and the items PUT there (sqlite:///PATH or "
        "postgresql://...; any source; --source events needs no --input then)",
    )

    e = p.add_argument_group("events: column mapping")
    e.add_argument("--user-col", help="user id column (default user_id)")
    e.add_argument("--item-col", help="item id column (default item_id)")
    e.add_argument("--time-col", help="time column: epoch s/ms or ISO 8601 (default timestamp)")
    e.add_argument("--event-col", help="event type column (default: all 'interaction')")
    e.add_argument("--value-col", help="rating/weight column (default: all 1.0)")
    e.add_argument("--item-id-col", help="item id column of --items (default: --item-col)")
    e.add_argument("--text-cols", help="comma-separated --items columns joined into the text")
    e.add_argument("--category-col", help="--items category column")
    e.add_argument("--brand-col", help="--items brand column")
    e.add_argument("--price-col", help="--items price column (numbers or strings like '$9.99')")

    s = p.add_argument_group("synthetic")
    s.add_argument("--num-users", type=_positive, help="default 10000")
    s.add_argument("--num-items", type=_positive, help="default 5000")
    s.add_argument("--num-events", type=_positive, help="default 200000")

    o = p.add_argument_group("processing")
    o.add_argument(
        "--engine",
        choices=ENGINES,
        default="duckdb",
        help="duckdb: out of core, memory bounded by --memory-limit (default); pandas: in "
        "memory, the reference implementation (same outputs); spark: the same steps on Spark "
        "(pyspark + Java 17; events always written as shards)",
    )
    o.add_argument(
        "--shards",
        type=_positive,
        default=1,
        metavar="N",
        help="write the events as N files events/part-NNNNN.parquet, users split into N "
        "ranges (a user's events in one file; listed with rows and sha256 in the manifest); "
        "workers of a cluster each read their own (default 1: events.parquet)",
    )
    o.add_argument(
        "--spark-master",
        metavar="URL",
        help="spark: the master (default: spark-submit's, else local[*])",
    )
    o.add_argument(
        "--memory-limit",
        type=_size,
        metavar="SIZE",
        help="duckdb: memory for its buffers, e.g. 4GB or 512MB; it spills to disk beyond "
        "(default: a quarter of this machine's memory, or of its container's limit)",
    )
    o.add_argument(
        "--keep-repeats",
        action="store_true",
        help="keep repeated (user, item) events (default: keep the first only)",
    )
    o.add_argument(
        "--min-seq-len",
        type=_positive,
        help="drop users with fewer events (default 3; movielens 5)",
    )
    o.add_argument(
        "--kcore-users",
        type=_non_negative,
        default=0,
        help="iterative k-core: min events per user (default 0: off)",
    )
    o.add_argument(
        "--kcore-items",
        type=_non_negative,
        default=0,
        help="iterative k-core: min events per item (default 0: off)",
    )
    o.add_argument(
        "--max-user-events",
        type=_positive,
        metavar="N",
        help="keep each user's last N events, before --min-seq-len (default: all)",
    )
    o.add_argument(
        "--drop-events",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="drop this random share (0 <= F < 1) of the events, before the split (default 0)",
    )
    o.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of --drop-events and of --source synthetic (default 0)",
    )
    o.add_argument("--split", choices=(LEAVE_ONE_OUT, TEMPORAL), default=LEAVE_ONE_OUT)
    o.add_argument(
        "--cutoff",
        type=_time_arg,
        help="temporal: test starts here (epoch seconds or ISO date, UTC)",
    )
    o.add_argument(
        "--valid-cutoff",
        type=_time_arg,
        help="temporal: valid starts here (before --cutoff); default: no valid split",
    )
    o.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip malformed lines (counted in the manifest) instead of failing",
    )
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    required, optional = _INPUTS[args.source]
    if args.source == "events" and args.live_db and args.input is None:
        required = ()  # the database alone
    for name in required:
        if getattr(args, name) is None:
            p.error(f"--source {args.source} needs --{name.replace('_', '-')}")
    for name in _SOURCE_FLAGS:
        if getattr(args, name) is not None and name not in required + optional:
            p.error(f"--{name.replace('_', '-')} does not apply to --source {args.source}")
    if args.split == TEMPORAL and args.cutoff is None:
        p.error("--split temporal needs --cutoff")
    if args.split == LEAVE_ONE_OUT:
        if args.cutoff is not None or args.valid_cutoff is not None:
            p.error("--cutoff/--valid-cutoff need --split temporal")
        if args.min_seq_len is not None and args.min_seq_len < 3:
            p.error("--split leave-one-out needs --min-seq-len >= 3 (train, valid and test)")
    if args.valid_cutoff is not None and args.valid_cutoff >= args.cutoff:
        p.error("--valid-cutoff must be before --cutoff")
    min_seq_len = _min_seq_len(args)
    if args.max_user_events is not None and args.max_user_events < min_seq_len:
        p.error(
            f"--max-user-events {args.max_user_events} is below --min-seq-len {min_seq_len}: "
            "no user would be left"
        )
    if args.source == "events" and args.items is None:
        for name in _ITEM_TABLE_FLAGS:
            if getattr(args, name) is not None:
                p.error(f"--{name.replace('_', '-')} needs --items")
    if args.memory_limit is not None and args.engine != "duckdb":
        p.error("--memory-limit applies to --engine duckdb")
    if args.spark_master is not None and args.engine != "spark":
        p.error("--spark-master applies to --engine spark")
    for flag, value in (("--input", args.input), ("--out", args.out)):
        if isinstance(value, str) and args.engine != "spark":
            p.error(f"{flag} {value}: URIs need --engine spark (the others use local paths)")
        if isinstance(value, str) and flag == "--input" and args.source != "events":
            p.error(f"--input {value}: URIs are read for --source events only")
    if args.source == "synthetic":
        sizes = _synthetic_sizes(args)
        if sizes["num_events"] < sizes["num_users"] or sizes["num_items"] < 2:
            p.error("--num-events must be >= --num-users and --num-items >= 2")


def _min_seq_len(args: argparse.Namespace) -> int:
    return args.min_seq_len or _DEFAULT_MIN_SEQ_LEN.get(args.source, 3)


def _synthetic_sizes(args: argparse.Namespace) -> dict[str, int]:
    return {
        k: default if getattr(args, k) is None else getattr(args, k)
        for k, default in _SYNTHETIC_DEFAULTS.items()
    }


def _event_columns(args: argparse.Namespace) -> readers.EventColumns:
    text = (
        tuple(c.strip() for c in args.text_cols.split(",") if c.strip()) if args.text_cols else ()
    )
    return readers.EventColumns(
        user=args.user_col or "user_id",
        item=args.item_col or "item_id",
        time=args.time_col or "timestamp",
        event=args.event_col,
        value=args.value_col,
        item_id=args.item_id_col,
        text=text,
        category=args.category_col,
        brand=args.brand_col,
        price=args.price_col,
    )


def read_source(args: argparse.Namespace) -> tuple[RawData | None, dict]:
    """Run the reader of args.source; also return the reader settings for the manifest."""
    skip = args.skip_bad_lines
    if args.source == "amazon":
        return readers.read_amazon(args.reviews, args.meta, skip_bad_lines=skip), {}
    if args.source == "movielens":
        return readers.read_movielens(args.ratings, args.movies, skip_bad_lines=skip), {}
    if args.source == "online-retail":
        return readers.read_online_retail(args.input, skip_bad_lines=skip), {}
    if args.source == "sample":
        return readers.read_sample(skip_bad_lines=skip), {}
    if args.source == "events" and args.input is None:  # --live-db alone
        return None, {}
    if args.source == "events":
        columns = _event_columns(args)
        raw = readers.read_events(args.input, args.items, columns=columns, skip_bad_lines=skip)
        return raw, {"columns": dataclasses.asdict(columns)}
    sizes = _synthetic_sizes(args)
    return synthetic.generate(**sizes, seed=args.seed), {"synthetic": sizes}


def _read_with_live(args: argparse.Namespace) -> tuple[RawData, dict]:
    raw, reader_options = read_source(args)
    if args.live_db:
        from recdata.live import with_live

        raw, live_notes = with_live(raw, args.live_db)
        reader_options = reader_options | live_notes
    return raw, reader_options


def _settings(args: argparse.Namespace, options: ProcessOptions, reader_options: dict) -> dict:
    written = {"skip_bad_lines": args.skip_bad_lines, "shards": args.shards}
    return dataclasses.asdict(options) | written | reader_options


def _prepare_pandas(args: argparse.Namespace, options: ProcessOptions, start: float) -> dict:
    raw, reader_options = _read_with_live(args)
    log.info("read %d rows in %.1fs", raw.rows_read, time.perf_counter() - start)
    result = build_processed(raw, options)
    log.info("processed in %.1fs", time.perf_counter() - start)
    settings = _settings(args, options, reader_options) | raw.detected
    manifest = make_manifest(args.source, raw.inputs, settings, result.counts)
    write_processed(args.out, result.items, result.events, manifest, args.shards)
    log.info("wrote %s in %.1fs", args.out, time.perf_counter() - start)
    return result.counts


def _prepare_duckdb(args: argparse.Namespace, options: ProcessOptions, start: float) -> dict:
    """The same steps through recdata.duck: an events file is read by DuckDB itself, any
    other source by its reader; the settings recorded are the pandas engine's (the outputs
    do not depend on the engine), so the manifests match too."""
    from recdata import duck

    limit = args.memory_limit or duck.default_memory_limit()
    direct = args.source == "events" and not args.live_db and duck.reads_directly(args.input)
    try:
        engine = duck.Engine(limit, args.out.resolve().parent)
    except OSError as e:
        raise DataError(f"{args.out}: cannot create a scratch directory ({e.strerror})") from None
    with engine:
        if direct:
            columns = _event_columns(args)
            loaded = engine.load_files(args.input, columns, args.skip_bad_lines)
            raw, reader_options = _direct_raw(args, columns, loaded)
        else:
            raw, reader_options = _read_with_live(args)
            engine.load_frame(raw.events)
        log.info("read %d rows in %.1fs", raw.rows_read, time.perf_counter() - start)
        items, counts = engine.process(raw, options)
        log.info("processed in %.1fs", time.perf_counter() - start)
        settings = _settings(args, options, reader_options) | raw.detected
        manifest = make_manifest(args.source, raw.inputs, settings, counts)
        write_processed(args.out, items, engine.events_reader, manifest, args.shards)
        log.info("wrote %s in %.1fs", args.out, time.perf_counter() - start)
    return counts


def _prepare_spark(args: argparse.Namespace, options: ProcessOptions, start: float) -> dict:
    """The same steps on Spark (recdata/spark.py); events written as --shards shards."""
    from recdata import duck, spark

    spark.check_available()
    uri = isinstance(args.input, str)
    direct = (
        args.source == "events" and not args.live_db and (uri or duck.reads_directly(args.input))
    )
    engine = spark.SparkEngine(spark.session(args.spark_master, args.verbose))
    if direct:
        columns = _event_columns(args)
        loaded = engine.load_files(args.input, columns, args.skip_bad_lines)
        raw, reader_options = _direct_raw(args, columns, loaded)
    else:
        raw, reader_options = _read_with_live(args)
        engine.load_frame(raw.events)
    log.info("read %d rows in %.1fs", raw.rows_read, time.perf_counter() - start)
    items, counts = engine.process(raw, options)
    settings = _settings(args, options, reader_options) | raw.detected
    manifest = make_manifest(args.source, raw.inputs, settings, counts, engine.describe_input)
    engine.write(args.out, items, manifest, args.shards)
    log.info("wrote %s in %.1fs", args.out, time.perf_counter() - start)
    return counts


def _direct_raw(args, columns, loaded) -> tuple[RawData, dict]:
    """RawData (without events: the engine holds them) for an events file the engine read."""
    from recdata.readers import read_item_table

    items, skipped = (
        read_item_table(args.items, columns, args.skip_bad_lines)
        if args.items
        else (readers.items_frame([], []), 0)
    )
    raw = RawData(
        events=pd.DataFrame(),
        items=items,
        dropped={"bad_lines_skipped": loaded.bad_lines},
        inputs=tuple(p for p in (*loaded.files, args.items) if p is not None),
        rows_read=loaded.rows_read,
        item_rows_skipped=skipped,
    )
    return raw, {"columns": dataclasses.asdict(columns)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_args(parser, args)
    except SystemExit as e:  # argparse has printed the usage error
        return int(e.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    options = ProcessOptions(
        dedupe=not args.keep_repeats,
        min_seq_len=_min_seq_len(args),
        kcore_users=args.kcore_users,
        kcore_items=args.kcore_items,
        split=args.split,
        cutoff=args.cutoff,
        valid_cutoff=args.valid_cutoff,
        max_user_events=args.max_user_events,
        drop_events=args.drop_events,
        seed=args.seed,
    )
    try:
        start = time.perf_counter()
        if args.engine == "duckdb":
            counts = _prepare_duckdb(args, options, start)
        elif args.engine == "spark":
            counts = _prepare_spark(args, options, start)
        else:
            counts = _prepare_pandas(args, options, start)
    except DataError as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    c = counts
    per_split = " / ".join(f"{k} {v}" for k, v in c["events_per_split"].items())
    print(
        f"wrote {args.out}: {c['num_users']} users, {c['num_items']} items, "
        f"{c['num_events']} events ({per_split})"
    )
    return 0
