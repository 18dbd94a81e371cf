"""Is version B of an exported model better than version A? Both versions score the
leave-one-out test split (shared/PROTOCOL.md) from their own export, user by user, and the
metric differences B - A get a paired bootstrap 95% confidence interval.

    python -m serving.compare MODEL_DIR A B [--index bruteforce|scann] \\
        [--bootstrap 1000] [--seed 0] [--users N] [--json OUT] [-v]

The test split comes from each version directory: user_histories.parquet holds every user's
known events in time order, the last one being the test item. Input = the rest of the history
with its event types, target = the last item. Inputs go to the retrieval model's exclude-seen
signature with event types in batches, as `python -m serving.batch` sends them
(serving/batch.py score_histories). The brute-force model (the default) returns the exact top K
of the catalog minus the input's items (K = the version's exported k), so the target's rank is
its place in that list (ties count against it), or >= K when it is absent or not in the
catalog: HR@10, NDCG@10 and HR@K are the protocol's full-catalog figures (K >= 10 is
required). MRR is not reported: ranks beyond K are unknown. `--index scann` scores through the
ScaNN model instead, whose lists are approximate.

Users are paired: only users known to both versions with the same test item are compared; the
others are counted by reason. The bootstrap resamples these users with replacement (Efron &
Tibshirani 1993, percentile interval); every metric sees the same resamples.

Bad input (missing MODEL_DIR or version, A == B, a version directory without its files, k < 10,
a temporal split, versions with no user in common) exits 2 with one line on stderr, before
anything is written; --json is written to a temporary file and renamed over OUT.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tfenv  # noqa: F401  (TF settings before TensorFlow loads)

# isort: split
import numpy as np

from export import contract as c
from recdata.process import LEAVE_ONE_OUT
from serving.batch import INDEXES, BatchError, exported_k, parse_cli, resolve_version
from towers import run_dir as run_files

log = logging.getLogger(__name__)

PROG = "python -m serving.compare"
CUTOFF = 10  # HR@10 and NDCG@10
BATCH_SIZE = 256  # users per signature call
RESAMPLE_BLOCK = 1 << 22  # resampled user indices held at once by the bootstrap
DROP_REASONS = {  # Pairing.dropped key -> how the report names it
    "only_in_a": "known to A only",
    "only_in_b": "known to B only",
    "different_target": "with a different test item",
    "no_input": "with a one-event history",
    "target_in_input": "whose test item repeats an input item",
    "no_input_in_catalog": "with no input item in a version's catalog",
}
LEVEL = 0.95  # of the bootstrap interval
NO_MRR = "MRR is not reported: the exported lists stop at K={k}, so ranks beyond K are unknown."


class CompareError(Exception):
    """Bad input: the command line prints the message on one line and exits 2."""


# ---- the pieces ----

@dataclass(frozen=True)
class PairedDelta:
    a: float  # mean of a
    b: float  # mean of b
    delta: float  # mean(b) - mean(a)
    low: float  # percentile bootstrap interval of delta
    high: float
    share_not_better: float  # share of resamples with delta <= 0


def paired_bootstrap(a, b, n: int = 1000, seed: int = 0, level: float = LEVEL) -> PairedDelta:
    """mean(b) - mean(a) over paired per-user values, with the `level` percentile interval
    from `n` resamples of the users (pairs kept together), drawn from numpy's default_rng(seed):
    the same seed and length give the same resamples."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or not len(a):
        raise ValueError(f"paired_bootstrap needs two non-empty 1-d arrays of one length, got "
                         f"shapes {a.shape} and {b.shape}")
    if n < 1:
        raise ValueError(f"paired_bootstrap needs n >= 1 resamples, got {n}")
    diff = b - a
    rng = np.random.default_rng(seed)
    deltas = np.empty(n)
    block = max(1, RESAMPLE_BLOCK // len(diff))
    for start in range(0, n, block):
        rows = min(block, n - start)
        deltas[start:start + rows] = diff[rng.integers(0, len(diff), (rows, len(diff)))].mean(1)
    low, high = np.percentile(deltas, [50 * (1 - level), 50 * (1 + level)])
    return PairedDelta(float(a.mean()), float(b.mean()), float(b.mean() - a.mean()),
                       float(low), float(high), float(np.mean(deltas <= 0)))


def rank_in_list(items: list[str], scores: list[float], target: str, k: int) -> int:
    """0-based rank of `target` from an exact best-first top-k list: the other listed items
    scoring at least as much (ties count against the target); k when it is not listed. Every
    item scoring above the target is listed, so this is the full-catalog rank, except for ties
    continuing past the list's end (a target tied with the k-th item), which cannot be seen."""
    if target not in items:
        return k
    score = scores[items.index(target)]
    return sum(value >= score for value in scores) - 1


def per_user_metrics(ranks: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-user HR@10, NDCG@10 (1 / log2(rank + 2) below 10, as shared/PROTOCOL.md) and HR@k."""
    hit = ranks < CUTOFF
    return {f"hr@{CUTOFF}": hit.astype(np.float64),
            f"ndcg@{CUTOFF}": np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0),
            f"hr@{k}": (ranks < k).astype(np.float64)}


@dataclass
class Pairing:
    users: list[str]  # compared, in A's order
    dropped: dict[str, int]  # DROP_REASONS key -> users


def pair_users(a: dict[str, tuple[list[str], list[str]]],
               b: dict[str, tuple[list[str], list[str]]],
               catalog_a, catalog_b) -> Pairing:
    """The users both versions can score on the same test item: known to both, same last item,
    an input left before it that names a catalog item of each version (else the API would fall
    back to popular items), and a target not already in the input (the exclude-seen signature
    would hide it). `a`, `b`: user -> (history, event types); catalogs: containers of item ids."""
    dropped = dict.fromkeys(DROP_REASONS, 0)
    dropped["only_in_a"] = sum(user not in b for user in a)
    dropped["only_in_b"] = sum(user not in a for user in b)
    users = []
    for user, (history, _) in a.items():
        other = b.get(user)
        if other is None:
            continue
        history_b = other[0]
        if not history or not history_b or history[-1] != history_b[-1]:
            reason = "different_target"
        elif len(history) < 2 or len(history_b) < 2:
            reason = "no_input"
        elif history[-1] in history[:-1] or history[-1] in history_b[:-1]:
            reason = "target_in_input"
        elif not (any(item in catalog_a for item in history[:-1])
                  and any(item in catalog_b for item in history_b[:-1])):
            reason = "no_input_in_catalog"
        else:
            users.append(user)
            continue
        dropped[reason] += 1
    return Pairing(users, dropped)


def target_ranks(model, users: list[str], k: int) -> np.ndarray:
    """Each user's test-item rank through a loaded ServingModel's retrieval signature: input =
    the stored history but its last item, with its event types; seen items excluded."""
    from serving.batch import score_histories

    histories = [model.histories[user] for user in users]
    # Batches of similar input lengths: less padding, and a smaller ScaNN over-fetch.
    order = sorted(range(len(users)), key=lambda i: len(histories[i][0]))
    ranks = np.empty(len(users), np.int64)
    for start in range(0, len(order), BATCH_SIZE):
        rows = order[start:start + BATCH_SIZE]
        inputs = [(histories[i][0][:-1], histories[i][1][:-1]) for i in rows]
        found, scores = score_histories(model, inputs, k)
        for i, items, values in zip(rows, found, scores, strict=True):
            ranks[i] = rank_in_list(items, values, histories[i][0][-1], k)
    return ranks


# ---- a version ----

def _named_split(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return None
    options = manifest.get("options")
    return manifest.get("split") or (options.get("split") if isinstance(options, dict) else None)


def recorded_split(metadata: dict) -> tuple[str | None, str]:
    """(split, where it is recorded): the export's data_manifest when it names the split, else
    the data manifest of the run the version was exported from (metadata "run_dir"; export
    copies only the manifest's counts); (None, why) when neither names it."""
    split = _named_split(metadata.get("data_manifest"))
    if split:
        return split, "metadata.json data_manifest"
    run_dir = metadata.get("run_dir")
    if not run_dir:
        return None, "metadata.json names neither the split nor the run directory"
    path = Path(run_dir) / run_files.DATA_MANIFEST
    try:
        split = _named_split(json.loads(path.read_text()))
    except (OSError, ValueError) as error:
        return None, f"not in metadata.json, and {path} is unreadable ({type(error).__name__})"
    if split:
        return split, str(path)
    return None, f"named neither in metadata.json nor in {path}"


@dataclass
class Version:
    number: int
    path: Path
    k: int
    split: str  # what the report says about the split
    data_manifest: dict | None
    model: object = None  # serving.model_store.ServingModel once loaded


def check_version(model_dir: Path, number: int, index: str) -> Version:
    """The version's directory, k and split, checked before anything loads."""
    number, path = resolve_version(model_dir, number)
    k = exported_k(path)
    if k < CUTOFF:
        raise CompareError(f"version {number} was exported with k={k} ({path / c.METADATA}): "
                           f"HR@{CUTOFF} and NDCG@{CUTOFF} need top lists of at least "
                           f"{CUTOFF} items")
    retrieval = c.RETRIEVAL_SCANN if index == "scann" else c.RETRIEVAL_BRUTEFORCE
    missing = [name for name in (c.USER_HISTORIES, c.ITEMS, c.ITEM_EMBEDDINGS, retrieval,
                                 c.RANKING) if not (path / name).exists()]
    if missing:
        raise CompareError(f"version {number} at {path} is not a complete export: missing "
                           f"{', '.join(missing)}")
    metadata = json.loads((path / c.METADATA).read_text())  # exported_k has read it
    split, source = recorded_split(metadata)
    if split is None:
        described = f"{LEAVE_ONE_OUT} (assumed, prepare_data's default: {source})"
    elif split != LEAVE_ONE_OUT:
        raise CompareError(f"version {number} was trained on a {split} split ({source}): only "
                           f"{LEAVE_ONE_OUT} exports can be compared this way (their users' "
                           "last event is the test item)")
    else:
        described = f"{split} ({source})"
    return Version(number, path, k, described, metadata.get("data_manifest"))


def load(version: Version, index: str) -> None:
    from serving.model_store import ServingModel, VersionLoadError, import_index_ops

    try:
        import_index_ops(index)
        version.model = ServingModel.load(version.path, version.number, index)
    except (RuntimeError, ValueError, VersionLoadError) as error:
        raise CompareError(f"cannot load version {version.number} from {version.path}: "
                           f"{error}") from error


# ---- the comparison ----

@dataclass
class Comparison:
    model_dir: Path
    a: Version
    b: Version
    index: str
    k: int  # HR@k: the smaller exported k
    users: list[str]  # compared, in A's order
    dropped: dict[str, int]
    outside_catalog: dict[str, int]  # "a"/"b" -> compared users whose target it does not know
    ranks_a: np.ndarray  # [users] 0-based, >= k: not in the list
    ranks_b: np.ndarray
    metrics: dict[str, PairedDelta]
    resamples: int
    seed: int

    def to_json(self) -> dict:
        def version(v: Version) -> dict:
            return {"version": v.number, "path": str(v.path), "k": v.k, "split": v.split,
                    "data_manifest": v.data_manifest}

        return {
            "model_dir": str(self.model_dir), "a": version(self.a), "b": version(self.b),
            "index": self.index, "exact": self.index == "bruteforce", "k": self.k,
            "users": {"compared": len(self.users), "dropped": self.dropped,
                      "targets_outside_catalog": self.outside_catalog},
            "bootstrap": {"resamples": self.resamples, "seed": self.seed, "level": LEVEL},
            "metrics": {name: asdict(value) for name, value in self.metrics.items()},
            "not_reported": {"mrr": NO_MRR.format(k=self.k)}}


def compare(model_dir: Path | str, a: int, b: int, index: str = "bruteforce",
            resamples: int = 1000, seed: int = 0, users: int | None = None) -> Comparison:
    """Score the paired test users through versions a and b and bootstrap the deltas (see the
    module docstring). CompareError or BatchError on bad input, raised before any scoring."""
    model_dir = Path(model_dir)
    if index not in INDEXES:
        raise CompareError(f"--index {index!r}: expected one of {', '.join(INDEXES)}")
    if a == b:
        raise CompareError(f"A and B are the same version ({a}): name two different versions")
    if resamples < 1:
        raise CompareError(f"--bootstrap must be >= 1, got {resamples}")
    if users is not None and users < 1:
        raise CompareError(f"--users must be >= 1, got {users}")
    first, second = check_version(model_dir, a, index), check_version(model_dir, b, index)
    for version in (first, second):
        load(version, index)
    model_a, model_b = first.model, second.model
    pairing = pair_users(model_a.histories, model_b.histories, model_a.titles, model_b.titles)
    if not pairing.users:
        if pairing.dropped["only_in_a"] == len(model_a.histories):
            raise CompareError(
                f"versions {a} and {b} have no user in common: their user_histories.parquet "
                f"come from different data (data_manifest of {a}: "
                f"{json.dumps(first.data_manifest)}; of {b}: {json.dumps(second.data_manifest)})")
        raise CompareError(f"no user of versions {a} and {b} can be compared: "
                           + ", ".join(f"{n} {DROP_REASONS[key]}"
                                       for key, n in pairing.dropped.items() if n))
    chosen = pairing.users
    if users is not None and users < len(chosen):
        keep = np.sort(np.random.default_rng(seed).choice(len(chosen), users, replace=False))
        chosen = [chosen[i] for i in keep]

    ranks = {}
    for name, version in (("a", first), ("b", second)):
        started = time.perf_counter()
        ranks[name] = target_ranks(version.model, chosen, version.k)
        log.info("version %d: %d users scored in %.1fs", version.number, len(chosen),
                 time.perf_counter() - started)
    k = min(first.k, second.k)
    per_a, per_b = per_user_metrics(ranks["a"], k), per_user_metrics(ranks["b"], k)
    # One seed for every metric: each sees the same resampled users.
    metrics = {name: paired_bootstrap(per_a[name], per_b[name], resamples, seed)
               for name in per_a}
    outside = {name: sum(version.model.histories[user][0][-1] not in version.model.titles
                         for user in chosen)
               for name, version in (("a", first), ("b", second))}
    return Comparison(model_dir, first, second, index, k, chosen, pairing.dropped, outside,
                      ranks["a"], ranks["b"], metrics, resamples, seed)


# ---- output ----

def format_report(result: Comparison) -> str:
    a, b = result.a, result.b
    exact = ("bruteforce: exact full-catalog ranks (seen items excluded, ties against the "
             "target)" if result.index == "bruteforce" else
             "scann: APPROXIMATE nearest-neighbour lists, not the protocol's exact ranks")
    dropped = ", ".join(f"{n} {DROP_REASONS[key]}" for key, n in result.dropped.items())
    lines = [
        f"{result.model_dir}: version {b.number} (B) - version {a.number} (A), leave-one-out "
        "test split, seen items excluded",
        f"index: {exact}",
        f"split: A {a.split}; B {b.split}",
        "data: " + ("same data_manifest" if a.data_manifest == b.data_manifest else
                    f"data_manifest differs: A {json.dumps(a.data_manifest)}, "
                    f"B {json.dumps(b.data_manifest)}"),
        f"users: {len(result.users)} compared; dropped: {dropped}",
        f"test items outside the catalog (counted as misses): A {result.outside_catalog['a']}, "
        f"B {result.outside_catalog['b']}",
        f"k: A {a.k}, B {b.k} (HR@{result.k}: the test item in the top {result.k})",
        "",
        f"{'metric':<9} {'A':>8} {'B':>8} {'B - A':>9}   {f'{LEVEL:.0%} CI':<21} "
        f"{'B - A <= 0':>10}",
    ]
    for name, m in result.metrics.items():
        interval = f"[{m.low:+.4f}, {m.high:+.4f}]"
        lines.append(f"{name:<9} {m.a:>8.4f} {m.b:>8.4f} {m.delta:>+9.4f}   {interval:<21} "
                     f"{m.share_not_better:>10.1%}")
    lines += ["",
              f"paired bootstrap: {result.resamples} resamples of the {len(result.users)} users "
              f"(seed {result.seed}); last column: share of resamples where B is not better",
              NO_MRR.format(k=result.k)]
    return "\n".join(lines)


def write_json_atomic(data: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# ---- command line ----

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Metric deltas B - A of two exported versions on "
                     "the leave-one-out test split, with paired bootstrap 95% intervals.")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="saved_model/NAME")
    parser.add_argument("a", metavar="A", help="the baseline VERSION")
    parser.add_argument("b", metavar="B", help="the VERSION compared with it")
    parser.add_argument("--index", choices=INDEXES, default="bruteforce",
                        help="bruteforce (exact, default) or scann (approximate)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0,
                        help="of the bootstrap and of --users (default 0)")
    parser.add_argument("--users", type=int,
                        help="compare a random sample of this many paired users (default all)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log lines, TensorFlow's included")
    return parser


def parse_version(text: str) -> int:
    from serving.model_store import VERSION_NAME

    if not VERSION_NAME.fullmatch(text):
        raise CompareError(f"version {text!r} is not a version number (the ASCII digits of a "
                           "directory under MODEL_DIR)")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_cli(build_parser(), argv)
    if isinstance(args, int):
        return args
    out = Path(args.json) if args.json else None
    try:
        if out is not None and out.is_dir():
            raise CompareError(f"--json {out} is a directory; expected a file name")
        result = compare(args.model_dir, parse_version(args.a), parse_version(args.b),
                         index=args.index, resamples=args.bootstrap, seed=args.seed,
                         users=args.users)
    except (CompareError, BatchError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(format_report(result))
    if out is not None:
        write_json_atomic(result.to_json(), out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
