"""Export a finished run as saved_model/NAME/VERSION/ (the layout TF Serving watches).

VERSION/ holds `retrieval/` (user tower + ScaNN index), `retrieval_bruteforce/` (exact, stock
ops only), `ranking/`, `item_embeddings.parquet`, `items.parquet`, `user_histories.parquet`,
`metadata.json`. Everything is written into a temporary directory and renamed into place, so a
server polling the directory never sees half a model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from serving.modules import BruteForceRetrieval, ItemLookup, Ranker, ScannRetrieval, add_signatures
from training.config import TrainConfig
from training.sequences import eval_set
from training.trainer import (
    CHECKPOINT,
    RUN_FILE,
    SPEC_FILE,
    ModelSpec,
    build_model,
    install_features,
    package_versions,
    prepare,
)

log = logging.getLogger(__name__)

SCANN_NAMESPACE = ["Scann"]
MIN_RECALL = 0.95
# ScaNN over-fetches k + (items in the history) so that k remain after excluding seen items;
# the API accepts histories of up to this many ids.
MAX_EXCLUDED = 1000


@dataclass
class ScannParams:
    num_leaves: int
    leaves_to_search: int
    reorder: int

    @classmethod
    def for_catalog(cls, num_items: int, fetch: int, config: TrainConfig) -> ScannParams:
        """Defaults from the catalog size (about sqrt(N) leaves, 10% searched; every fetched
        candidate re-scored exactly), overridable by the config."""
        leaves = config.scann_num_leaves or int(min(max(round(math.sqrt(num_items)), 2), 4000))
        leaves = min(leaves, max(num_items // 2, 1))
        search = config.scann_leaves_to_search or max(leaves // 10, min(leaves, 8))
        reorder = config.scann_reorder or max(fetch, 250)
        return cls(leaves, min(search, leaves), reorder)


def scann_index(item_vectors: np.ndarray, k: int, params: ScannParams) -> tf.keras.layers.Layer:
    """A tfrs ScaNN layer over items 1..N (identifiers = item_idx), called once so it saves."""
    import tensorflow_recommenders as tfrs

    num_items = len(item_vectors) - 1
    layer = tfrs.layers.factorized_top_k.ScaNN(
        k=min(k, num_items), num_leaves=params.num_leaves,
        num_leaves_to_search=params.leaves_to_search,
        num_reordering_candidates=max(params.reorder, k), dimensions_per_block=2)
    layer.index(tf.constant(item_vectors[1:], tf.float32),
                tf.range(1, num_items + 1, dtype=tf.int32))
    layer(tf.zeros([1, item_vectors.shape[1]], tf.float32))  # build the graph before saving
    return layer


MAX_REORDER = 8192


def tuned_scann(item_vectors: np.ndarray, fetch: int, params: ScannParams, recall_of):
    """Build the index, then raise the leaves searched and the candidates re-scored until
    `recall_of(index)` -> (recall, result) reaches MIN_RECALL or both are at their maximum.

    Returns (result, final params, recall).
    """
    while True:
        recall, result = recall_of(scann_index(item_vectors, fetch, params))
        log.info("ScaNN %s: recall@10 %.4f", params, recall)
        if recall >= MIN_RECALL or (params.leaves_to_search >= params.num_leaves
                                    and params.reorder >= MAX_REORDER):
            return result, params, recall
        # Steps of 1.5x: large enough to converge in a few rounds, small enough not to
        # overshoot the recall target by much (every extra leaf costs query time).
        params.leaves_to_search = min(params.num_leaves,
                                      max(params.leaves_to_search + 1,
                                          int(params.leaves_to_search * 1.5)))
        params.reorder = min(MAX_REORDER, int(params.reorder * 1.5))


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean share of the exact top-k found in the approximate top-k."""
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) / k
            for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits)) if hits else 1.0


