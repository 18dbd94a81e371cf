"""Training run: data -> towers -> fit with per-epoch validation (early stopping on valid
NDCG@10) -> one test evaluation -> run directory with everything needed to export."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from recdata import load_processed
from towers.item_tower import ItemTower
from towers.model import TwoTowerModel
from towers.tasks import NextItemRetrieval
from towers.user_tower import UserTower
from training.config import TrainConfig
from training.evaluate import evaluate
from training.features import ItemFeatures, item_features
from training.sequences import EvalSet, Sequences, build_sequences, eval_set, training_arrays

log = logging.getLogger(__name__)

SPEC_FILE = "model_spec.json"
RUN_FILE = "run.json"  # where the data came from and where exports go
CHECKPOINT = "checkpoints/best"


@dataclass
class ModelSpec:
    """Sizes fixed by the data, needed (with the config) to rebuild the model for export."""

    num_items: int
    num_event_types: int
    text_dim: int
    text_tokens: int
    meta_sizes: dict
    ranking_mode: str
    retrieval_mode: str
    purchase_pos_weight: float
    event_vocab: list
    text_source: str


def build_model(config: TrainConfig, spec: ModelSpec) -> TwoTowerModel:
    item_tower = ItemTower(spec.num_items, config.dim, text_dim=spec.text_dim,
                           num_categories=spec.meta_sizes.get("category", 0),
                           num_brands=spec.meta_sizes.get("brand", 0),
                           num_price_buckets=spec.meta_sizes.get("price_bucket", 0),
                           text_tokens=spec.text_tokens, name="item_tower")
    user_tower = UserTower(config.user_tower, config.dim, config.max_seq_len,
                           num_blocks=config.num_blocks, num_heads=config.num_heads,
                           dropout=config.dropout, gru_layers=config.gru_layers,
                           num_event_types=spec.num_event_types,
                           layout=config.sasrec_layout, projection=config.user_projection,
                           name="user_tower")
    retrieval = NextItemRetrieval(spec.num_items, spec.retrieval_mode, config.num_negatives,
                                  config.logq_correction, name="retrieval")
    return TwoTowerModel(item_tower, user_tower, retrieval, spec.ranking_mode,
                         config.retrieval_weight, config.ranking_weight,
                         spec.purchase_pos_weight)


def ranking_mode(config: TrainConfig, seqs: Sequences) -> str:
    if config.ranking_weight <= 0 or config.ranking_target == "none":
        return "none"
    if config.ranking_target != "auto":
        return config.ranking_target
    return "rating" if seqs.event_vocab == ["rating"] else "purchase"


def retrieval_mode(config: TrainConfig, num_items: int) -> str:
    if config.negatives != "auto":
        return config.negatives
    if config.text_mode == "finetune" or num_items > config.full_softmax_max_items:
        return "sampled"
    return "full"


def make_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """MirroredStrategy over every visible GPU (or as asked); the default strategy otherwise.

    Mixed precision is switched on with GPUs (float16 compute, float32 variables).
    """
    gpus = tf.config.list_physical_devices("GPU")
    if config.mixed_precision == "on" or (config.mixed_precision == "auto" and gpus):
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
    else:
        tf.keras.mixed_precision.set_global_policy("float32")
    if config.distribute == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if config.distribute == "mirrored" or (config.distribute == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


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


class ValidationCallback(tf.keras.callbacks.Callback):
    """Valid NDCG@10 after each epoch; keeps the best weights, stops on patience or budget."""

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
        print(f"epoch {epoch + 1}: valid ndcg@10 {metrics['ndcg@10']:.4f} "
              f"hr@10 {metrics['hr@10']:.4f} ({seconds:.1f}s, "
              f"{logs['positions_per_second']:,.0f} positions/s)", flush=True)
        if metrics["ndcg@10"] > self.best:
            self.best, self.best_epoch, self.wait = metrics["ndcg@10"], epoch, 0
            self.model.save_weights(str(self.checkpoint))
        else:
            self.wait += 1
        budget = self.config.time_budget_minutes * 60
        if self.wait >= self.config.patience or (budget and time.time() - self.started > budget):
            self.model.stop_training = True


def training_dataset(arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                     use_events: bool, bucket_batches: int = 32) -> tf.data.Dataset:
    """Shuffled batches of left-padded windows, cut to the longest window in each batch.

    Sequences are shuffled, then sorted by length inside groups of `bucket_batches` batches,
    so a batch holds windows of similar length and the all-padding columns on its left can be
    dropped (exact: positions count from the newest item). Saves most of the attention cost
    on data sets whose users are mostly shorter than max_seq_len. Reshuffled every epoch.
    """
    names = ["history", "targets", "target_values", "target_purchase"]
    if use_events:
        names.append("event_types")
    lengths = (arrays["history"] > 0).sum(axis=1)
    rng = np.random.default_rng(seed)
    group = batch_size * max(bucket_batches, 1)  # 0 or 1: plain shuffled batches

    def batches():
        order = rng.permutation(len(lengths))
        chunks = []
        for start in range(0, len(order), group):
            part = order[start:start + group]
            part = part[np.argsort(lengths[part], kind="stable")]
            chunks += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
        for b in rng.permutation(len(chunks)):
            rows = np.sort(chunks[b])
            width = max(int(lengths[rows].max()), 1)
            yield {name: arrays[name][rows, -width:] for name in names}

    signature = {name: tf.TensorSpec([None, None], arrays[name].dtype) for name in names}
    return tf.data.Dataset.from_generator(batches, output_signature=signature).prefetch(2)


def subset(n: int, size: int, seed: int) -> np.ndarray | None:
    """A fixed random subset of `size` of n rows, or None (= all) when size is 0 or >= n."""
    if not size or size >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _device() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    return f"{len(gpus)} GPU(s)" if gpus else f"CPU ({os.cpu_count()} cores)"


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("tensorflow", "tf-keras", "tensorflow-recommenders", "scann", "transformers",
                 "numpy", "pandas"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_curves(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(history["epoch"] + 1, history["loss"], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    right.plot(history["epoch"] + 1, history["val_ndcg@10"], marker="o", label="NDCG@10")
    right.plot(history["epoch"] + 1, history["val_hr@10"], marker="o", label="HR@10")
    right.set(xlabel="epoch", title="validation (full catalog)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prepare(config: TrainConfig, data_dir: str | Path, text_source: str | None = None):
    """Load prepared data and build sequences and item features (no TensorFlow model yet)."""
    items, events, manifest = load_processed(data_dir)
    num_items = len(items)
    seqs = build_sequences(events, num_items, config.cold_items, config.seed)
    features = item_features(items, seqs.train_counts(), config, text_source)
    return items, manifest, seqs, features


def model_spec(config: TrainConfig, seqs: Sequences, features: ItemFeatures,
               train: dict[str, np.ndarray]) -> ModelSpec:
    mode = ranking_mode(config, seqs)
    pos_weight = 1.0
    if mode == "purchase":
        # One sampled negative per observed next item, plus observed non-purchases.
        labels = train["target_purchase"][train["targets"] > 0]
        positives = max(float(labels.sum()), 1.0)
        pos_weight = max(1.0, (2 * len(labels) - positives) / positives)
    return ModelSpec(
        num_items=seqs.num_items, num_event_types=seqs.num_event_types,
        text_dim=(int(features.text.shape[1]) if features.text is not None
                  else features.encoder.hidden_size if features.tokens is not None else 0),
        text_tokens=0 if features.tokens is None else int(features.tokens.shape[1]),
        meta_sizes=features.meta_sizes, ranking_mode=mode,
        retrieval_mode=retrieval_mode(config, seqs.num_items), purchase_pos_weight=pos_weight,
        event_vocab=seqs.event_vocab, text_source=features.text_source)


def install_features(model: TwoTowerModel, features: ItemFeatures, config: TrainConfig,
                     popularity: np.ndarray) -> None:
    model.item_tower.set_item_features(features.warm, features.text, features.tokens,
                                       features.meta)
    if features.tokens is not None:
        model.item_tower.attach_text_encoder(features.encoder.model, config.text_pooling,
                                             config.finetune_layers)
    model.retrieval.build(None)
    model.retrieval.popularity.assign(popularity.astype(np.float32))


def train(config: TrainConfig, data_dir: str | Path, run_dir: str | Path,
          export_dir: str | Path | None = None) -> dict:
    """Train, validate every epoch, test once, export when asked; returns the test metrics."""
    started = time.time()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.yaml")
    (run_dir / RUN_FILE).write_text(json.dumps({
        "data": str(Path(data_dir).resolve()),
        "export_dir": str(Path(export_dir).resolve()) if export_dir else None}, indent=2))
    tf.keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()

    strategy = make_strategy(config)
    with strategy.scope():  # a fine-tuned text encoder's variables belong to the strategy
        items, manifest, seqs, features = prepare(config, data_dir)
    if features.text_source != "none":
        print(f"text encoder: {features.text_source}", flush=True)
    train_arrays = training_arrays(seqs, config.max_seq_len, config.train_windows)
    if len(train_arrays["history"]) == 0:
        raise ValueError(f"{data_dir}: no user has two training events; nothing to train on")
    spec = model_spec(config, seqs, features, train_arrays)
    (run_dir / SPEC_FILE).write_text(json.dumps(spec.__dict__, indent=2))
    use_events = spec.num_event_types > 0
    counts = seqs.train_counts().astype(np.float64)
    popularity = counts / max(counts.sum(), 1.0)

    with strategy.scope():
        model = build_model(config, spec)
        install_features(model, features, config, popularity)
        optimizer = tf.keras.optimizers.Adam(config.lr, beta_2=config.adam_beta2)
        if tf.keras.mixed_precision.global_policy().name == "mixed_float16":
            optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer)

    valid = eval_set(seqs, "valid", config.max_seq_len)
    valid_rows = subset(len(valid.target), config.valid_users, config.seed)
    positions = int((train_arrays["targets"] > 0).sum())
    if config.bucket_batches > 1:
        model.positions_per_batch = positions / math.ceil(len(train_arrays["targets"])
                                                          / config.batch_size)
    dataset = training_dataset(train_arrays, config.batch_size, config.seed, use_events,
                               config.bucket_batches)
    checkpoint = run_dir / CHECKPOINT
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    validation = ValidationCallback(UserScorer(model, valid, use_events), config,
                                    seqs.num_items, checkpoint, positions, valid_rows)
    callbacks = [validation, tf.keras.callbacks.CSVLogger(str(run_dir / "history.csv")),
                 tf.keras.callbacks.TensorBoard(str(run_dir / "tensorboard"),
                                                write_graph=False, profile_batch=0)]
    print(f"training {config.user_tower} tower on {len(train_arrays['history']):,} sequences, "
          f"{positions:,} positions/epoch, {seqs.num_items:,} items ({spec.retrieval_mode} "
          f"softmax, ranking: {spec.ranking_mode}) on {_device()}", flush=True)
    model.fit(dataset, epochs=config.epochs, callbacks=callbacks,
              verbose=1 if sys.stdout.isatty() else 2)

    # The test split is scored once, with the checkpoint chosen on validation.
    model.load_weights(str(checkpoint))
    test = eval_set(seqs, "test", config.max_seq_len)
    scorer = UserScorer(model, test, use_events)
    test_rows = subset(len(test.target), config.test_users, config.seed)
    common = dict(num_items=seqs.num_items, batch_size=config.eval_batch_size, seed=config.seed)
    popular = lambda rows: np.broadcast_to(counts, (len(rows), len(counts)))  # noqa: E731
    results = {"test": evaluate(scorer, test, sampled_negatives=config.sampled_negatives,
                                rows=test_rows, **common),
               "popularity_test": evaluate(popular, test, rows=test_rows,
                                           sampled_negatives=config.sampled_negatives, **common),
               "best_valid_ndcg@10": validation.best, "best_epoch": validation.best_epoch + 1,
               "epochs": len(validation.epoch_times),
               "seconds_per_epoch": float(np.mean(validation.epoch_times)),
               "positions_per_epoch": positions,
               "positions_per_second": positions / float(np.median(validation.epoch_times)),
               "text_encoder": spec.text_source, "texts_encoded": features.texts_encoded,
               "retrieval_mode": spec.retrieval_mode, "ranking_mode": spec.ranking_mode,
               "sampled_negatives": config.sampled_negatives,
               "sampled_metrics_note": f"sampled_* rank the target among "
                                       f"{config.sampled_negatives} random unseen items"}
    if len(seqs.cold_items):
        cold_rows = np.flatnonzero(np.isin(test.target, seqs.cold_items))
        if test_rows is not None:
            cold_rows = np.intersect1d(cold_rows, test_rows)
        results["cold_items"] = int(len(seqs.cold_items))
        results["cold_test"] = evaluate(scorer, test, rows=cold_rows, **common)
        results["cold_popularity_test"] = evaluate(popular, test, rows=cold_rows, **common)
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=2))

    history = pd.read_csv(run_dir / "history.csv")
    plot_curves(history, run_dir / "training_curves.png")
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    metadata = {"data": str(data_dir), "data_manifest_sha256":
                hashlib.sha256(manifest_bytes).hexdigest(), "versions": package_versions(),
                "device": _device(), "strategy": type(strategy).__name__,
                "replicas": strategy.num_replicas_in_sync,
                "precision": tf.keras.mixed_precision.global_policy().name,
                "wall_seconds": round(time.time() - started, 1),
                "peak_rss_mb": round(peak_rss_mb(), 1)}
    (run_dir / "metadata.json").write_text(json.dumps(metadata, indent=2))
    print_summary(results)
    if config.export and export_dir is not None:
        from serving.export import export_run

        export_run(run_dir, Path(export_dir))
    return results


def print_summary(results: dict) -> None:
    test, pop = results["test"], results["popularity_test"]
    print(f"test (full catalog, {test['users']:,} users): HR@10 {test['hr@10']:.4f}  "
          f"NDCG@10 {test['ndcg@10']:.4f}  MRR {test['mrr']:.4f}  "
          f"coverage@10 {test['coverage@10']:.3f}")
    print(f"popularity baseline:             HR@10 {pop['hr@10']:.4f}  "
          f"NDCG@10 {pop['ndcg@10']:.4f}  MRR {pop['mrr']:.4f}")
    if "sampled_hr@10" in test:
        print(f"sampled ({results['sampled_negatives']} negatives, not comparable to full): "
              f"HR@10 {test['sampled_hr@10']:.4f}  NDCG@10 {test['sampled_ndcg@10']:.4f}")
    if "cold_test" in results:
        cold = results["cold_test"]
        print(f"cold items ({cold['users']} test users): HR@10 {cold['hr@10']:.4f}  "
              f"NDCG@10 {cold['ndcg@10']:.4f}")
    if math.isfinite(results["positions_per_second"]):
        print(f"{results['epochs']} epochs, {results['seconds_per_epoch']:.1f}s/epoch, "
              f"{results['positions_per_second']:,.0f} positions/s")
