"""The ScaNN index inside the exported retrieval model: built once over the item vectors, then
tuned for speed at the recall target.

The tree (k-means over `num_leaves` partitions) is trained once. How many leaves a query
searches and how many candidates are re-scored exactly are search-time settings, so tuning
needs no rebuild: for each leaves-to-search value (ascending) the smallest re-score count that
reaches recall@10 >= target on real queries is found (from the previous value's answer, down or
up a doubling ladder), its single-query latency measured, and the fastest point that reaches
the target wins. Every measured point is kept as the curve in metadata.json.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

MIN_RECALL = 0.95
MAX_REORDER = 8192
LEAF_FRACTIONS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)


@dataclass
class ScannParams:
    num_leaves: int
    leaves_to_search: int
    reorder: int  # candidates re-scored exactly (at least the number fetched)

    @classmethod
    def for_catalog(cls, num_items: int, fetch: int, num_leaves: int = 0,
                    leaves_to_search: int = 0, reorder: int = 0) -> ScannParams:
        """Starting values from the catalog size (about sqrt(N) leaves, 10% searched, every
        fetched candidate re-scored) for the settings given as 0."""
        leaves = num_leaves or int(min(max(round(math.sqrt(num_items)), 2), 4000))
        leaves = min(leaves, max(num_items // 2, 1))
        search = leaves_to_search or max(leaves // 10, min(leaves, 8))
        reorder = reorder or max(fetch, 250)
        return cls(leaves, min(search, leaves), reorder)


class ScannIndex(tf.Module):
    """A serialized ScaNN searcher over items 1..N (saved in the SavedModel, needs scann's ops)
    with the search settings the tuning picked."""

    def __init__(self, item_vectors: np.ndarray, max_neighbors: int, params: ScannParams,
                 dimensions_per_block: int = 2, training_iterations: int = 12):
        super().__init__()
        from scann.scann_ops.py import scann_ops

        db = tf.constant(item_vectors[1:], tf.float32)  # row 0 is padding
        builder = scann_ops.builder(db, max_neighbors, "dot_product")
        builder = builder.tree(num_leaves=params.num_leaves,
                               num_leaves_to_search=params.leaves_to_search,
                               training_iterations=training_iterations)
        builder = builder.score_ah(dimensions_per_block=dimensions_per_block)
        builder = builder.reorder(max(params.reorder, max_neighbors))
        self.state = builder.build(shared_name=f"towerrec-scann/{uuid.uuid4()}"
                                   ).serialize_to_module()
        self.num_leaves = params.num_leaves
        self.leaves_to_search, self.reorder = params.leaves_to_search, params.reorder

    def search(self, queries: tf.Tensor, k, leaves=None, reorder=None):
        """Top-k (scores [batch, k], item_idx [batch, k]) with the given search settings (the
        tuned ones by default); at least k candidates are re-scored."""
        from scann.scann_ops.py import scann_ops

        leaves = self.leaves_to_search if leaves is None else leaves
        reorder = self.reorder if reorder is None else reorder
        searcher = scann_ops.searcher_from_module(self.state)
        result = searcher.search_batched(queries, final_num_neighbors=k,
                                         pre_reorder_num_neighbors=tf.maximum(reorder, k),
                                         leaves_to_search=leaves)
        return result.distances, result.indices + 1

    def __call__(self, queries: tf.Tensor, k):
        return self.search(queries, k)

    @property
    def params(self) -> ScannParams:
        return ScannParams(self.num_leaves, self.leaves_to_search, self.reorder)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean share of the exact top-k found in the approximate top-k."""
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) / k
            for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits)) if hits else 1.0


def exact_top(user_vectors: np.ndarray, item_vectors: np.ndarray,
              histories: list[np.ndarray], k: int = 10) -> np.ndarray:
    """Exact top-k item_idx per query, padding and history items excluded."""
    out = []
    for start in range(0, len(user_vectors), 256):
        scores = user_vectors[start:start + 256] @ item_vectors.T  # [b, items + 1]
        scores[:, 0] = -np.inf
        for row, seen in enumerate(histories[start:start + 256]):
            scores[row, seen] = -np.inf
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.take_along_axis(scores, top, 1).argsort(axis=1)[:, ::-1]
        out.append(np.take_along_axis(top, order, 1))
    return np.concatenate(out)


