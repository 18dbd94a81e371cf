"""Where a model wins and loses: test metrics by target-item popularity and by user history
length, each beside the baselines scored on the same rows.

Slices come from the ranks of the one full-catalog pass (training/evaluate.py); nothing is
scored again.

Item buckets, by the target's training interactions:
- cold: none (held out with --cold-items, or only ever a valid/test target);
- tail: 1..TAIL_MAX;
- head: the most-interacted items that together hold HEAD_SHARE of all training interactions
  (items above the tail only);
- torso: the rest.
History buckets, by the number of events in the user's input history: <= 5, 6-20, > 20.
"""

from __future__ import annotations

import numpy as np

from training.evaluate import metrics_from_ranks

TAIL_MAX = 5
HEAD_SHARE = 0.2
ITEM_BUCKETS = ("head", "torso", "tail", "cold")
HISTORY_EDGES = (5, 20)
HISTORY_BUCKETS = ("history<=5", "history 6-20", "history>20")
REPORTED = ("hr@10", "ndcg@10")


def item_buckets(train_counts: np.ndarray) -> np.ndarray:
    """Bucket index (into ITEM_BUCKETS) of every item_idx; `train_counts` [num_items + 1]."""
    counts = np.asarray(train_counts, np.int64)
    buckets = np.full(len(counts), 1, np.int64)  # torso
    buckets[counts <= TAIL_MAX] = 2
    buckets[counts == 0] = 3
    order = np.argsort(-counts, kind="stable")
    cumulative = np.cumsum(counts[order])
    # The smallest prefix reaching the share: the item crossing the line belongs to the head.
    head = order[:int(np.searchsorted(cumulative, HEAD_SHARE * counts.sum())) + 1]
    head = head[counts[head] > TAIL_MAX]
    buckets[head] = 0
    return buckets


def history_buckets(lengths: np.ndarray) -> np.ndarray:
    """Bucket index (into HISTORY_BUCKETS) of each history length."""
    return np.searchsorted(np.asarray(HISTORY_EDGES), np.asarray(lengths), side="left")


def slice_metrics(ranks: dict[str, np.ndarray], targets: np.ndarray, history_lengths: np.ndarray,
                  train_counts: np.ndarray) -> dict[str, dict]:
    """{slice: {"users": n, scorer: {hr@10, ndcg@10}}} for every item and history bucket.

    `ranks` maps each scorer ("model", "popularity", "text_knn") to the 0-based full-catalog
    rank of each row's target; `targets` and `history_lengths` are per row.
    """
    by_item = item_buckets(train_counts)[np.asarray(targets)]
    by_history = history_buckets(history_lengths)
    out = {}
    for names, codes in ((ITEM_BUCKETS, by_item), (HISTORY_BUCKETS, by_history)):
        for code, name in enumerate(names):
            rows = codes == code
            entry: dict = {"users": int(rows.sum())}
            for scorer, r in ranks.items():
                metrics = metrics_from_ranks(np.asarray(r)[rows])
                entry[scorer] = {k: metrics[k] for k in REPORTED}
            out[name] = entry
    return out


def slice_lines(slices: dict[str, dict]) -> list[str]:
    """The slice table as printed after training (NDCG@10, users per slice)."""
    scorers = [s for s in ("model", "popularity", "text_knn")
               if any(s in entry for entry in slices.values())]
    head = f"{'slice':<14}{'users':>8}" + "".join(f"{s:>12}" for s in scorers)
    lines = ["NDCG@10 by slice (full catalog):", head]
    for name, entry in slices.items():
        if not entry["users"]:
            continue
        lines.append(f"{name:<14}{entry['users']:>8,}" + "".join(
            f"{entry[s]['ndcg@10']:>12.4f}" for s in scorers))
    return lines
