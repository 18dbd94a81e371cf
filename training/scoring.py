"""Full-catalog scoring of a model being trained: per-epoch validation with early stopping on
valid NDCG@10 and the best checkpoint, and the one test evaluation at the end."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from towers.model import TwoTowerModel
from training.cluster import sum_over_workers
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


# valid_users auto: every user while one validation scores at most VALID_SCORES (user, item)
# pairs, else a fixed seeded subset that does, of at least VALID_MIN_USERS users. The dev sets
# (3K-4K users x 3.6K items) stay whole; a 30,000-user x 24,000-item catalog gets 4,166 users.
VALID_SCORES = 100_000_000
VALID_MIN_USERS = 2_000
# valid_every auto: validate every k epochs, k the smallest keeping validation at most this
# share of the time spent training and validating (k <= patience / 2, so early stopping still
# sees at least two validations before it gives up)
VALID_SHARE = 0.2
VALID_MIN_SECONDS = 5.0  # a validation this short is never skipped


def validation_rows(users: int, num_items: int, setting: str,
                    seed: int) -> tuple[np.ndarray | None, str]:
    """The validation rows of `valid_users` (None = all) and why."""
    if setting != "auto":
        size = int(setting)
        return subset(users, size, seed), (f"--valid-users {size}" if size else "all users")
    if users * num_items <= VALID_SCORES:
        return None, f"all {users:,} users ({users:,} x {num_items:,} items <= {VALID_SCORES:,})"
    size = max(VALID_MIN_USERS, VALID_SCORES // max(num_items, 1))
    return subset(users, size, seed), (f"a fixed subset of {min(size, users):,} of {users:,} "
                                       f"users (seed; {users:,} x {num_items:,} items > "
                                       f"{VALID_SCORES:,} scores)")


def validation_interval(setting: str, valid_seconds: float, epoch_seconds: float,
                        patience: int) -> int:
    """Epochs between validations: as configured, or 1 while a validation takes under
    VALID_MIN_SECONDS, else the smallest k with validation at most VALID_SHARE of k epochs
    plus one validation, capped at patience // 2."""
    if setting != "auto":
        return int(setting)
    if valid_seconds < VALID_MIN_SECONDS:
        return 1
    k = math.ceil(valid_seconds * (1 - VALID_SHARE) / (VALID_SHARE * max(epoch_seconds, 1e-9)))
    return int(min(max(k, 1), max(patience // 2, 1)))


class ValidationCallback(tf.keras.callbacks.Callback):
    """Valid NDCG@10 after every `valid_every` epochs (and the last one); keeps the best
    weights, stops on patience (in epochs) or budget.

    Logs the epoch's one line (loss, validation metrics, speed). `scorer` None: a multiworker
    worker other than the chief, which follows the chief's validation."""

    def __init__(self, scorer: UserScorer | None, config: TrainConfig, num_items: int,
                 checkpoint: Path, positions_per_epoch: int, rows: np.ndarray | None):
        super().__init__()
        self.scorer, self.config, self.num_items = scorer, config, num_items
        self.checkpoint, self.positions = checkpoint, positions_per_epoch
        self.rows = rows
        self.best, self.best_epoch, self.wait = -1.0, -1, 0
        self.started = time.time()
        self.epoch_times: list[float] = []
        self.valid_times: list[float] = []
        self.every, self.validated = 1, -1  # interval, last validated epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.time() - self.epoch_start
        self.epoch_times.append(seconds)
        logs = logs if logs is not None else {}
        logs["epoch_seconds"] = seconds
        logs["positions_per_second"] = self.positions / max(seconds, 1e-9)
        budget = self.config.time_budget_minutes * 60
        out_of_time = bool(budget and time.time() - self.started > budget)
        last = out_of_time or epoch + 1 >= self.config.epochs
        metrics, valid_seconds = None, 0.0
        if self.scorer is not None and (last or epoch - self.validated >= self.every):
            began = time.time()
            self.scorer.refresh()
            metrics = evaluate(self.scorer, self.scorer.data, self.num_items,
                               self.config.eval_batch_size, rows=self.rows)
            valid_seconds = time.time() - began
        strategy = self.model.distribute_strategy
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # The chief validates; every worker learns what it found and when it stops, so
            # all save the same best weights and stop at the same epoch (one still training
            # would wait forever for the others in its next all-reduce).
            metrics, valid_seconds, out_of_time = _chief_says(
                strategy, self.scorer is not None, metrics, valid_seconds, out_of_time)
        if metrics is None:
            log.info("epoch %d: loss %.4f  (%.1fs, %s positions/s; validation every %d)",
                     epoch + 1, logs.get("loss", float("nan")), seconds,
                     f"{logs['positions_per_second']:,.0f}", self.every)
            return
        self.valid_times.append(valid_seconds)
        for name in ("hr@10", "ndcg@10", "mrr"):
            logs[f"val_{name}"] = metrics[name]
        log.info("epoch %d: loss %.4f  valid NDCG@10 %.4f  HR@10 %.4f  (%.1fs, %s positions/s; "
                 "validation %.1fs)", epoch + 1, logs.get("loss", float("nan")),
                 metrics["ndcg@10"], metrics["hr@10"], seconds,
                 f"{logs['positions_per_second']:,.0f}", self.valid_times[-1])
        self.wait += epoch - self.validated
        self.validated = epoch
        if metrics["ndcg@10"] > self.best:
            self.best, self.best_epoch, self.wait = metrics["ndcg@10"], epoch, 0
            self.model.save_weights(str(self.checkpoint))
        self.every = validation_interval(self.config.valid_every, self.valid_times[-1],
                                         float(np.median(self.epoch_times)),
                                         self.config.patience)
        if self.wait >= self.config.patience or out_of_time:
            self.model.stop_training = True

    def state(self) -> dict:
        """The bookkeeping a resumed run continues from (training/resume.py)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "every": self.every, "validated": self.validated,
                "epoch_times": self.epoch_times, "valid_times": self.valid_times,
                "elapsed": time.time() - self.started}

    def load_state(self, state: dict) -> None:
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]
        self.every, self.validated = state["every"], state["validated"]
        self.epoch_times, self.valid_times = list(state["epoch_times"]), list(state["valid_times"])
        self.started = time.time() - state["elapsed"]  # the budget counts the time spent

    def summary(self) -> dict:
        """What validation cost and how it was scheduled, for the run's metrics."""
        training, validating = float(sum(self.epoch_times)), float(sum(self.valid_times))
        return {"validations": len(self.valid_times), "valid_every_last": self.every,
                "validation_seconds": round(validating, 1),
                "validation_share": round(validating / max(training + validating, 1e-9), 3)}


METRICS = ("hr@10", "ndcg@10", "mrr")


def _chief_says(strategy: tf.distribute.Strategy, is_chief: bool, metrics: dict | None,
                valid_seconds: float, out_of_time: bool) -> tuple[dict | None, float, bool]:
    """The chief's validation of this epoch (None: it did not validate), its time and its
    clock's verdict, on every worker (the others pass theirs, which are ignored)."""
    values = np.zeros(3 + len(METRICS))
    if is_chief:
        values[:3] = (metrics is not None, valid_seconds, out_of_time)
        if metrics is not None:
            values[3:] = [metrics[name] for name in METRICS]
    shared = sum_over_workers(strategy, values)
    said = {name: float(value) for name, value in zip(METRICS, shared[3:])}
    return (said if shared[0] else None), float(shared[1]), bool(shared[2])


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