class Tuner:
    """Measures recall@10 and single-query latency of an index at given search settings, for
    queries that exclude their own history (the fetch grows with it, as in serving)."""

    def __init__(self, index: ScannIndex, user_vectors: np.ndarray, histories: list[np.ndarray],
                 exact: np.ndarray, k: int, max_fetch: int, latency_queries: int = 100):
        self.index, self.k, self.max_fetch = index, k, max_fetch
        order = np.argsort([len(h) for h in histories], kind="stable")  # similar fetch per chunk
        self.users = user_vectors[order].astype(np.float32)
        self.histories = [histories[i] for i in order]
        self.exact = exact[order]
        self.latency_rows = np.random.default_rng(0).permutation(len(order))[:latency_queries]
        self.curve: list[dict] = []
        self._recall: dict[tuple[int, int], float] = {}

    def fetch(self, rows: np.ndarray) -> int:
        return min(self.k + max((len(self.histories[i]) for i in rows), default=0),
                   self.max_fetch)

    def recall(self, leaves: int, reorder: int) -> float:
        """recall@10 at these settings; each new point also gets its latency measured and
        joins the curve."""
        if (leaves, reorder) not in self._recall:
            found = []
            for start in range(0, len(self.users), 64):
                rows = np.arange(start, min(start + 64, len(self.users)))
                _, ids = self.index.search(self.users[rows], self.fetch(rows), leaves, reorder)
                for row, candidates in zip(rows, ids.numpy()):
                    keep = candidates[~np.isin(candidates, self.histories[row])]
                    found.append(keep[:10])
            recall = recall_at_k(found, self.exact)
            self._recall[(leaves, reorder)] = recall
            self.curve.append({"leaves_to_search": leaves, "reorder": reorder,
                               "recall@10": round(recall, 4),
                               "ms_per_query": round(self.latency_ms(leaves, reorder), 4)})
            # One line per tried point with -v; the curve is in the report.
            log.debug("ScaNN leaves %d / reorder %d: recall@10 %.4f, %.3f ms per query", leaves,
                     reorder, recall, self.curve[-1]["ms_per_query"])
        return self._recall[(leaves, reorder)]

    def latency_ms(self, leaves: int, reorder: int) -> float:
        """Median single-query search time (one warm-up query first)."""
        times = []
        for row in np.concatenate([self.latency_rows[:1], self.latency_rows]):
            query, fetch = self.users[row:row + 1], self.fetch([row])
            start = time.perf_counter()
            self.index.search(query, fetch, leaves, reorder)[1].numpy()
            times.append(time.perf_counter() - start)
        return 1000 * float(np.median(times[1:]))

    def point(self, leaves: int, reorder: int) -> dict:
        self.recall(leaves, reorder)
        return next(e for e in self.curve
                    if (e["leaves_to_search"], e["reorder"]) == (leaves, reorder))


def tune(tuner: Tuner, params: ScannParams, fixed_leaves: int = 0, fixed_reorder: int = 0,
         target: float = MIN_RECALL) -> tuple[ScannParams, float, list[dict]]:
    """The fastest (leaves_to_search, reorder) reaching `target` recall@10; settings given as
    non-zero stay fixed. Returns (params, recall, curve of measured points)."""
    leaves_ladder = ([fixed_leaves] if fixed_leaves else sorted(
        {min(params.num_leaves, max(1, round(f * params.num_leaves))) for f in LEAF_FRACTIONS}))
    reorders, r = [], tuner.k
    while r < MAX_REORDER:
        reorders.append(r)
        r *= 2
    reorders = [fixed_reorder] if fixed_reorder else reorders + [MAX_REORDER]
    best: dict | None = None
    i = 0
    for leaves in leaves_ladder:
        def ok(j: int, leaves: int = leaves) -> bool:
            return tuner.recall(leaves, reorders[j]) >= target

        if ok(i):
            while i > 0 and ok(i - 1):
                i -= 1
        else:
            while i < len(reorders) - 1 and not ok(i):
                i += 1
                gain = (tuner.recall(leaves, reorders[i])
                        - tuner.recall(leaves, reorders[i - 1]))
                if gain < 0.001 and not ok(i):  # re-scoring more cannot fix too few leaves
                    break
            if not ok(i):
                i = 0
                continue
        entry = tuner.point(leaves, reorders[i])
        if best is None or entry["ms_per_query"] < best["ms_per_query"]:
            best = entry
        elif entry["ms_per_query"] > 1.5 * best["ms_per_query"]:
            break  # searching more leaves only gets slower from here
    if best is None:  # the target is out of reach: the most accurate setting measured
        leaves, reorder = max(tuner._recall, key=tuner._recall.get)
        best = tuner.point(leaves, reorder)
        log.warning("ScaNN cannot reach recall@10 %.2f; using leaves %d / reorder %d (%.4f)",
                    target, leaves, reorder, best["recall@10"])
    chosen = ScannParams(params.num_leaves, best["leaves_to_search"], best["reorder"])
    return chosen, best["recall@10"], sorted(
        tuner.curve, key=lambda e: (e["leaves_to_search"], e["reorder"]))
