"""What a run trains on: prepared data -> sequences, training windows, item features and the
model spec; and the tables it leaves in the run directory for export and serving."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recdata import load_processed
from recdata.io import load_events_shard, read_manifest
from recdata.schema import DataError
from towers import run_dir as run_files
from towers.spec import ModelSpec
from training.cluster import ClusterTask, from_chief, sum_over_workers
from training.config import TrainConfig
from training.features import ItemFeatures, item_features
from training.sequences import Sequences, build_sequences, training_arrays
from training.shard_input import (
    WindowShards,
    WorkerWindows,
    check_worker_count,
    write_window_shards,
)

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    items: pd.DataFrame  # items.parquet of the prepared data
    manifest: dict
    seqs: Sequences
    features: ItemFeatures
    # training_arrays: left-padded windows and their targets; None when they are in files
    # for parameter-server workers (window_shards)
    windows: dict[str, np.ndarray] | None
    window_shards: WindowShards | None = None
    # a multiworker worker's own windows, with the whole data's totals (multiworker_data)
    worker_windows: WorkerWindows | None = None

    @property
    def _totals(self) -> WindowShards | WorkerWindows | None:
        return self.window_shards or self.worker_windows

    @property
    def training_input(self) -> dict[str, np.ndarray] | WindowShards | WorkerWindows:
        """What `fit` trains on: window files, this worker's windows, or all windows."""
        return self._totals or self.windows

    @property
    def window_count(self) -> int:
        if self._totals is not None:
            return self._totals.windows
        return len(self.windows["targets"])

    @property
    def train_counts(self) -> np.ndarray:
        """Training interactions per item_idx [num_items + 1] (cold items held out: 0), of the
        whole data (a multiworker worker's `seqs` hold only its shards; the chief's counts)."""
        return self.features.train_counts

    @property
    def popularity(self) -> np.ndarray:
        """Each item's share of training interactions, the in-batch sampling distribution."""
        counts = self.train_counts.astype(np.float64)
        return counts / max(counts.sum(), 1.0)

    @property
    def positions(self) -> int:
        """Next-item targets per epoch."""
        if self._totals is not None:
            return self._totals.positions
        return int((self.windows["targets"] > 0).sum())

    @property
    def purchase_positions(self) -> float:
        """Targets that are purchases (the ranking task's positives)."""
        if self._totals is not None:
            return self._totals.purchases
        return float(self.windows["target_purchase"][self.windows["targets"] > 0].sum())

    def mean_batch_positions(self, batch_size: int) -> float:
        return self.positions / math.ceil(self.window_count / batch_size)

    def positions_per_batch(self, config: TrainConfig) -> float:
        """Mean positions per batch, the loss weight of length-bucketed batches (0 = off)."""
        if config.bucket_batches <= 1:
            return 0.0
        return self.mean_batch_positions(config.batch_size)


def load_training_data(config: TrainConfig, data_dir: str | Path,
                       window_dir: Path | None = None) -> TrainingData:
    """Load a prepared data directory and build everything training needs but the model.

    With `window_dir` (a parameter-server chief) and sharded data, the training windows go to
    one file per shard there (training/shard_input.py) instead of memory."""
    items, events, manifest = load_processed(data_dir)
    seqs = build_sequences(events, len(items), config.cold_items, config.seed)
    features = item_features(items, seqs.train_counts(), config)
    windows, shards = None, None
    if window_dir is not None and "shards" in manifest:
        shards = write_window_shards(Path(data_dir), manifest, seqs, config.max_seq_len,
                                     config.train_windows, config.seed, config.cold_items,
                                     window_dir)
        count = shards.windows
    else:
        windows = training_arrays(seqs, config.max_seq_len, config.train_windows)
        count = len(windows["history"])
    if count == 0:
        raise ValueError(f"{data_dir}: no user has two training events; nothing to train on")
    return TrainingData(items, manifest, seqs, features, windows, shards)


