"""Prepared events -> per-user sequences -> fixed-length, left-padded training and evaluation
arrays (the SASRec layout: input items and the next item at every position)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

PURCHASE = "purchase"


@dataclass
class Sequences:
    """Per-user event sequences in CSR form (users in the order of `user_ids`)."""

    user_ids: np.ndarray  # [users] original user ids
    offsets: np.ndarray  # [users + 1] start of each user's train events
    items: np.ndarray  # [train events] item_idx, time-ordered per user
    event_types: np.ndarray  # [train events] event-type ids (1..E)
    values: np.ndarray  # [train events] rating / weight
    purchase: np.ndarray  # [train events] 1.0 where the event is a purchase
    valid_item: np.ndarray  # [users] 0 = none
    valid_event: np.ndarray
    test_item: np.ndarray  # [users] 0 = none
    test_event: np.ndarray
    event_vocab: list[str]  # id i + 1 <-> event_vocab[i]
    num_items: int
    cold_items: np.ndarray  # item_idx held out of training (cold-start experiment)
    any_purchase: bool = True  # the data has purchase events (else every event is a positive)

    @property
    def num_event_types(self) -> int:
        """Size of the user tower's event-type table (id 0 = padding / unknown); 0 when the data
        has just one kind of event and there is nothing to embed."""
        return len(self.event_vocab) + 1 if len(self.event_vocab) > 1 else 0

    def train_counts(self) -> np.ndarray:
        """Training interactions per item_idx: [num_items + 1]."""
        return np.bincount(self.items, minlength=self.num_items + 1)


def held_out_items(num_items: int, cold_fraction: float, seed: int) -> np.ndarray:
    """The item_idx `--cold-items` holds out of training (sorted int32; none at 0)."""
    if cold_fraction <= 0:
        return np.zeros(0, np.int32)
    rng = np.random.default_rng(seed)
    how_many = int(round(cold_fraction * num_items))
    return np.sort(rng.choice(np.arange(1, num_items + 1), how_many,
                              replace=False)).astype(np.int32)


def build_sequences(events: pd.DataFrame, num_items: int, cold_fraction: float = 0.0,
                    seed: int = 0, event_vocab: list[str] | None = None,
                    any_purchase: bool | None = None) -> Sequences:
    """Split events (sorted by user then time, as prepare_data writes them) into sequences.

    With `cold_fraction` > 0 that share of items is removed from the training events entirely
    (their valid/test events stay), to measure how well cold items are recommended.
    `event_vocab` and `any_purchase` default to what `events` holds; a part of the data (one
    shard) passes the whole data's.
    """
    if event_vocab is None:
        event_vocab = sorted(events["event_type"].astype(str).unique())
    event_ids = pd.Categorical(events["event_type"].astype(str),
                               categories=event_vocab).codes.astype(np.int32) + 1
    user_codes, user_ids = pd.factorize(events["user_id"], sort=False)
    num_users = len(user_ids)
    split = events["split"].to_numpy()
    items = events["item_idx"].to_numpy(np.int32)
    values = events["value"].to_numpy(np.float32)
    kinds = events["event_type"].astype(str).to_numpy()
    # Ranking label of an observed event: purchased or not; where the data has no purchase
    # events at all, every observed interaction is a positive (against sampled negatives).
    if any_purchase is None:
        any_purchase = bool((kinds == PURCHASE).any())
    purchase = ((kinds == PURCHASE) if any_purchase
                else np.ones(len(kinds), bool)).astype(np.float32)

    cold = held_out_items(num_items, cold_fraction, seed)
    train = split == "train"
    if len(cold):
        train &= ~np.isin(items, cold)

    order = np.argsort(user_codes[train], kind="stable")
    train_users = user_codes[train][order]
    offsets = np.zeros(num_users + 1, np.int64)
    np.add.at(offsets, train_users + 1, 1)
    offsets = np.cumsum(offsets)

    def last_of(name: str) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(split == name)
        item, kind = np.zeros(num_users, np.int32), np.zeros(num_users, np.int32)
        item[user_codes[rows]] = items[rows]
        kind[user_codes[rows]] = event_ids[rows]
        return item, kind

    valid_item, valid_event = last_of("valid")
    test_item, test_event = last_of("test")
    return Sequences(np.asarray(user_ids), offsets, items[train][order],
                     event_ids[train][order], values[train][order], purchase[train][order],
                     valid_item, valid_event, test_item, test_event, event_vocab, num_items,
                     cold, any_purchase)


def _left_pad(rows: list[np.ndarray], length: int, dtype) -> np.ndarray:
    out = np.zeros((len(rows), length), dtype)
    for i, row in enumerate(rows):
        row = row[-length:]
        if len(row):
            out[i, length - len(row):] = row
    return out


def training_arrays(seqs: Sequences, max_len: int,
                    windows: str = "last") -> dict[str, np.ndarray]:
    """Left-padded training windows: `max_len` train items as input and the item after each of
    them as target (SASRec's training layout).

    windows="last": one window per user, their last `max_len` + 1 train items (SASRec's own
    choice: a user longer than that contributes only their most recent events).
    windows="all": also the earlier events, cut into further windows going back in time whose
    targets do not overlap, so every train event is a target exactly once per epoch.
    """
    if windows not in ("last", "all"):
        raise ValueError(f"windows must be 'last' or 'all', got {windows!r}")
    starts, ends = seqs.offsets[:-1], seqs.offsets[1:]
    users = np.flatnonzero(ends - starts >= 2)
    targets = ends[users] - starts[users] - 1  # every event but the first can be a target
    count = -(-targets // max_len) if windows == "all" else np.ones_like(targets)
    # Window j of a user (j = 0 newest) ends at event hi = end - j * max_len; its input is
    # events [hi - max_len - 1, hi - 1) and its targets the next event for each.
    owner = np.repeat(users, count)
    back = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)  # j per window
    hi = ends[owner] - back * max_len
    lo = np.maximum(starts[owner], hi - max_len - 1)
    out = {}
    for name, source, dtype in (("history", seqs.items, np.int32),
                                ("event_types", seqs.event_types, np.int32)):
        out[name] = _left_pad([source[a:b - 1] for a, b in zip(lo, hi)], max_len, dtype)
    for name, source, dtype in (("targets", seqs.items, np.int32),
                                ("target_values", seqs.values, np.float32),
                                ("target_purchase", seqs.purchase, np.float32)):
        out[name] = _left_pad([source[a + 1:b] for a, b in zip(lo, hi)], max_len, dtype)
    return out


@dataclass
class EvalSet:
    """Inputs for scoring one held-out item per user."""

    users: np.ndarray  # [n] row into Sequences
    history: np.ndarray  # [n, max_len] left-padded input items
    event_types: np.ndarray  # [n, max_len]
    target: np.ndarray  # [n]
    seen: list[np.ndarray]  # full input history per user (excluded from the ranking)


def eval_set(seqs: Sequences, split: str, max_len: int,
             users: np.ndarray | None = None) -> EvalSet:
    """Validation scores the valid item from the train history; test scores the test item from
    the train history plus the valid item (the protocol's leave-one-out)."""
    target = seqs.valid_item if split == "valid" else seqs.test_item
    candidates = np.flatnonzero((target > 0) & (np.diff(seqs.offsets) > 0))
    if users is not None:
        candidates = np.intersect1d(candidates, users)
    histories, kinds = [], []
    for u in candidates:
        a, b = seqs.offsets[u], seqs.offsets[u + 1]
        items, events = seqs.items[a:b], seqs.event_types[a:b]
        if split == "test" and seqs.valid_item[u] > 0:
            items = np.append(items, seqs.valid_item[u])
            events = np.append(events, seqs.valid_event[u])
        histories.append(items)
        kinds.append(events)
    return EvalSet(candidates, _left_pad(histories, max_len, np.int32),
                   _left_pad(kinds, max_len, np.int32), target[candidates].astype(np.int32),
                   histories)
