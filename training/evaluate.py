"""Full-catalog leave-one-out evaluation (shared/PROTOCOL.md) and the labelled sampled variant.

Every item is scored, items in the user's input history are excluded, and the target's rank
counts every other item scoring >= the target (ties count against the target, so a constant
scorer gets no credit).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from training.sequences import EvalSet

KS = (5, 10, 20)

# scores for a batch of eval rows: (row indices into the EvalSet) -> [rows, num_items + 1]
ScoreFn = Callable[[np.ndarray], np.ndarray]


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray,
                      seen: list[np.ndarray]) -> np.ndarray:
    """0-based rank of each target among the non-excluded items (column 0 is padding).

    scores [rows, num_items + 1] float; mutated in place: padding and seen items set to -inf
    (a target that also appears in the history, possible with repeats kept, stays rankable).
    """
    rows = np.arange(len(targets))
    target_scores = scores[rows, targets].copy()
    scores[:, 0] = -np.inf
    for row, items in enumerate(seen):
        scores[row, items] = -np.inf
    scores[rows, targets] = target_scores
    ranks = (scores >= target_scores[:, None]).sum(axis=1) - 1  # the target ties with itself
    ranks[np.isnan(target_scores)] = scores.shape[1]  # a NaN score earns nothing
    return ranks


def _sampled_ranks(scores: np.ndarray, targets: np.ndarray, seen: list[np.ndarray],
                   negatives: int, num_items: int, rng: np.random.Generator) -> np.ndarray:
    """Rank among `negatives` uniformly drawn unseen items (the SASRec paper's protocol)."""
    ranks = np.zeros(len(targets), np.int64)
    for row, (target, items) in enumerate(zip(targets, seen)):
        excluded = np.append(items, target)
        draw = rng.integers(1, num_items + 1, size=2 * negatives + len(excluded))
        pool = np.unique(draw[~np.isin(draw, excluded)])
        draw = rng.permutation(pool)[:negatives]
        ranks[row] = int((scores[row, draw] >= scores[row, target]).sum())
    return ranks


def ndcg_gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """Each user's NDCG@k: 1 / log2(rank + 2) inside the top k, else 0."""
    ranks = np.asarray(ranks, np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2), 0.0)


def metrics_from_ranks(ranks: np.ndarray, prefix: str = "") -> dict[str, float]:
    ranks = np.asarray(ranks, np.float64)
    out = {}
    for k in KS:
        hit = ranks < k
        out[f"{prefix}hr@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"{prefix}ndcg@{k}"] = float(ndcg_gains(ranks, k).mean()) if len(ranks) else 0.0
    out[f"{prefix}mrr"] = float((1.0 / (ranks + 1)).mean()) if len(ranks) else 0.0
    return out


def ndcg_interval(ranks: np.ndarray, k: int = 10) -> tuple[float | None, float | None]:
    """95% interval of NDCG@k over the evaluated users (mean +- 1.96 standard errors of the
    per-user values): how far the figure could move on another draw of users of the same
    kind. Two runs whose figures differ by much less than its half-width are not told apart
    by this test set. None with fewer than two users (kept JSON-safe: no NaN)."""
    if len(ranks) < 2:
        return (None, None)
    gains = ndcg_gains(ranks, k)
    half = 1.96 * gains.std(ddof=1) / np.sqrt(len(gains))
    return (float(gains.mean() - half), float(gains.mean() + half))


def interval_text(metrics: dict) -> str | None:
    """"low-high" of a metrics dict's NDCG@10 interval; None where it holds none (fewer than
    two users, or a run of a version that did not record it)."""
    low, high = metrics.get("ndcg@10_low"), metrics.get("ndcg@10_high")
    return None if low is None or high is None else f"{low:.4f}-{high:.4f}"


def evaluate(score_fn: ScoreFn, data: EvalSet, num_items: int, batch_size: int = 512,
             sampled_negatives: int = 0, seed: int = 0, rows: np.ndarray | None = None,
             ) -> dict[str, float]:
    """Full-catalog metrics (+ coverage@10), and `sampled_*` metrics when asked.

    `rows` restricts the evaluation to a subset of the EvalSet (e.g. cold-item targets).
    """
    return evaluate_ranks(score_fn, data, num_items, batch_size, sampled_negatives, seed,
                          rows)[0]


def evaluate_ranks(score_fn: ScoreFn, data: EvalSet, num_items: int, batch_size: int = 512,
                   sampled_negatives: int = 0, seed: int = 0, rows: np.ndarray | None = None,
                   ) -> tuple[dict[str, float], np.ndarray]:
    """`evaluate`'s metrics and the full-catalog rank of each row's target (in `rows` order),
    from which slices are computed without scoring again."""
    rows = np.arange(len(data.target)) if rows is None else rows
    rng = np.random.default_rng(seed)
    # Keep one score block under ~1 GB however large the catalog is.
    batch_size = max(1, min(batch_size, 250_000_000 // (num_items + 1)))
    ranks, sampled_ranks = [], []
    in_top10 = np.zeros(num_items + 1, bool)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        scores = np.array(score_fn(batch), np.float32, copy=True)  # [batch, num_items + 1]
        targets = data.target[batch]
        seen = [data.seen[i] for i in batch]
        if sampled_negatives:
            sampled_ranks.append(_sampled_ranks(scores, targets, seen, sampled_negatives,
                                                num_items, rng))
        ranks.append(ranks_from_scores(scores, targets, seen))
        top = np.argpartition(-scores, min(10, num_items - 1), axis=1)[:, :10]
        in_top10[top.ravel()] = True
    ranks = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    out = metrics_from_ranks(ranks)
    out["coverage@10"] = float(in_top10[1:].sum() / max(num_items, 1))
    out["users"] = int(len(rows))
    out["ndcg@10_low"], out["ndcg@10_high"] = ndcg_interval(ranks)
    if sampled_negatives:
        out.update(metrics_from_ranks(np.concatenate(sampled_ranks), prefix="sampled_"))
    return out, ranks
