"""recdata.process: ordering, dedupe, filters, k-core, splits and item indexing."""

import numpy as np
import pandas as pd
import pytest

from recdata.process import (
    ProcessOptions,
    build_processed,
    dedupe,
    filter_sequences,
    normalize_events,
    sort_events,
)
from recdata.schema import DataError, RawData, empty_items, make_events
from recdata.synthetic import generate


def raw_from_rows(rows: list[tuple], items: pd.DataFrame | None = None) -> RawData:
    """rows: (user, item, timestamp, value) in file order."""
    users, item_ids, times, values = zip(*rows, strict=True)
    events = make_events(
        pd.Categorical(users), pd.Categorical(item_ids), np.array(times), "view", np.array(values)
    )
    return RawData(
        events=events, items=empty_items() if items is None else items, rows_read=len(rows)
    )


def check_invariants(result, options: ProcessOptions) -> None:
    """What downstream code relies on, for any processed data set."""
    items, events = result.items, result.events
    n_items = len(items)
    # item_idx: 1..N contiguous in item_id order, 0 unused, every item has events.
    assert items["item_idx"].tolist() == list(range(1, n_items + 1))
    assert items["item_id"].tolist() == sorted(items["item_id"])
    assert events["item_idx"].min() >= 1 and events["item_idx"].max() == n_items
    assert set(events["item_idx"]) == set(range(1, n_items + 1))
    # Sorted by user, then time.
    users = events["user_id"].astype(str).to_numpy()
    assert (users[:-1] <= users[1:]).all()
    same_user = users[:-1] == users[1:]
    ts = events["timestamp"].to_numpy()
    assert (ts[:-1][same_user] <= ts[1:][same_user]).all()
    # count = train events per item.
    train = events[events["split"] == "train"]
    expected = train["item_idx"].value_counts().reindex(items["item_idx"], fill_value=0)
    assert items["count"].tolist() == expected.tolist()
    order = {"train": 0, "valid": 1, "test": 2}
    for user, seq in events.groupby("user_id", observed=True, sort=False):
        codes = seq["split"].astype(str).map(order).to_numpy()
        assert codes[0] == 0, f"user {user} has valid/test events but no train history"
        assert (np.diff(codes) >= 0).all(), f"user {user}: valid/test are not the last events"
        if options.split == "leave-one-out":
            assert codes[-1] == 2 and codes[-2] == 1 and (codes[:-2] == 0).all()
        valid_test_ts = seq["timestamp"].to_numpy()[codes > 0]
        assert (valid_test_ts >= seq["timestamp"].to_numpy()[codes == 0].max()).all()
    counts = result.counts
    assert counts["num_events"] == len(events)
    assert counts["rows_read"] == counts["num_events"] + sum(counts["dropped"].values())
    assert sum(counts["events_per_split"].values()) == len(events)


def test_sort_is_by_user_then_time_with_ties_in_file_order():
    raw = raw_from_rows(
        [("b", "x", 5, 1), ("a", "y", 9, 2), ("b", "z", 5, 3), ("a", "x", 1, 4), ("b", "w", 2, 5)]
    )
    events = sort_events(normalize_events(raw.events))
    assert events["user_id"].astype(str).tolist() == ["a", "a", "b", "b", "b"]
    # b's two events at t=5 keep their file order: x (value 1) before z (value 3).
    assert events["value"].tolist() == [4, 2, 5, 1, 3]


def test_dedupe_keeps_first_occurrence_in_time_then_file_order():
    raw = raw_from_rows(
        [
            ("u", "A", 5, 1.0),  # later in time than the next row: not the first occurrence
            ("u", "A", 2, 2.0),
            ("u", "B", 3, 3.0),
            ("u", "B", 3, 4.0),  # same time as the previous row: file order decides
            ("v", "A", 7, 5.0),  # another user: not a duplicate
        ]
    )
    events, dropped = dedupe(sort_events(normalize_events(raw.events)))
    assert dropped == 2
    assert list(
        zip(
            events["user_id"].astype(str),
            events["item_id"].astype(str),
            events["value"],
            strict=True,
        )
    ) == [("u", "A", 2.0), ("u", "B", 3.0), ("v", "A", 5.0)]


