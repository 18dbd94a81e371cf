"""From a reader's `RawData` to the processed tables, following shared/PROTOCOL.md.

Stable sort by (user, time) -> dedupe (first (user, item) occurrence) -> optional sparser variant
(seeded random drop, each user's last N events) -> min-seq-len and optional iterative k-core ->
split (leave-one-out or temporal) -> contiguous item_idx 1..N (0 = padding).
Each step is a pure frame-in/frame-out function; `build_processed` chains them and counts what
each drops.

Inside, user_id and item_id are categoricals whose categories are sorted, so sorting by code is
sorting by id and item_idx follows item_id order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recdata.schema import RAW_EVENT_COLUMNS, SPLITS, DataError, RawData

LEAVE_ONE_OUT = "leave-one-out"
TEMPORAL = "temporal"


@dataclass(frozen=True)
class ProcessOptions:
    """Every setting that changes the processed data (all recorded in the manifest)."""

    dedupe: bool = True
    min_seq_len: int = 3
    kcore_users: int = 0
    kcore_items: int = 0
    split: str = LEAVE_ONE_OUT
    cutoff: int | None = None  # temporal: events at or after this second are test
    valid_cutoff: int | None = None  # temporal: events in [valid_cutoff, cutoff) are valid
    max_user_events: int | None = None  # keep each user's last N events
    drop_events: float = 0.0  # drop this random share of the events
    seed: int = 0  # of the random drop

    def __post_init__(self) -> None:
        if self.split not in (LEAVE_ONE_OUT, TEMPORAL):
            raise ValueError(f"unknown split {self.split!r}")
        if self.split == LEAVE_ONE_OUT and self.min_seq_len < 3:
            raise ValueError("leave-one-out needs min_seq_len >= 3 (train, valid and test)")
        if self.min_seq_len < 1 or self.kcore_users < 0 or self.kcore_items < 0:
            raise ValueError("min_seq_len must be >= 1 and k-core thresholds >= 0")
        if self.split == TEMPORAL and self.cutoff is None:
            raise ValueError("the temporal split needs a cutoff")
        has_cutoff = self.cutoff is not None or self.valid_cutoff is not None
        if self.split == LEAVE_ONE_OUT and has_cutoff:
            raise ValueError("cutoffs only apply to the temporal split")
        if self.valid_cutoff is not None and self.valid_cutoff >= (self.cutoff or 0):
            raise ValueError("valid_cutoff must be before cutoff")
        if self.max_user_events is not None and self.max_user_events < self.min_seq_len:
            raise ValueError("max_user_events must be >= min_seq_len (else no user is left)")
        if not 0 <= self.drop_events < 1:
            raise ValueError("drop_events must be >= 0 and < 1")


@dataclass(frozen=True)
class Processed:
    """items: ITEMS_SCHEMA columns sorted by item_idx. events: user_id (categorical),
    item_idx, timestamp, event_type (categorical), value, split (categorical), sorted by user
    then time. counts: numbers for the manifest."""

    items: pd.DataFrame
    events: pd.DataFrame
    counts: dict = field(default_factory=dict)


def _sorted_categorical(values: pd.Series) -> pd.Categorical:
    """values as a categorical of strings with sorted, used-only categories."""
    cat = values.astype("category").cat.remove_unused_categories()
    if not cat.cat.categories.is_monotonic_increasing:
        cat = cat.cat.reorder_categories(cat.cat.categories.sort_values())
    return cat.array


def normalize_events(events: pd.DataFrame) -> pd.DataFrame:
    """RawData.events with sorted categoricals for ids and the canonical dtypes."""
    missing = [c for c in RAW_EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events frame lacks columns {missing}")
    return pd.DataFrame(
        {
            "user_id": _sorted_categorical(events["user_id"]),
            "item_id": _sorted_categorical(events["item_id"]),
            "timestamp": events["timestamp"].to_numpy(np.int64),
            "event_type": events["event_type"].astype("category").array,
            "value": events["value"].to_numpy(np.float32),
        }
    )


def sort_events(events: pd.DataFrame) -> pd.DataFrame:
    """Rows by user, then time; ties keep their input order (np.lexsort is stable)."""
    order = np.lexsort((events["timestamp"].to_numpy(), events["user_id"].cat.codes.to_numpy()))
    return events.take(order).reset_index(drop=True)


def _pair_keys(events: pd.DataFrame) -> np.ndarray:
    users = events["user_id"].cat.codes.to_numpy().astype(np.int64)
    items = events["item_id"].cat.codes.to_numpy().astype(np.int64)
    return users * len(events["item_id"].cat.categories) + items


def dedupe(events: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the first occurrence (in row order) of each (user, item) pair."""
    repeat = pd.Series(_pair_keys(events)).duplicated(keep="first").to_numpy()
    return events[~repeat].reset_index(drop=True), int(repeat.sum())


