"""recdata.synthetic: seeded, exact sizes, and the structure a recommender should find."""

import numpy as np
import pandas as pd
import pytest

from recdata.synthetic import generate


@pytest.fixture(scope="module")
def raw():
    return generate(num_users=2000, num_items=2000, num_events=60_000, seed=0)


def transitions(raw) -> pd.DataFrame:
    """Consecutive (prev, next) item pairs within each user's time-ordered sequence."""
    ev = raw.events
    order = np.lexsort((ev["timestamp"].to_numpy(), ev["user_id"].cat.codes.to_numpy()))
    users = ev["user_id"].cat.codes.to_numpy()[order]
    items = ev["item_id"].astype(str).to_numpy()[order]
    same = users[1:] == users[:-1]
    return pd.DataFrame({"prev": items[:-1][same], "next": items[1:][same]})


def top_successor_share(pairs: pd.DataFrame, min_count: int = 20) -> float:
    """How often an item is followed by its most frequent next item (frequent items only)."""
    counts = pairs.groupby(["prev", "next"]).size()
    per_prev = counts.groupby(level=0)
    total, top = per_prev.sum(), per_prev.max()
    frequent = total >= min_count
    return float(top[frequent].sum() / total[frequent].sum())


def test_same_seed_same_data_other_seed_other_data(raw):
    again = generate(num_users=2000, num_items=2000, num_events=60_000, seed=0)
    pd.testing.assert_frame_equal(raw.events, again.events)
    pd.testing.assert_frame_equal(raw.items, again.items)
    other = generate(num_users=2000, num_items=2000, num_events=60_000, seed=1)
    assert not raw.events["item_id"].equals(other.events["item_id"])


def test_sizes_and_columns(raw):
    ev, items = raw.events, raw.items
    assert len(ev) == raw.rows_read == 60_000
    assert ev["user_id"].nunique() == 2000
    assert len(items) == 2000 and items["item_id"].is_unique
    assert set(ev["item_id"].astype(str)) <= set(items["item_id"])
    assert (np.diff(ev["timestamp"].to_numpy()) >= 0).all()  # a log, in time order
    assert (items["text"].str.len() > 0).all() and (items["price"] > 0).all()
    assert items["category"].nunique() > 1 and items["brand"].nunique() > 1


def test_sequence_lengths_vary_and_respect_the_minimum(raw):
    lengths = raw.events["user_id"].value_counts()
    assert lengths.min() >= 3
    assert lengths.max() >= 5 * lengths.median()


def test_event_types_and_values(raw):
    ev = raw.events
    share = ev["event_type"].value_counts(normalize=True)
    assert set(share.index) == {"view", "cart", "purchase"}
    assert share["view"] > 0.6 and share["purchase"] > 0.05
    assert (ev.loc[ev["event_type"] == "view", "value"] == 1.0).all()
    assert (ev.loc[ev["event_type"] != "view", "value"] >= 1.0).all()


def test_popularity_is_long_tailed(raw):
    counts = raw.events["item_id"].value_counts().to_numpy()  # descending, zeros included
    top_10_percent = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_10_percent > 0.4
    assert counts.mean() > 2 * np.median(counts)  # most items sit below the mean


def test_sequences_have_learnable_transitions(raw):
    pairs = transitions(raw)
    shuffled = pairs.assign(next=np.random.default_rng(0).permutation(pairs["next"].to_numpy()))
    assert top_successor_share(pairs) > 3 * top_successor_share(shuffled)
    category = raw.items.set_index("item_id")["category"]
    same_category = (pairs["prev"].map(category) == pairs["next"].map(category)).mean()
    shuffled_same = (shuffled["prev"].map(category) == shuffled["next"].map(category)).mean()
    assert same_category > 0.7 and same_category > 2 * shuffled_same


def test_item_text_correlates_with_behaviour(raw):
    # Title words (brand and category names left out) shared by consecutive items vs random pairs.
    title = raw.items["text"].str.split(" | ", regex=False).str[0]
    words = dict(zip(raw.items["item_id"], title.str.split().str[1:].map(set), strict=True))
    pairs = transitions(raw).sample(5000, random_state=0)
    rng = np.random.default_rng(0)
    random_next = rng.choice(raw.items["item_id"].to_numpy(), size=len(pairs))

    def share_a_word(prev, nxt) -> float:
        return float(np.mean([bool(words[a] & words[b]) for a, b in zip(prev, nxt, strict=True)]))

    assert share_a_word(pairs["prev"], pairs["next"]) > 3 * share_a_word(pairs["prev"], random_next)


def test_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        generate(num_users=10, num_items=5, num_events=5)
