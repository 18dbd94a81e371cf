"""Batch scoring: the top-k recommendations of every known user (or of a list of users) from an
exported version, written to one Parquet file.

    python -m serving.batch --model-dir saved_model/NAME --out recs.parquet \\
        [--k 100] [--users FILE] [--version N] [--index scann|bruteforce] [--batch-size 256] \\
        [--chunk-size 4096] [--resume] [-v]

Which users: every user of the version's `user_histories.parquet`, in that file's order; or,
with `--users FILE`, the ids in FILE: a UTF-8 text file with one user id per line (surrounding
whitespace stripped, blank lines ignored, repeats scored once, first-seen order kept). Ids of
FILE the version does not know are skipped (not written), and counted and shown (a few examples)
at the end; they never fail the run.

What each user gets is what `GET /recommendations/{user_id}?k=K` answers for them (seen items
excluded, no re-ranking): the user's stored history with the ids outside the catalog dropped,
with its event types, newest last, goes to the retrieval SavedModel's `with_event_types`
signature (`retrieval/`, ScaNN, or `retrieval_bruteforce/`, exact), one call per batch of
`--batch-size` users whose rows are left-padded with "" to the batch's longest history (within
a chunk, below, users are batched by history length, so padding stays short). A user
with no catalog item in their history gets the most popular items, scored by their train count,
as the API's fallback does. `--k` must be at most the k the version was exported with
(metadata.json "k"); the ScaNN model over-fetches per batch (k + the batch's longest history), so
its answers can differ from the API's one-user calls where ScaNN is approximate.

Output: Parquet with columns `user_id` (string), `item_ids` (list<string>, best first),
`scores` (list<float32>), `model_version` (int64), one row per scored user. It is written to a
temporary file next to `--out` and renamed over it (os.replace): `--out` is either absent, the
previous file, or the complete new one.

Progress and resuming: users are scored in chunks of `--chunk-size` users; each finished chunk
is written (atomically) as `part-NNNNNN.parquet` into the directory `.OUT.parts/` beside `--out`
(OUT being its file name), next to a `run.json` naming the model version, index, k and a hash of
the user list. A run that stops (crash, Ctrl-C, killed machine) leaves that directory behind;
rerunning the same command with `--resume` keeps the parts whose run.json matches, continues
with the first user not in them, and concatenates all parts into `--out` at the end. Without
`--resume`, leftover parts are discarded and everything is scored again; with `--resume` and
parts from a different run (other version, index, k or users), the job stops with exit 2 rather
than mix them. On success the parts directory is removed.

Bad input (missing model dir, no version, unreadable users file, k out of range) exits with
code 2 and one line naming the problem, before anything is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tfenv

log = logging.getLogger(__name__)

INDEXES = ("scann", "bruteforce")  # as serving.model_store.INDEXES (not imported: it loads TF)
RUN_FILE = "run.json"
PART_GLOB = "part-*.parquet"
UNKNOWN_EXAMPLES = 5


class BatchError(Exception):
    """Bad input: the command line prints the message on one line and exits 2."""


@dataclass
class BatchResult:
    out: Path
    version: int
    users: int  # rows written
    scored: int  # users scored by this run (users - resumed)
    resumed: int  # users taken from an interrupted run's parts
    unknown: list[str] = field(default_factory=list)  # --users ids the version does not know
    load_seconds: float = 0.0
    score_seconds: float = 0.0


# ---- inputs ----

def resolve_version(model_dir: Path, version: int | None) -> tuple[int, Path]:
    """(version, its directory): the newest complete VERSION under model_dir (names of ASCII
    digits only; `.tmp-*` and `tf_serving` are not versions), or the one asked for."""
    if not model_dir.is_dir():
        raise BatchError(f"model dir {model_dir} does not exist or is not a directory")
    from serving.model_store import list_versions

    found = sorted(list_versions(model_dir))
    if not found:
        raise BatchError(f"no exported version (a directory named by a number) under "
                         f"{model_dir}")
    if version is None:
        return found[-1]
    for number, path in found:
        if number == version:
            return number, path
    raise BatchError(f"no version {version} under {model_dir} (it has "
                     f"{', '.join(str(n) for n, _ in found)})")


def exported_k(version_dir: Path) -> int:
    """The k the version's retrieval models return (metadata.json "k")."""
    from export import contract as c

    path = version_dir / c.METADATA
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BatchError(f"cannot read {path}: {error}") from error
    k = metadata.get("k") if isinstance(metadata, dict) else None
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise BatchError(f"{path} has no positive integer 'k'")
    return k