def multiworker_data(config: TrainConfig, data_dir: str | Path, task: ClusterTask, strategy,
                     on_gpu: bool) -> tuple[TrainingData, ModelSpec, str]:
    """A MultiWorkerMirroredStrategy task's data, model spec and why its retrieval softmax.

    Unsharded data: every worker loads it all and derives the same choices. Sharded data
    (prepare_data.py --shards N, N >= workers): every worker, the chief too, trains on the
    windows of its own shards (rank, rank + workers, ...; a shard is a range of users); the
    chief alone loads the whole data (validation, test, the run's tables) and shares what the
    others need of it (the model spec, the event-type vocabulary, the training counts and the
    window totals). The other workers read the item table and their own shards, nothing else.
    """
    manifest = read_manifest(Path(data_dir))
    if "shards" not in manifest:
        data = load_training_data(config, data_dir)
        retrieval = retrieval_mode(config, data, on_gpu)
        return data, model_spec(config, data, retrieval.mode), retrieval.reason
    rank, workers = task.training_rank, task.training_workers
    check_worker_count(len(manifest["shards"]), workers)
    own = list(range(rank, len(manifest["shards"]), workers))
    shared, counts, failure = None, None, None
    try:  # the chief and the others load different things: one may fail where the rest do not
        if task.is_chief:
            data = load_training_data(config, data_dir)
            retrieval = retrieval_mode(config, data, on_gpu)
            spec = model_spec(config, data, retrieval.mode)
            shared = {"spec": spec.to_dict(), "reason": retrieval.reason,
                      "windows": data.window_count, "positions": data.positions,
                      "purchases": data.purchase_positions, "event_vocab": data.seqs.event_vocab,
                      "any_purchase": data.seqs.any_purchase}
            counts = data.train_counts
            data.windows = None  # the chief trains on its own shards' windows too
            # (load_processed has just checked every shard against the manifest)
            events = pd.concat([load_events_shard(Path(data_dir) / manifest["shards"][k]["file"])
                                for k in own], ignore_index=True)
            items = data.items
        else:
            items, events, manifest = load_processed(data_dir, shards=own)
            features = item_features(items, np.zeros(len(items) + 1, np.int64), config)
    except (ValueError, OSError, DataError) as err:
        failure = err
    _fail_together(strategy, failure, "could not load its data")
    shared, counts = from_chief(strategy, task.is_chief, shared, counts, rows=len(items) + 1)
    seqs = build_sequences(events, len(items), config.cold_items, config.seed,
                           event_vocab=shared["event_vocab"], any_purchase=shared["any_purchase"])
    windows = training_arrays(seqs, config.max_seq_len, config.train_windows)
    spec = ModelSpec(**shared["spec"])
    if not len(windows["history"]):
        failure = ValueError(f"task {rank} has no training window in its shards; prepare the "
                             f"data with fewer --shards (>= {workers}) or more users")
    elif not task.is_chief and (features.text_dim, features.text_tokens) != (
            spec.text_dim, spec.text_tokens):
        failure = ValueError(f"task {rank}'s text encoder ({features.text_source}) differs from "
                             f"the chief's ({spec.text_source}): give every host the same model")
    _fail_together(strategy, failure, "refused its share of the data")
    sizes = np.zeros(workers, np.int64)
    sizes[rank] = len(windows["history"])
    sizes = sum_over_workers(strategy, sizes)
    if sizes.max() > 1.1 * sizes.min():
        log.warning("training windows per task: %s. Each task draws the same number a step, so "
                    "a window of a larger share is seen less often; shards spread evenly over "
                    "the tasks (--shards a multiple of %d) weigh every window the same",
                    ", ".join(f"{n:,}" for n in sizes), workers)
    names = [manifest["shards"][k]["file"] for k in own]
    mine = WorkerWindows(windows, rank, names, shared["windows"],
                         shared["positions"], shared["purchases"])
    if task.is_chief:
        data.worker_windows = mine
    else:
        features.train_counts = counts.astype(np.int64)
        data = TrainingData(items, manifest, seqs, features, None, worker_windows=mine)
    return data, spec, shared["reason"]


def _fail_together(strategy, failure: Exception | None, what: str) -> None:
    """Raise on every task of a multiworker cluster when any has `failure` (its own error
    there, a pointer to the others' logs elsewhere): one task left waiting in an all-reduce for
    a task that stopped would hang, or die later with an unrelated message."""
    failed = int(sum_over_workers(strategy, np.array([failure is not None], np.int64))[0])
    if failure is not None:
        raise failure
    if failed:
        raise ValueError(f"{failed} other task(s) of the cluster {what}: see their output")


def ranking_mode(config: TrainConfig, seqs: Sequences) -> str:
    """The one place the ranking task is chosen: none without weight, else from the data."""
    if config.ranking_weight <= 0 or config.ranking_target == "none":
        return "none"
    if config.ranking_target != "auto":
        return config.ranking_target
    return "rating" if seqs.event_vocab == ["rating"] else "purchase"