def next_version(export_dir: Path) -> int:
    versions = [int(p.name) for p in export_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def _load_run(run_dir: Path):
    if not (run_dir / SPEC_FILE).exists() or not (run_dir / "config.yaml").exists():
        raise ValueError(f"{run_dir}: not a finished run directory (no {SPEC_FILE}/config.yaml)")
    config = TrainConfig.from_yaml(run_dir / "config.yaml")
    spec = ModelSpec(**json.loads((run_dir / SPEC_FILE).read_text()))
    run_info = json.loads((run_dir / RUN_FILE).read_text())
    return config, spec, run_info


def restore_model(run_dir: Path):
    """Rebuild the trained model of a run from its config, data and best checkpoint."""
    config, spec, run_info = _load_run(run_dir)
    source = spec.text_source if spec.text_source != "none" else None
    items, manifest, seqs, features = prepare(config, run_info["data"], source)
    model = build_model(config, spec)
    counts = seqs.train_counts().astype(np.float64)
    install_features(model, features, config, counts / max(counts.sum(), 1.0))
    dummy = tf.zeros([1, config.max_seq_len], tf.int32)
    model.compute_loss({"history": dummy, "targets": dummy + 1,
                        "target_values": tf.zeros([1, config.max_seq_len]),
                        "target_purchase": tf.zeros([1, config.max_seq_len]),
                        **({"event_types": dummy} if spec.num_event_types else {})})
    model.load_weights(str(run_dir / CHECKPOINT)).expect_partial()
    return config, spec, run_info, model, items, manifest, seqs


def _user_histories(seqs, items: pd.DataFrame, events_vocab: list[str]) -> pd.DataFrame:
    """Every user's known events in time order (train, then valid, then test) as raw ids."""
    ids = np.concatenate([[""], items["item_id"].astype(str).to_numpy()])
    kinds = np.array([""] + list(events_vocab), dtype=object)
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


def export_run(run_dir: Path, export_dir: Path | None = None) -> Path:
    """Export the run's best checkpoint as a new VERSION; returns the version directory."""
    started = time.time()
    config, spec, run_info, model, items, manifest, seqs = restore_model(run_dir)
    export_dir = Path(export_dir or run_info.get("export_dir") or "")
    if not str(export_dir):
        raise ValueError(f"{run_dir}: no export directory recorded; pass --out")
    item_vectors = tf.cast(model.all_item_vectors(), tf.float32).numpy()
    lookup = ItemLookup(items["item_id"].astype(str).to_numpy(), spec.event_vocab)
    use_events = spec.num_event_types > 0
    default_event = int(np.argmax(np.bincount(seqs.event_types))) if len(seqs.items) else 0
    base = dict(user_tower=model.user_tower, item_vectors=item_vectors, lookup=lookup,
                max_len=config.max_seq_len, use_events=use_events, default_event=default_event)
    k = min(config.export_k, spec.num_items)
    brute = BruteForceRetrieval(k=k, **base)
    max_fetch = min(k + MAX_EXCLUDED, spec.num_items)
    params = ScannParams.for_catalog(spec.num_items, max_fetch, config)

    # Accuracy of the index: recall@10 against brute force over (a sample of) test users.
    test = eval_set(seqs, "test", config.max_seq_len)
    ids = np.concatenate([[""], items["item_id"].astype(str).to_numpy()])
    sample = np.random.default_rng(0).permutation(len(test.target))[:2000]
    queries = tf.constant(ids[test.history[sample]])
    exact = brute.top_k(queries, None, True)["item_ids"].numpy()

    def recall_of(index):
        scann = ScannRetrieval(k=k, index=index, max_fetch=max_fetch, **base)
        return recall_at_k(scann.top_k(queries, None, True)["item_ids"].numpy(), exact), scann

    scann, params, recall = tuned_scann(item_vectors, max_fetch, params, recall_of)
    print(f"ScaNN recall@10 vs brute force ({len(sample)} test users): {recall:.4f} "
          f"(leaves {params.num_leaves}, search {params.leaves_to_search}, "
          f"reorder {params.reorder})", flush=True)
    ranker = Ranker(ranking_head=model.ranking_head, **base)

    export_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(export_dir)
    tmp = export_dir / f".tmp-{version}-{os.getpid()}"
    try:
        tf.saved_model.save(brute, str(tmp / "retrieval_bruteforce"),
                            signatures=add_signatures(brute, "retrieval"))
        tf.saved_model.save(scann, str(tmp / "retrieval"),
                            signatures=add_signatures(scann, "retrieval"),
                            options=tf.saved_model.SaveOptions(
                                namespace_whitelist=SCANN_NAMESPACE))
        tf.saved_model.save(ranker, str(tmp / "ranking"),
                            signatures=add_signatures(ranker, "ranking"))
        pd.DataFrame({"item_id": ids[1:], "embedding": list(item_vectors[1:])}).to_parquet(
            tmp / "item_embeddings.parquet", index=False)
        items.to_parquet(tmp / "items.parquet", index=False)
        _user_histories(seqs, items, spec.event_vocab).to_parquet(
            tmp / "user_histories.parquet", index=False)
        metrics_file = run_dir / "metrics.json"
        metadata = {
            "model_version": version, "run_dir": str(run_dir.resolve()),
            "data": run_info["data"], "data_source": manifest.get("source"),
            "data_manifest": {k: manifest.get("counts", manifest).get(k)
                              for k in ("num_users", "num_items", "num_events")},
            "config": config.to_dict(), "model_spec": spec.__dict__,
            "test_metrics": (json.loads(metrics_file.read_text())
                             if metrics_file.exists() else None),
            "k": k, "max_seq_len": config.max_seq_len, "embedding_dim": config.dim,
            "event_types": spec.event_vocab,
            "default_event_type": (spec.event_vocab[default_event - 1] if default_event
                                   else None),
            "scann": {**params.__dict__, "max_fetch": max_fetch,
                      "recall@10_vs_bruteforce": recall, "recall_users": int(len(sample))},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": package_versions()}
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str))
        _before_rename_hook(tmp)
        os.replace(tmp, export_dir / str(version))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_tf_serving_config(export_dir, version)
    print(f"exported version {version} to {export_dir / str(version)} "
          f"({time.time() - started:.1f}s)", flush=True)
    return export_dir / str(version)


def _before_rename_hook(tmp: Path) -> None:
    """Tests replace this to simulate an export that dies before the rename."""


TF_SERVING_MODELS = ("retrieval_bruteforce", "ranking", "retrieval")


def write_tf_serving_config(export_dir: Path, version: int) -> None:
    """tf_serving/<model>/<VERSION> symlinks + models.config, so each exported model has the
    base_path/VERSION/saved_model.pb layout tensorflow_model_server expects."""
    root = export_dir / "tf_serving"
    lines = ["model_config_list {"]
    for name in TF_SERVING_MODELS:
        (root / name).mkdir(parents=True, exist_ok=True)
        link = root / name / str(version)
        if not link.exists():
            link.symlink_to(Path("..") / ".." / str(version) / name)
        lines += ["  config {", f'    name: "{name}"',
                  f'    base_path: "/models/{export_dir.name}/tf_serving/{name}"',
                  '    model_platform: "tensorflow"', "  }"]
    lines.append("}")
    tmp = root / "models.config.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, root / "models.config")