def read_users(path: Path) -> list[str]:
    """User ids of a text file, one per line (stripped; blank lines skipped; repeats once)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BatchError(f"cannot read users file {path}: {error}") from error
    users = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not users:
        raise BatchError(f"users file {path} lists no user id (expected one per line)")
    return users


# ---- scoring ----

def score_batch(model, users: Sequence[str], k: int) -> tuple[list[list[str]], list[list[float]]]:
    """Top-k (item ids, scores) for known users, as GET /recommendations/{user}?k=k answers
    them: stored history minus non-catalog ids, with event types, seen items excluded; the
    popular items when nothing of the history is in the catalog. One signature call per batch
    (serving.batching.run_batch pads the rows).

    `model` is a loaded serving.model_store.ServingModel."""
    return score_histories(model, [model.histories[user] for user in users], k)


def score_histories(model, histories: Sequence[tuple[list[str], list[str]]], k: int
                    ) -> tuple[list[list[str]], list[list[float]]]:
    """score_batch() for given (history, event types) rows, newest last, one per user."""
    import numpy as np
    import tensorflow as tf

    from export import contract as c
    from serving.batching import run_batch
    from serving.model_store import ModelError

    requests, rows = [], []
    for stored in histories:
        history, kinds, _ = model.known_history(*stored)
        rows.append(len(requests) if history else None)
        if history:
            requests.append({c.HISTORY: history, c.EVENT_TYPES: kinds})
    found: list[list[tuple[str, float]]] = []
    if requests:
        signature = model.retrieval[c.retrieval_signature(True, True)]
        try:
            found = [model.found_items(out)[:k] for out in run_batch(signature, requests)]
        except (tf.errors.OpError, ValueError, TypeError) as error:
            raise ModelError(f"model version {model.version} failed on a batch of "
                             f"{len(requests)} users: {type(error).__name__}: "
                             f"{str(error).splitlines()[0][:300] if str(error) else ''}"
                             ) from error
    popular = [(item, float(np.float32(count))) for item, count in model.popular[:k]]
    answers = [found[row] if row is not None else popular for row in rows]
    return ([[item for item, _ in pairs] for pairs in answers],
            [[score for _, score in pairs] for pairs in answers])


# ---- parts and output ----

def _schema():
    import pyarrow as pa

    return pa.schema([("user_id", pa.string()), ("item_ids", pa.list_(pa.string())),
                      ("scores", pa.list_(pa.float32())), ("model_version", pa.int64())])


def parts_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def _write_atomic(table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_part(parts: Path, number: int, users: Sequence[str], item_ids: list[list[str]],
                scores: list[list[float]], version: int) -> None:
    import pyarrow as pa

    table = pa.table({"user_id": list(users), "item_ids": item_ids, "scores": scores,
                      "model_version": [version] * len(users)}, schema=_schema())
    _write_atomic(table, parts / f"part-{number:06d}.parquet")


def _done_parts(parts: Path) -> list[Path]:
    """The consecutive complete parts from part-000000 on (a part file exists only complete)."""
    done = []
    while (path := parts / f"part-{len(done):06d}.parquet").is_file():
        done.append(path)
    return done


def _part_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _prepare_parts(parts: Path, identity: dict, resume: bool) -> tuple[list[Path], int]:
    """Create or reuse the parts directory: (parts already done, users they hold)."""
    run_file = parts / RUN_FILE
    if parts.exists():
        if resume:
            try:
                previous = json.loads(run_file.read_text())
            except (OSError, ValueError):
                previous = None
            if previous != identity:
                raise BatchError(
                    f"{parts} holds parts of a different run (model version, index, k or user "
                    "list differ, or its run.json is missing); rerun without --resume to start "
                    "over, or repeat the interrupted run's options")
            done = _done_parts(parts)
            kept = set(done) | {run_file}
            for leftover in parts.iterdir():  # temporary files, parts after a gap
                if leftover not in kept:
                    leftover.unlink()
            return done, sum(_part_rows(path) for path in done)
        log.info("discarding the parts of an earlier run in %s (no --resume)", parts)
        shutil.rmtree(parts)
    elif resume:
        log.info("--resume: no parts of an interrupted run at %s, starting from the first user",
                 parts)
    parts.mkdir(parents=True)
    tmp = parts / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(identity, indent=1))
    os.replace(tmp, run_file)
    return [], 0


def _concatenate(parts: list[Path], out: Path) -> None:
    """All parts, in order, into out: a temporary file in out's directory, then os.replace."""
    import pyarrow.parquet as pq

    schema = _schema()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            if not parts:
                writer.write_table(schema.empty_table())
            for path in parts:
                writer.write_table(pq.read_table(path, schema=schema))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# ---- the job ----

