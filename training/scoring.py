"""Full-catalog scoring of a model being trained: per-epoch validation with early stopping on
valid NDCG@10 and the best checkpoint, and the one test evaluation at the end."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from towers.model import TwoTowerModel
from training.config import TrainConfig
from training.evaluate import evaluate, evaluate_ranks, metrics_from_ranks
from training.sequences import EvalSet, Sequences, eval_set
from training.slices import slice_metrics

log = logging.getLogger(__name__)


class UserScorer:
    """Scores every item for a batch of evaluation rows with the current weights."""

    def __init__(self, model: TwoTowerModel, data: EvalSet, use_events: bool):
        self.model, self.data, self.use_events = model, data, use_events

        # Item vectors are an argument, not a captured tensor: a captured one would be frozen
        # at its first-trace value while the weights keep changing.
        @tf.function(reduce_retracing=True)
        def users(history, event_types, items):
            return self.model.user_vector(history, items,
                                          event_types if self.use_events else None)
        self._users = users
        self.refresh()

    def refresh(self) -> None:
        """Recompute item vectors (call after the weights change)."""
        self.items_tf = tf.cast(self.model.all_item_vectors(), tf.float32)
        self.items = self.items_tf.numpy()

    def user_vectors(self, rows: np.ndarray) -> np.ndarray:
        return tf.cast(self._users(self.data.history[rows], self.data.event_types[rows],
                                   self.items_tf), tf.float32).numpy()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return self.user_vectors(rows) @ self.items.T  # [rows, num_items + 1]


def subset(n: int, size: int, seed: int) -> np.ndarray | None:
    """A fixed random subset of `size` of n rows, or None (= all) when size is 0 or >= n."""
    if not size or size >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


class ValidationCallback(tf.keras.callbacks.Callback):
    """Valid NDCG@10 after each epoch; keeps the best weights, stops on patience or budget.

    Logs the epoch's one line (loss, validation metrics, speed)."""

    def __init__(self, scorer: UserScorer, config: TrainConfig, num_items: int,
                 checkpoint: Path, positions_per_epoch: int, rows: np.ndarray | None):
        super().__init__()
        self.scorer, self.config, self.num_items = scorer, config, num_items
        self.checkpoint, self.positions = checkpoint, positions_per_epoch
        self.rows = rows
        self.best, self.best_epoch, self.wait = -1.0, -1, 0
        self.started = time.time()
        self.epoch_times: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.time() - self.epoch_start
        self.epoch_times.append(seconds)
        self.scorer.refresh()
        metrics = evaluate(self.scorer, self.scorer.data, self.num_items,
                           self.config.eval_batch_size, rows=self.rows)
        logs = logs if logs is not None else {}
        for name in ("hr@10", "ndcg@10", "mrr"):
            logs[f"val_{name}"] = metrics[name]
        logs["epoch_seconds"] = seconds
        logs["positions_per_second"] = self.positions / max(seconds, 1e-9)
        log.info("epoch %d: loss %.4f  valid NDCG@10 %.4f  HR@10 %.4f  (%.1fs, %s positions/s)",
                 epoch + 1, logs.get("loss", float("nan")), metrics["ndcg@10"],
                 metrics["hr@10"], seconds, f"{logs['positions_per_second']:,.0f}")
        if metrics["ndcg@10"] > self.best:
            self.best, self.best_epoch, self.wait = metrics["ndcg@10"], epoch, 0
            self.model.save_weights(str(self.checkpoint))
        else:
            self.wait += 1
        budget = self.config.time_budget_minutes * 60
        stop = self.wait >= self.config.patience or (budget and time.time() - self.started > budget)
        if _any_worker(self.model.distribute_strategy, bool(stop)):
            self.model.stop_training = True