def test_keep_repeats_keeps_them():
    rows = [("u", "A", 1, 1), ("u", "B", 2, 1), ("u", "A", 3, 1), ("u", "C", 4, 1)]
    kept = build_processed(raw_from_rows(rows), ProcessOptions(dedupe=False))
    deduped = build_processed(raw_from_rows(rows), ProcessOptions())
    assert kept.counts["num_events"] == 4 and "duplicate" not in kept.counts["dropped"]
    assert deduped.counts["num_events"] == 3 and deduped.counts["dropped"]["duplicate"] == 1
    assert kept.events["split"].tolist() == ["train", "train", "valid", "test"]


def test_min_seq_len_drops_short_users_only():
    rows = [
        ("a", "x", 1, 1),
        ("a", "y", 2, 1),
        ("b", "x", 1, 1),
        ("b", "y", 2, 1),
        ("b", "z", 3, 1),
    ]
    result = build_processed(raw_from_rows(rows), ProcessOptions(min_seq_len=3))
    assert set(result.events["user_id"].astype(str)) == {"b"}
    assert result.counts["dropped"]["min_seq_len"] == 2
    check_invariants(result, ProcessOptions(min_seq_len=3))


def test_kcore_iterates_until_stable():
    # Item "rare" has 1 event: dropping it leaves user "c" with 1 event, dropping "c" leaves
    # item "mid" with 1 event, which then goes too; users a and b are a stable 2-core.
    rows = [
        ("a", "x", 1, 1),
        ("a", "y", 2, 1),
        ("b", "x", 1, 1),
        ("b", "y", 2, 1),
        ("c", "rare", 1, 1),
        ("c", "mid", 2, 1),
        ("d", "mid", 1, 1),
        ("d", "x", 2, 1),
    ]
    events = sort_events(normalize_events(raw_from_rows(rows).events))
    kept, dropped = filter_sequences(events, min_seq_len=1, kcore_users=2, kcore_items=2)
    pairs = set(zip(kept["user_id"].astype(str), kept["item_id"].astype(str), strict=True))
    assert pairs == {("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")}
    assert dropped == {"min_seq_len": 0, "kcore_items": 2, "kcore_users": 2}
    # The result satisfies both thresholds.
    assert kept["user_id"].astype(str).value_counts().min() >= 2
    assert kept["item_id"].astype(str).value_counts().min() >= 2


def test_max_user_events_keeps_each_users_latest_events():
    rows = [
        ("a", "v", 5, 1),
        ("a", "w", 1, 1),
        ("a", "x", 4, 1),
        ("a", "y", 2, 1),
        ("a", "z", 3, 1),
        ("a", "w", 6, 1),  # a repeat: deduped before the cap, so it does not count
        ("b", "x", 1, 1),
        ("b", "y", 2, 1),
        ("b", "z", 3, 1),
    ]
    options = ProcessOptions(max_user_events=3)
    result = build_processed(raw_from_rows(rows), options)
    ev = result.events
    assert ev.loc[ev["user_id"] == "a", "timestamp"].tolist() == [3, 4, 5]
    assert ev.loc[ev["user_id"] == "b", "timestamp"].tolist() == [1, 2, 3]
    assert result.counts["dropped"] == {
        "duplicate": 1,
        "max_user_events": 2,
        "min_seq_len": 0,
    }
    check_invariants(result, options)


def test_drop_events_drops_a_seeded_random_share():
    raw = generate(num_users=200, num_items=150, num_events=5000, seed=4)
    duplicates = build_processed(raw, ProcessOptions()).counts["dropped"]["duplicate"]

    def sparser(seed: int):
        return build_processed(raw, ProcessOptions(drop_events=0.3, seed=seed))

    first, again, other = sparser(0), sparser(0), sparser(1)
    assert first.counts["dropped"]["drop_events"] == round(0.3 * (len(raw.events) - duplicates))
    pd.testing.assert_frame_equal(first.events, again.events)
    pd.testing.assert_frame_equal(first.items, again.items)
    assert first.counts == again.counts
    assert other.counts["dropped"]["drop_events"] == first.counts["dropped"]["drop_events"]
    assert not first.events[["user_id", "item_idx"]].equals(other.events[["user_id", "item_idx"]])
    check_invariants(first, ProcessOptions(drop_events=0.3))