def run(model_dir: Path | str, out: Path | str, k: int = 100, users_file: Path | str | None = None,
        version: int | None = None, index: str = "scann", batch_size: int = 256,
        chunk_size: int = 4096, resume: bool = False,
        progress: Callable[[int, int], None] | None = None) -> BatchResult:
    """Score the users and write `out` (see the module docstring). BatchError on bad input,
    raised before anything is written. `progress(done, total)` is called once the users are
    known and after each batch."""
    model_dir, out = Path(model_dir), Path(out)
    if index not in INDEXES:
        raise BatchError(f"--index {index!r}: expected one of {', '.join(INDEXES)}")
    for name, value in (("--k", k), ("--batch-size", batch_size), ("--chunk-size", chunk_size)):
        if value < 1:
            raise BatchError(f"{name} must be >= 1, got {value}")
    if out.is_dir():
        raise BatchError(f"--out {out} is a directory; expected a file name")
    number, version_dir = resolve_version(model_dir, version)
    limit = exported_k(version_dir)
    if k > limit:
        raise BatchError(f"--k {k} is larger than the k={limit} version {number} was exported "
                         f"with ({version_dir / 'metadata.json'}); use --k {limit} or less")
    requested = read_users(Path(users_file)) if users_file is not None else None

    from serving.model_store import ServingModel, VersionLoadError, import_index_ops

    started = time.perf_counter()
    try:
        import_index_ops(index)
        model = ServingModel.load(version_dir, number, index)
    except (RuntimeError, ValueError, VersionLoadError) as error:
        raise BatchError(f"cannot load version {number} from {version_dir}: {error}") from error
    load_seconds = time.perf_counter() - started

    if requested is None:
        users, unknown = list(model.histories), []
    else:
        users = [user for user in requested if user in model.histories]
        unknown = [user for user in requested if user not in model.histories]
        if unknown:
            log.info("%d of %d user ids in %s are unknown to version %d and skipped (e.g. %s)",
                     len(unknown), len(requested), users_file, number,
                     ", ".join(unknown[:UNKNOWN_EXAMPLES]))
    identity = {"model_dir": str(model_dir.resolve()), "version": number,
                "created": model.metadata.get("created"), "index": index, "k": k,
                "users": len(users),
                "users_sha256": hashlib.sha256("\n".join(users).encode()).hexdigest()}

    out.parent.mkdir(parents=True, exist_ok=True)
    parts = parts_dir_for(out)
    done, start = _prepare_parts(parts, identity, resume)
    if done:
        log.info("resuming after %d users in %d parts from %s", start, len(done), parts)
    if progress is not None:
        progress(start, len(users))

    started = time.perf_counter()
    number_of_part = len(done)
    for chunk_start in range(start, len(users), chunk_size):
        chunk = users[chunk_start:chunk_start + chunk_size]
        # Batches of similar history lengths: less padding, and a smaller ScaNN over-fetch
        # (k + the batch's longest history). Rows go back to the users' order below.
        order = sorted(range(len(chunk)), key=lambda i: len(model.histories[chunk[i]][0]))
        item_ids: list[list[str]] = [[] for _ in chunk]
        scores: list[list[float]] = [[] for _ in chunk]
        for batch_start in range(0, len(chunk), batch_size):
            rows = order[batch_start:batch_start + batch_size]
            batch_ids, batch_scores = score_batch(model, [chunk[i] for i in rows], k)
            for row, ids_row, scores_row in zip(rows, batch_ids, batch_scores):
                item_ids[row], scores[row] = ids_row, scores_row
            if progress is not None:
                progress(chunk_start + batch_start + len(rows), len(users))
        _write_part(parts, number_of_part, chunk, item_ids, scores, number)
        done.append(parts / f"part-{number_of_part:06d}.parquet")
        number_of_part += 1
    score_seconds = time.perf_counter() - started

    _concatenate(done, out)
    shutil.rmtree(parts, ignore_errors=True)
    log.info("wrote %s: %d users, version %d", out, len(users), number)
    return BatchResult(out=out, version=number, users=len(users), scored=len(users) - start,
                       resumed=start, unknown=unknown, load_seconds=load_seconds,
                       score_seconds=score_seconds)