def _any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """Whether `flag` is set on any worker of a multi-worker cluster (else: the flag). Workers
    must stop at the same epoch, or the ones still training wait forever for the others in
    their next all-reduce; validation agrees by itself, time budgets need not."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return flag

    def vote():
        return tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.constant(1.0 if flag else 0.0))

    votes = tf.function(lambda: strategy.run(vote))()
    return float(strategy.experimental_local_results(votes)[0]) > 0


def text_knn_scorer(text: np.ndarray, data: EvalSet):
    """The content baseline with no training: every item scored by the cosine of its text
    vector with the user's last input item's (text [num_items + 1, d], row 0 padding)."""
    norms = np.linalg.norm(text, axis=1, keepdims=True)
    unit = (text / np.maximum(norms, 1e-12)).astype(np.float32)
    return lambda rows: unit[data.history[rows, -1]] @ unit.T


def score_test_split(model: TwoTowerModel, seqs: Sequences, config: TrainConfig,
                     counts: np.ndarray, use_events: bool,
                     text: np.ndarray | None = None) -> dict:
    """Test split metrics of the model, the popularity baseline (`counts` per item) and, with
    `text` vectors, the text content baseline: overall, by slice (training/slices.py) and,
    when items were held out, on the cold-item targets."""
    test = eval_set(seqs, "test", config.max_seq_len)
    scorer = UserScorer(model, test, use_events)
    rows = subset(len(test.target), config.test_users, config.seed)
    rows = np.arange(len(test.target)) if rows is None else rows
    common = dict(num_items=seqs.num_items, batch_size=config.eval_batch_size, seed=config.seed,
                  sampled_negatives=config.sampled_negatives, rows=rows)
    popular = lambda batch: np.broadcast_to(counts, (len(batch), len(counts)))  # noqa: E731
    baselines = {"popularity": popular}
    if text is not None:
        baselines["text_knn"] = text_knn_scorer(text, test)
    results, ranks = {}, {}
    results["test"], ranks["model"] = evaluate_ranks(scorer, test, **common)
    for name, score_fn in baselines.items():
        results[f"{name}_test"], ranks[name] = evaluate_ranks(score_fn, test, **common)
    lengths = np.array([len(test.seen[i]) for i in rows])
    results["slices"] = slice_metrics(ranks, test.target[rows], lengths, counts)
    if len(seqs.cold_items):
        cold = np.isin(test.target[rows], seqs.cold_items)
        results["cold_items"] = int(len(seqs.cold_items))
        scorers = {"model": scorer, **baselines}
        for name, key in (("model", "cold_test"), ("popularity", "cold_popularity_test"),
                          ("text_knn", "cold_text_knn_test")):
            if name in ranks:
                results[key] = {**metrics_from_ranks(ranks[name][cold]),
                                "users": int(cold.sum())}
            if name != "popularity" and name in scorers:
                # The "new arrivals" shelf: cold targets ranked among cold items only. Near
                # the baseline here and far below it in the full catalog means the cold
                # items' scores sit too low (calibration), not that their vectors are bad.
                results[f"{key}_among_cold"] = evaluate(
                    among(scorers[name], seqs.cold_items, seqs.num_items), test,
                    **{**common, "rows": rows[cold], "sampled_negatives": 0})
        results["score_calibration"] = score_calibration(
            scorer, test, rows, seqs.cold_items, seqs.num_items, config.seed)
    return results


def among(score_fn, items: np.ndarray, num_items: int):
    """`score_fn` with every item outside `items` scored -inf (never ranked above a target)."""
    outside = np.ones(num_items + 1, bool)
    outside[items] = False

    def scores(batch: np.ndarray) -> np.ndarray:
        out = np.array(score_fn(batch), np.float32, copy=True)
        out[:, outside] = -np.inf
        return out
    return scores


CALIBRATION_USERS = 2000


def score_calibration(scorer: UserScorer, test: EvalSet, rows: np.ndarray,
                      cold_items: np.ndarray, num_items: int, seed: int) -> dict:
    """Where cold and warm items' scores sit for the same users (up to CALIBRATION_USERS test
    rows): per user, the top-10 scores among warm items and among cold items (seen items
    excluded), pooled; mean, 90th and 99th percentile of each, and the share of cold items in
    the users' full-catalog top 10."""
    sample = np.random.default_rng(seed).permutation(rows)[:CALIBRATION_USERS]
    is_cold = np.zeros(num_items + 1, bool)
    is_cold[cold_items] = True
    is_warm = ~is_cold
    is_warm[0] = False  # padding
    tops: dict[str, list] = {"warm": [], "cold": []}
    cold_in_top = []
    for start in range(0, len(sample), 256):
        batch = sample[start:start + 256]
        scores = np.array(scorer(batch), np.float32, copy=True)  # [batch, num_items + 1]
        scores[:, 0] = -np.inf
        for row, i in enumerate(batch):
            scores[row, test.seen[i]] = -np.inf
        for name, columns in (("warm", is_warm), ("cold", is_cold)):
            part = scores[:, columns]
            n = min(10, part.shape[1])
            if n:
                tops[name].append(-np.partition(-part, n - 1, axis=1)[:, :n])
        top10 = np.argpartition(-scores, min(10, num_items) - 1, axis=1)[:, :10]
        cold_in_top.append(is_cold[top10].mean(axis=1))
    out: dict = {"users": int(len(sample))}
    for name, blocks in tops.items():
        values = np.concatenate(blocks).ravel() if blocks else np.zeros(0)
        values = values[np.isfinite(values)]
        out[f"{name}_top10"] = ({"mean": float(values.mean()),
                                 "p90": float(np.percentile(values, 90)),
                                 "p99": float(np.percentile(values, 99))}
                                if len(values) else None)
    out["cold_share_of_top10"] = (float(np.concatenate(cold_in_top).mean()) if cold_in_top
                                  else 0.0)
    return out