# `--negatives auto` on a CPU: the sampled softmax where its pool of columns (the batch's
# distinct targets + the uniform negatives) is at most this share of the catalog. A step's
# retrieval cost follows the columns scored at every position, so below it the sampled step
# is markedly cheaper; above it the two cost about the same and the full softmax is exact
# (bench/bench_negatives.py measures both over catalog sizes; docs/benchmarks.md "Training speed").
SAMPLED_POOL_SHARE = 0.5


def expected_pool(popularity: np.ndarray, positions: float, negatives: int) -> float:
    """Expected distinct items in a sampled-softmax pool: `positions` targets drawn by
    `popularity` ([num_items + 1], row 0 padding) and `negatives` uniform draws."""
    share = popularity[1:]
    absent = (1.0 - share) ** positions * (1.0 - 1.0 / max(len(share), 1)) ** negatives
    return float((1.0 - absent).sum())


@dataclass(frozen=True)
class RetrievalChoice:
    mode: str  # full | sampled
    reason: str


def retrieval_mode(config: TrainConfig, data: TrainingData, on_gpu: bool) -> RetrievalChoice:
    """The retrieval softmax: as configured, or `auto`: sampled with a fine-tuned encoder or
    above `full_softmax_max_items`; on a CPU also where the expected pool is at most
    SAMPLED_POOL_SHARE of the catalog; else full."""
    num_items = data.seqs.num_items
    if config.negatives != "auto":
        return RetrievalChoice(config.negatives, f"--negatives {config.negatives}")
    if config.text_mode == "finetune":
        return RetrievalChoice("sampled", "a fine-tuned text encoder cannot run over the "
                               "whole catalog every step")
    if num_items > config.full_softmax_max_items:
        return RetrievalChoice("sampled", f"{num_items:,} items > full_softmax_max_items "
                               f"{config.full_softmax_max_items:,}")
    if on_gpu:
        return RetrievalChoice("full", f"GPU, {num_items:,} items <= full_softmax_max_items")
    pool = expected_pool(data.popularity, data.mean_batch_positions(config.batch_size),
                         config.num_negatives)
    share = pool / max(num_items, 1)
    mode = "sampled" if share <= SAMPLED_POOL_SHARE else "full"
    return RetrievalChoice(mode, f"CPU: a sampled pool would hold ~{pool:,.0f} of "
                           f"{num_items:,} items ({share:.0%}; sampled at <= "
                           f"{SAMPLED_POOL_SHARE:.0%})")


AUTO_ID_DROPOUT = 0.3
COLD_SHARE_FOR_ID_DROPOUT = 0.01


def has_never_trained_items(data: TrainingData) -> bool:
    """Whether at least COLD_SHARE_FOR_ID_DROPOUT of the catalog has no training interaction:
    where id dropout and the content term turn on by themselves (`auto`)."""
    never_trained = float((data.train_counts[1:] == 0).mean()) if data.seqs.num_items else 0.0
    return never_trained >= COLD_SHARE_FOR_ID_DROPOUT


def id_dropout(config: TrainConfig, data: TrainingData) -> float:
    """The id-dropout share: as configured, or `auto`. Dropping id embeddings trains the text +
    metadata path to stand alone, which is what items without training interactions get; it
    costs warm-item accuracy where text predicts little (docs/results.md: ml-1m -8%, online-retail
    cold items 0 -> 0.076 NDCG@10), so `auto` turns it on only when the catalog has such items
    (>= 1% of it) and there is text or metadata to stand on."""
    if not (data.features.text_dim or data.features.meta_sizes):
        return 0.0
    if config.id_dropout != "auto":
        return float(config.id_dropout)
    return AUTO_ID_DROPOUT if has_never_trained_items(data) else 0.0


def content_term(config: TrainConfig, data: TrainingData) -> bool:
    """Whether the model scores with the content term (towers/item_tower.py ContentWeight):
    `on` with frozen text vectors, or `auto`: on when, in addition, at least
    COLD_SHARE_FOR_ID_DROPOUT of the catalog has no training interaction. The term's item side
    (the text weight and bias of items known only by text) is trained by id dropout, which
    `auto` turns on at the same share; on a catalog whose items all have history it left test
    NDCG@10 where it was (ml-1m 0.1515 vs 0.1518) and cost 2.5-3x the training time (docs/results.md
    "The content term")."""
    if data.features.text is None or config.content_term == "off":
        return False
    if config.content_term == "on":
        return True
    return has_never_trained_items(data)