# ---- command line ----

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m serving.batch",
                     description="Top-k recommendations for every known user (or --users) "
                                 "from an exported model, to one Parquet file.")
    parser.add_argument("--model-dir", required=True, help="saved_model/NAME (VERSION dirs)")
    parser.add_argument("--out", required=True, help="output .parquet file")
    parser.add_argument("--k", type=int, default=100,
                        help="recommendations per user, at most the exported k (default 100)")
    parser.add_argument("--users", help="text file, one user id per line (default: every user "
                                        "of the version's user_histories.parquet)")
    parser.add_argument("--version", type=int, help="VERSION to use (default: the newest)")
    parser.add_argument("--index", choices=INDEXES, default="scann",
                        help="scann (approximate, as the API) or bruteforce (exact)")
    parser.add_argument("--batch-size", type=int, default=256, help="users per model call")
    parser.add_argument("--chunk-size", type=int, default=4096,
                        help="users per part file, the unit --resume skips (default 4096)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its .OUT.parts/ directory")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log lines, TensorFlow's included")
    return parser


def parse_cli(parser: argparse.ArgumentParser,
              argv: list[str] | None) -> argparse.Namespace | int:
    """Arguments of a script with `-v`, its logging set up; or the exit code argparse chose
    (it has printed the problem, or --help)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as error:
        return int(error.code or 0)
    tfenv.library_noise(args.verbose)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_cli(build_parser(), argv)
    if isinstance(args, int):
        return args
    from tqdm import tqdm

    prog = "serving.batch"
    parts = parts_dir_for(Path(args.out))
    bars = []  # made at the first call, once the model is loaded: its rate counts scoring only

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, initial=done, unit="user",
                             disable=not sys.stderr.isatty()))
        bars[0].update(done - bars[0].n)

    def close_bar() -> None:
        for bar in bars:
            bar.close()

    started = time.perf_counter()
    try:
        result = run(args.model_dir, args.out, k=args.k, users_file=args.users,
                     version=args.version, index=args.index, batch_size=args.batch_size,
                     chunk_size=args.chunk_size, resume=args.resume, progress=progress)
    except BatchError as error:
        close_bar()
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except BaseException as error:  # interrupted or failed: say how to continue
        close_bar()
        if parts.is_dir():
            print(f"{prog}: stopped ({type(error).__name__}); finished chunks are kept in "
                  f"{parts}: rerun with --resume to continue", file=sys.stderr)
        if isinstance(error, KeyboardInterrupt):
            return 130
        raise  # a bug or a model failure: its traceback helps
    close_bar()
    seconds = time.perf_counter() - started
    if result.unknown:
        print(f"{prog}: {len(result.unknown)} unknown user id(s) skipped, e.g. "
              + ", ".join(repr(u) for u in result.unknown[:UNKNOWN_EXAMPLES]), file=sys.stderr)
    rate = result.scored / result.score_seconds if result.score_seconds > 0 else 0.0
    resumed = f" ({result.resumed} from an interrupted run)" if result.resumed else ""
    print(f"wrote {result.out}: {result.users} users{resumed}, model version {result.version}, "
          f"index {args.index}, k {args.k}")
    print(f"{result.scored} users scored in {result.score_seconds:.1f} s ({rate:,.0f} users/s; "
          f"model load {result.load_seconds:.1f} s, {seconds:.1f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