def drop_random(events: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, int]:
    """Drop round(fraction * rows) rows chosen uniformly at random (seeded)."""
    rank = np.random.default_rng(seed).permutation(len(events))
    drop = rank < round(fraction * len(events))
    return events[~drop].reset_index(drop=True), int(drop.sum())


def keep_last(events: pd.DataFrame, n: int) -> tuple[pd.DataFrame, int]:
    """Keep each user's last n events (rows sorted by user then time)."""
    users = events["user_id"].cat.codes.to_numpy()
    ends = np.cumsum(np.bincount(users))  # one past each user's last row
    from_end = ends[users] - np.arange(len(users))  # 1 for a user's last event
    keep = from_end <= n
    return events[keep].reset_index(drop=True), int((~keep).sum())


def filter_sequences(
    events: pd.DataFrame, min_seq_len: int, kcore_users: int = 0, kcore_items: int = 0
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop users with fewer than min_seq_len events and, when asked, iterate a k-core.

    The k-core drops items with fewer than kcore_items events and users with fewer than
    kcore_users events until nothing changes; min_seq_len is re-applied in every round, so the
    result satisfies all three thresholds at once. Drops are counted per reason.
    """
    dropped = {"min_seq_len": 0, "kcore_items": 0, "kcore_users": 0}
    users = events["user_id"].cat.codes.to_numpy()
    items = events["item_id"].cat.codes.to_numpy()
    n_users = len(events["user_id"].cat.categories)
    n_items = len(events["item_id"].cat.categories)
    keep = np.ones(len(events), dtype=bool)
    while True:
        before = int(keep.sum())
        if kcore_items > 0:
            item_count = np.bincount(items[keep], minlength=n_items)
            rare = keep & (item_count[items] < kcore_items)
            dropped["kcore_items"] += int(rare.sum())
            keep &= ~rare
        user_count = np.bincount(users[keep], minlength=n_users)
        short = keep & (user_count[users] < min_seq_len)
        dropped["min_seq_len"] += int(short.sum())
        keep &= ~short
        if kcore_users > 0:
            inactive = keep & (user_count[users] < kcore_users)
            dropped["kcore_users"] += int(inactive.sum())
            keep &= ~inactive
        if int(keep.sum()) == before or (kcore_items == 0 and kcore_users == 0):
            break
    if kcore_items == 0:
        del dropped["kcore_items"]
    if kcore_users == 0:
        del dropped["kcore_users"]
    return events[keep].reset_index(drop=True), dropped


def _split_column(codes: np.ndarray) -> pd.Categorical:
    return pd.Categorical.from_codes(codes.astype(np.int8), categories=list(SPLITS))


def split_leave_one_out(events: pd.DataFrame) -> pd.DataFrame:
    """Per user (rows sorted by user then time): last event test, second last valid, rest train.

    Users need at least 3 events (filter_sequences with min_seq_len >= 3 ensures it).
    """
    users = events["user_id"].cat.codes.to_numpy()
    n = len(users)
    is_last = np.ones(n, dtype=bool)
    is_last[:-1] = users[1:] != users[:-1]
    second_last = np.zeros(n, dtype=bool)
    second_last[:-1] = is_last[1:] & ~is_last[:-1]
    codes = np.zeros(n, dtype=np.int8)
    codes[second_last] = SPLITS.index("valid")
    codes[is_last] = SPLITS.index("test")
    return events.assign(split=_split_column(codes))


def split_temporal(
    events: pd.DataFrame, cutoff: int, valid_cutoff: int | None = None
) -> tuple[pd.DataFrame, int]:
    """Global time split: test from cutoff on, valid from valid_cutoff (if given) to cutoff.

    Valid/test events of users who have no train event are dropped; their number is returned.
    """
    ts = events["timestamp"].to_numpy()
    codes = np.where(ts >= cutoff, SPLITS.index("test"), SPLITS.index("train"))
    if valid_cutoff is not None:
        codes = np.where((ts >= valid_cutoff) & (ts < cutoff), SPLITS.index("valid"), codes)
    users = events["user_id"].cat.codes.to_numpy()
    has_train = np.bincount(users[codes == 0], minlength=len(events["user_id"].cat.categories)) > 0
    keep = has_train[users]
    out = events.assign(split=_split_column(codes))[keep].reset_index(drop=True)
    return out, int((~keep).sum())


def index_items(events: pd.DataFrame, items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Number the items that have events 1..N in item_id order and attach their metadata.

    Returns (items, events): items has item_id, item_idx, text, category, brand, price and count
    (train events); events has item_idx (int32) in place of item_id.
    """
    codes = events["item_id"].cat.codes.to_numpy()
    categories = events["item_id"].cat.categories
    present = np.bincount(codes, minlength=len(categories)) > 0
    idx_of_code = np.cumsum(present).astype(np.int32)  # 1-based index among present codes
    item_idx = idx_of_code[codes]
    item_ids = categories[present]
    n_items = len(item_ids)
    is_train = events["split"].cat.codes.to_numpy() == SPLITS.index("train")
    count = np.bincount(item_idx[is_train], minlength=n_items + 1)[1:].astype(np.int64)

    out_items = items_with_metadata(np.asarray(item_ids, dtype=object), count, items)
    out_events = pd.DataFrame(
        {
            "user_id": events["user_id"].array,
            "item_idx": item_idx,
            "timestamp": events["timestamp"].to_numpy(),
            "event_type": events["event_type"].array,
            "value": events["value"].to_numpy(),
            "split": events["split"].array,
        }
    )
    return out_items, out_events


def items_with_metadata(
    item_ids: np.ndarray, count: np.ndarray, meta: pd.DataFrame
) -> pd.DataFrame:
    """The items table: item_ids (in item_idx order) numbered 1..N, their metadata from `meta`
    (blank or NaN where missing) and their train-event counts."""
    m = meta.drop_duplicates("item_id").set_index("item_id").reindex(item_ids)
    return pd.DataFrame(
        {
            "item_id": item_ids,
            "item_idx": np.arange(1, len(item_ids) + 1, dtype=np.int32),
            "text": m["text"].fillna("").to_numpy(dtype=object),
            "category": m["category"].fillna("").to_numpy(dtype=object),
            "brand": m["brand"].fillna("").to_numpy(dtype=object),
            "price": m["price"].to_numpy(dtype=np.float64),
            "count": np.asarray(count, dtype=np.int64),
        }
    )


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """Percentiles of events per user (p50/p90/p99, linear interpolation) and the max, from
    each user's event count."""
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    rounded = [round(float(p), 3) for p in (p50, p90, p99)]
    return dict(zip(("p50", "p90", "p99"), rounded, strict=True)) | {"max": int(lengths.max())}


def nothing_left(raw: RawData, dropped: dict[str, int]) -> DataError:
    """The error when filtering left no event: what was read and what each step dropped."""
    sources = ", ".join(str(p) for p in raw.inputs) or "generated data"
    reasons = ", ".join(f"{k} {v}" for k, v in dropped.items() if v)
    return DataError(
        f"{sources}: no events left after filtering ({raw.rows_read} rows read; "
        f"dropped: {reasons or 'none'})"
    )


def processed_counts(
    raw: RawData,
    dropped: dict[str, int],
    num_events: int,
    items: pd.DataFrame,
    lengths: np.ndarray,
    per_split,
) -> dict:
    """The manifest's counts: `lengths` each kept user's events, `per_split` events per SPLITS
    entry."""
    with_metadata = int(items["item_id"].isin(raw.items["item_id"]).sum())
    return {
        "rows_read": int(raw.rows_read),
        "num_users": int(len(lengths)),
        "num_items": int(len(items)),
        "num_events": int(num_events),
        "events_per_split": {name: int(per_split[i]) for i, name in enumerate(SPLITS)},
        "dropped": {k: int(v) for k, v in dropped.items()},
        "items_without_metadata": int(len(items) - with_metadata),
        "item_rows_skipped": int(raw.item_rows_skipped),
        "sequence_length": length_stats(np.asarray(lengths)),
    }


def build_processed(raw: RawData, options: ProcessOptions) -> Processed:
    """The whole pipeline; raises DataError when nothing is left after filtering."""
    dropped = dict(raw.dropped)
    events = sort_events(normalize_events(raw.events))
    if options.dedupe:
        events, dropped["duplicate"] = dedupe(events)
    if options.drop_events > 0:
        events, dropped["drop_events"] = drop_random(events, options.drop_events, options.seed)
    if options.max_user_events is not None:
        events, dropped["max_user_events"] = keep_last(events, options.max_user_events)
    events, filtered = filter_sequences(
        events, options.min_seq_len, options.kcore_users, options.kcore_items
    )
    dropped.update(filtered)
    if options.split == LEAVE_ONE_OUT:
        events = split_leave_one_out(events)
    else:
        events, dropped["no_train_history"] = split_temporal(
            events, options.cutoff, options.valid_cutoff
        )
    if len(events) == 0:
        raise nothing_left(raw, dropped)
    events = events.assign(
        user_id=events["user_id"].cat.remove_unused_categories(),
        event_type=events["event_type"].cat.remove_unused_categories(),
    )
    items, events = index_items(events, raw.items)
    lengths = np.bincount(events["user_id"].cat.codes.to_numpy())
    per_split = np.bincount(events["split"].cat.codes.to_numpy(), minlength=len(SPLITS))
    counts = processed_counts(raw, dropped, len(events), items, lengths[lengths > 0], per_split)
    return Processed(items=items, events=events, counts=counts)