# Dropout of the user tower by data sparsity, as SASRec's authors chose it (0.2 on MovieLens-1M,
# 0.5 on the sparse Amazon and Steam sets): a user with few training events gives the sequence
# model little to fit, and it overfits sooner (docs/results.md "Sparse data").
DENSE_DROPOUT, SPARSE_DROPOUT = 0.2, 0.5
SPARSE_EVENTS_PER_USER = 50


def dropout_rate(config: TrainConfig, data: TrainingData) -> float:
    """The user tower's dropout: as configured, or `auto`: SPARSE_DROPOUT when users have
    fewer than SPARSE_EVENTS_PER_USER training events on average, else DENSE_DROPOUT."""
    if str(config.dropout) != "auto":
        return float(config.dropout)
    users = max(len(data.seqs.user_ids), 1)
    per_user = len(data.seqs.items) / users
    return SPARSE_DROPOUT if per_user < SPARSE_EVENTS_PER_USER else DENSE_DROPOUT


def model_spec(config: TrainConfig, data: TrainingData, retrieval: str) -> ModelSpec:
    """The model's shape and its data-derived choices; `retrieval` the softmax mode
    (retrieval_mode's choice)."""
    seqs, features = data.seqs, data.features
    mode = ranking_mode(config, seqs)
    pos_weight = 1.0
    if mode == "purchase":
        # One sampled negative per observed next item, plus observed non-purchases.
        positives = max(data.purchase_positions, 1.0)
        pos_weight = max(1.0, (2 * data.positions - positives) / positives)
    # Requests without event types are taken to be the most common training event.
    default_event = int(np.argmax(np.bincount(seqs.event_types))) if len(seqs.items) else 0
    return ModelSpec(
        num_items=seqs.num_items, num_event_types=seqs.num_event_types,
        event_vocab=seqs.event_vocab, default_event=default_event,
        text_dim=features.text_dim, text_tokens=features.text_tokens,
        text_source=features.text_source, meta_sizes=features.meta_sizes,
        ranking_mode=mode, retrieval_mode=retrieval,
        purchase_pos_weight=pos_weight, user_tower=config.user_tower, dim=config.dim,
        max_seq_len=config.max_seq_len, num_blocks=config.num_blocks,
        num_heads=config.num_heads, dropout=dropout_rate(config, data),
        gru_layers=config.gru_layers,
        sasrec_layout=config.sasrec_layout, user_projection=config.user_projection,
        num_negatives=config.num_negatives, logq_correction=config.logq_correction,
        retrieval_weight=config.retrieval_weight, ranking_weight=config.ranking_weight,
        text_pooling=config.text_pooling, finetune_layers=config.finetune_layers,
        id_dropout=id_dropout(config, data),
        text_experts=config.text_experts if features.text_dim else 0,
        unseen_negatives=config.unseen_negatives,
        content_term=content_term(config, data),
        content_beta=config.content_beta, id_max_norm=config.id_max_norm)


def user_histories(seqs: Sequences, items: pd.DataFrame) -> pd.DataFrame:
    """Every user's known events in time order (train, then valid, then test) as raw ids."""
    ids = np.concatenate([[""], items["item_id"].astype(str).to_numpy()])
    kinds = np.array([""] + list(seqs.event_vocab), dtype=object)
    rows = []
    for u, user in enumerate(seqs.user_ids):
        a, b = seqs.offsets[u], seqs.offsets[u + 1]
        hist, ev = list(seqs.items[a:b]), list(seqs.event_types[a:b])
        for item, kind in ((seqs.valid_item[u], seqs.valid_event[u]),
                           (seqs.test_item[u], seqs.test_event[u])):
            if item:
                hist.append(item)
                ev.append(kind)
        rows.append((str(user), ids[hist].tolist(), kinds[ev].tolist()))
    return pd.DataFrame(rows, columns=["user_id", "history", "event_types"])


def write_run_tables(run_dir: Path, data: TrainingData) -> None:
    """The data-derived files that make the run directory self-sufficient: the item table
    (with the training counts the model saw), the users' histories and the data manifest."""
    items = data.items.copy()
    items["train_count"] = data.train_counts[1:].astype(np.int64)
    items.to_parquet(run_dir / run_files.ITEMS, index=False)
    user_histories(data.seqs, data.items).to_parquet(run_dir / run_files.USER_HISTORIES,
                                                      index=False)
    (run_dir / run_files.DATA_MANIFEST).write_text(json.dumps(data.manifest, indent=2))