def test_leave_one_out_invariants_on_synthetic_data():
    raw = generate(num_users=300, num_items=200, num_events=6000, seed=3)
    options = ProcessOptions()
    result = build_processed(raw, options)
    check_invariants(result, options)
    assert result.counts["events_per_split"]["test"] == result.counts["num_users"]
    assert result.counts["events_per_split"]["valid"] == result.counts["num_users"]


def test_temporal_split_drops_users_without_train_history():
    rows = [
        ("a", "x", 10, 1),
        ("a", "y", 20, 1),
        ("a", "z", 30, 1),
        ("a", "w", 40, 1),
        ("b", "x", 35, 1),
        ("b", "y", 45, 1),  # no event before the valid cutoff
        ("c", "x", 5, 1),
        ("c", "z", 6, 1),  # train only
    ]
    options = ProcessOptions(min_seq_len=1, split="temporal", cutoff=40, valid_cutoff=30)
    result = build_processed(raw_from_rows(rows), options)
    ev = result.events
    assert set(ev["user_id"].astype(str)) == {"a", "c"}
    assert result.counts["dropped"]["no_train_history"] == 2
    a = ev[ev["user_id"] == "a"]
    assert a["split"].tolist() == ["train", "train", "valid", "test"]
    assert (ev[ev["user_id"] == "c"]["split"] == "train").all()
    check_invariants(result, options)


def test_temporal_split_on_synthetic_data():
    raw = generate(num_users=200, num_items=150, num_events=5000, seed=4)
    ts = raw.events["timestamp"]
    cutoff, valid_cutoff = int(ts.quantile(0.8)), int(ts.quantile(0.6))
    options = ProcessOptions(split="temporal", cutoff=cutoff, valid_cutoff=valid_cutoff)
    result = build_processed(raw, options)
    check_invariants(result, options)
    ev = result.events
    assert (ev.loc[ev["split"] == "test", "timestamp"] >= cutoff).all()
    assert (ev.loc[ev["split"] == "train", "timestamp"] < valid_cutoff).all()
    assert result.counts["events_per_split"]["valid"] > 0


def test_item_metadata_is_attached_and_missing_metadata_counted():
    items = pd.DataFrame(
        {
            "item_id": ["y", "x", "unused"],
            "text": ["Y text", "X text", "never seen"],
            "category": ["cy", "cx", ""],
            "brand": ["", "bx", ""],
            "price": [1.5, np.nan, 3.0],
        }
    )
    rows = [("a", "y", 1, 1), ("a", "x", 2, 1), ("a", "z", 3, 1), ("a", "x2", 4, 1)]
    result = build_processed(raw_from_rows(rows, items), ProcessOptions())
    it = result.items
    assert it["item_id"].tolist() == ["x", "x2", "y", "z"]
    assert it["text"].tolist() == ["X text", "", "Y text", ""]
    assert it["category"].tolist() == ["cx", "", "cy", ""]
    assert it["price"].tolist()[2] == 1.5 and np.isnan(it["price"].tolist()[0])
    assert it["count"].tolist() == [1, 0, 1, 0]  # x2 is valid, z is test
    assert result.counts["items_without_metadata"] == 2
    assert it["item_idx"].dtype == np.int32 and result.events["item_idx"].dtype == np.int32


def test_nothing_left_raises_a_data_error():
    rows = [("a", "x", 1, 1), ("b", "y", 2, 1)]
    with pytest.raises(DataError, match="no events left after filtering.*min_seq_len 2"):
        build_processed(raw_from_rows(rows), ProcessOptions())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_seq_len": 2},  # leave-one-out needs 3
        {"split": "temporal"},  # no cutoff
        {"split": "temporal", "cutoff": 5, "valid_cutoff": 5},
        {"cutoff": 5},  # cutoff without temporal
        {"split": "random"},
        {"drop_events": 1.0},
        {"drop_events": -0.1},
        {"max_user_events": 2},  # below min_seq_len 3: no user would be left
    ],
)
def test_inconsistent_options_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ProcessOptions(**kwargs)
