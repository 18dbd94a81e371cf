"""Export a finished run as saved_model/NAME/VERSION/ (the layout TF Serving watches).

Reads the run directory only (towers/run_dir.py): the model is rebuilt from its spec and best
checkpoint, the item table and user histories are copied from it. VERSION/ holds the files
named in export/contract.py: `retrieval/` (user tower + ScaNN index), `retrieval_bruteforce/`
(exact, stock ops only), `ranking/`, `item_embeddings.parquet`, `items.parquet`,
`user_histories.parquet`, `metadata.json`; each SavedModel carries TF Serving warmup requests
and `tf_serving/` gets the model server's configs (export/tf_serving.py). Everything is written
into a temporary directory and renamed into place, so a server polling the directory never sees
half a model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
import yaml

from export import contract as c
from export.scann_index import ScannIndex, ScannParams, Tuner, exact_top, recall_at_k, tune
from export.signatures import (
    BruteForceRetrieval,
    ItemLookup,
    ItemTowerModule,
    Ranker,
    ScannRetrieval,
    add_signatures,
)
from export.tf_serving import write_tf_serving_config, write_warmup_requests
from towers import run_dir as run_files
from towers.metadata import metadata_vocabularies
from towers.model import TwoTowerModel
from towers.run_dir import package_versions

log = logging.getLogger(__name__)

SCANN_NAMESPACE = ["Scann"]
RECALL_USERS = 2000  # users whose histories measure the index's recall@10


@contextmanager
def _native_log_captured() -> Iterator[None]:
    """ScaNN's C++ code logs each index build to stderr through absl, which neither Python
    logging nor TF_CPP_MIN_LOG_LEVEL controls. Unless INFO lines are wanted (train.py -v, the
    server), hold file descriptor 2 in a temporary file meanwhile and replay it on failure."""
    if logging.getLogger().isEnabledFor(logging.INFO):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def next_version(export_dir: Path) -> int:
    versions = [int(p.name) for p in export_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def _run_settings(run_dir: Path) -> dict:
    """The run's TrainConfig as plain settings (export reads only the run directory)."""
    settings = yaml.safe_load((run_dir / run_files.CONFIG).read_text())
    missing = [k for k in ("export_k", "scann_num_leaves", "scann_leaves_to_search",
                           "scann_reorder") if k not in settings]
    if missing:
        raise ValueError(f"{run_dir / run_files.CONFIG}: missing {', '.join(missing)}")
    return settings


def _recall_queries(histories: pd.DataFrame, max_len: int) -> np.ndarray:
    """Up to RECALL_USERS users' newest `max_len` history items, left-padded with "": the
    queries the API sends for known users."""
    sample = np.random.default_rng(0).permutation(len(histories))[:RECALL_USERS]
    rows = [list(histories["history"].iloc[i])[-max_len:] for i in sample]
    width = max((len(r) for r in rows), default=1) or 1
    return np.array([[""] * (width - len(r)) + r for r in rows], dtype=object)


ITEM_TOWER_TOLERANCE = 1e-3  # largest |difference| of unit text vectors the encoder may show


def item_tower_module(model: TwoTowerModel, spec, settings: dict, items: pd.DataFrame
                      ) -> tuple[ItemTowerModule | None, object, str]:
    """The item tower for new items, the tokenizer it needs (None without text) and, when
    there is no item tower, why. The frozen encoder is loaded as training loaded it and must
    reproduce the checkpoint's text vectors of the catalog (another encoder would place new
    items in another space); where it cannot, the export goes on without an item tower."""
    if spec.text_tokens:
        return None, None, ("a fine-tuned text encoder is not kept in the run directory; "
                            "new items need a frozen-text run")
    tower = model.item_tower
    vocabularies = metadata_vocabularies(items, spec.meta_sizes, settings.get("price_buckets",
                                                                             10))
    for name in ("category", "brand"):
        if name in vocabularies and len(vocabularies[name]) != spec.meta_sizes[name]:
            raise ValueError(f"items.parquet has {len(vocabularies[name])} {name} values, the "
                             f"model {spec.meta_sizes[name]}")
    if not tower.text_dim:
        return ItemTowerModule(tower, vocabularies), None, ""
    from towers.text_encoder import encode_texts, load_text_encoder

    try:
        encoder = load_text_encoder(settings["text_model"],
                                    allow_fallback=bool(settings.get("text_fallback")))
    except (OSError, ValueError) as error:
        return None, None, f"the run's text encoder cannot be loaded here: {error}"
    if encoder.display_name != spec.text_source:
        return None, None, (f"the run's text encoder was {spec.text_source}, export loaded "
                            f"{encoder.display_name}")
    module = ItemTowerModule(tower, vocabularies, encoder.model, spec.text_pooling)
    sample = np.arange(min(len(items), 32))
    texts = items["text"].fillna("").astype(str).to_numpy()[sample].tolist()
    fresh = encode_texts(encoder, texts, settings.get("text_max_length", 64), spec.text_pooling,
                         progress=False)
    fresh /= np.maximum(np.linalg.norm(fresh, axis=1, keepdims=True), 1e-12)
    trained = tower.text_vectors(tf.constant(sample + 1, tf.int32)).numpy()
    gap = float(np.abs(fresh - trained).max()) if len(sample) else 0.0
    if gap > ITEM_TOWER_TOLERANCE:
        return None, None, (f"the text encoder loaded at export ({encoder.display_name}) does "
                            f"not reproduce the run's text vectors (max difference {gap:.2g}): "
                            "its files changed since training")
    return module, encoder.tokenizer, ""


def export_run(run_dir: Path, export_dir: Path | None = None) -> Path:
    """Export the run's best checkpoint as a new VERSION; returns the version directory."""
    started = time.time()
    run_dir = run_files.check_run_dir(run_dir)
    settings = _run_settings(run_dir)
    run_info = json.loads((run_dir / run_files.EXPORT_INFO).read_text())
    export_dir = Path(export_dir or run_info.get("export_dir") or "")
    if not str(export_dir):
        raise ValueError(f"{run_dir}: no export directory recorded; pass --out")
    model, spec = TwoTowerModel.from_run(run_dir)
    items = pd.read_parquet(run_dir / run_files.ITEMS)
    histories = pd.read_parquet(run_dir / run_files.USER_HISTORIES)
    manifest = json.loads((run_dir / run_files.DATA_MANIFEST).read_text())

    item_vectors = tf.cast(model.all_item_vectors(), tf.float32).numpy()
    lookup = ItemLookup(items["item_id"].astype(str).to_numpy(), spec.event_vocab)
    tower = model.item_tower
    base = dict(user_tower=model.user_tower, item_vectors=item_vectors, lookup=lookup,
                max_len=spec.max_seq_len, use_events=spec.num_event_types > 0,
                default_event=spec.default_event,
                dim=spec.dim, content=tower.content if tower.content_term else None,
                log_counts=tower.log_count.numpy() if tower.content_term else None)
    k = min(settings["export_k"], spec.num_items)
    brute = BruteForceRetrieval(k=k, **base)
    max_fetch = min(k + c.HISTORY_MAX, spec.num_items)
    params = ScannParams.for_catalog(spec.num_items, max_fetch, settings["scann_num_leaves"],
                                     settings["scann_leaves_to_search"],
                                     settings["scann_reorder"])
    started_index = time.time()
    with _native_log_captured():
        index = ScannIndex(item_vectors, max_fetch, params)
    build_seconds = time.time() - started_index

    # Tune the search on (a sample of) users' histories as the API sends them, against exact
    # search with the same exclusion of seen items.
    queries = tf.constant(_recall_queries(histories, spec.max_seq_len).astype(str))
    users, history_idx = brute.user_vectors(queries, None)
    seen = [row[row > 0] for row in history_idx.numpy()]
    tuner = Tuner(index, users.numpy(), seen, exact_top(users.numpy(), item_vectors, seen),
                  k, max_fetch)
    params, tuned_recall, curve = tune(tuner, params, settings["scann_leaves_to_search"],
                                       settings["scann_reorder"])
    index.leaves_to_search, index.reorder = params.leaves_to_search, params.reorder
    scann = ScannRetrieval(k=k, index=index, max_fetch=max_fetch, **base)
    # The exported signature end to end, against the brute-force model's.
    # In blocks: one brute-force call scores [rows, catalog] (2,000 x 1M floats is 8 GB).
    def top_ids(module) -> np.ndarray:
        return np.concatenate([module.top_k(queries[i:i + 128], None, True)[c.ITEM_IDS].numpy()
                               for i in range(0, len(queries), 128)])

    recall = recall_at_k(top_ids(scann), top_ids(brute))
    log.info("ScaNN recall@10 vs brute force (%d users): %.4f (leaves %d, search %d, "
             "reorder %d; built in %.1fs, tuned in %.1fs)", len(queries), recall,
             params.num_leaves, params.leaves_to_search, params.reorder, build_seconds,
             time.time() - started_index - build_seconds)
    ranker = Ranker(ranking_head=model.ranking_head, **base)
    item_tower, tokenizer, no_item_tower = item_tower_module(model, spec, settings, items)
    if item_tower is None:
        log.warning("no item_tower in this export (%s): the API cannot place new items with "
                    "it", no_item_tower)

    export_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_parts(export_dir)
    version = next_version(export_dir)
    tmp = export_dir / f".tmp-{version}-{socket.gethostname()}-{os.getpid()}"
    ids = items["item_id"].astype(str).to_numpy()
    warmup_event = spec.event_type_of_requests or (spec.event_vocab or [None])[0]
    try:
        for name, module, options in (
                (c.RETRIEVAL_BRUTEFORCE, brute, None),
                (c.RETRIEVAL_SCANN, scann,
                 tf.saved_model.SaveOptions(namespace_whitelist=SCANN_NAMESPACE)),
                (c.RANKING, ranker, None)):
            signatures = add_signatures(module, name)
            tf.saved_model.save(module, str(tmp / name), signatures=signatures,
                                options=options)
            write_warmup_requests(tmp / name, name, signatures, ids[:3].tolist(), warmup_event)
        if item_tower is not None:
            signatures = item_tower.signatures()
            tf.saved_model.save(item_tower, str(tmp / c.ITEM_TOWER), signatures=signatures)
            write_warmup_requests(tmp / c.ITEM_TOWER, c.ITEM_TOWER, signatures, [], None)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / c.TOKENIZER))
        pd.DataFrame({"item_id": ids, "embedding": list(item_vectors[1:])}).to_parquet(
            tmp / c.ITEM_EMBEDDINGS, index=False)
        shutil.copyfile(run_dir / run_files.ITEMS, tmp / c.ITEMS)
        shutil.copyfile(run_dir / run_files.USER_HISTORIES, tmp / c.USER_HISTORIES)
        metrics_file = run_dir / run_files.METRICS
        metadata = {
            "model_version": version, "run_dir": str(run_dir.resolve()),
            "data": run_info.get("data"), "data_source": manifest.get("source"),
            "data_manifest": {**{key: manifest.get("counts", manifest).get(key)
                                 for key in ("num_users", "num_items", "num_events")},
                              "split": manifest.get("options", {}).get("split")},
            "config": settings, "model_spec": spec.to_dict(),
            "test_metrics": (json.loads(metrics_file.read_text())
                             if metrics_file.exists() else None),
            "k": k, "max_seq_len": spec.max_seq_len, "embedding_dim": int(item_vectors.shape[1]),
            "event_types": spec.event_vocab,
            "item_tower": ({"text_max_length": settings.get("text_max_length", 64),
                            "tokenizer": c.TOKENIZER if tokenizer is not None else None,
                            "metadata": sorted(item_tower.tables) + (
                                ["price"] if item_tower.price_edges is not None else [])}
                           if item_tower is not None else None),
            "item_tower_missing": no_item_tower or None,
            # the live events the training data held (prepare_data.py --live-db): the API
            # adds only later ones to the exported histories
            "events_through": int(manifest.get("options", {}).get("events_through") or 0),
            "default_event_type": spec.event_type_of_requests,
            "scann": {**params.__dict__, "max_fetch": max_fetch,
                      "recall@10_vs_bruteforce": recall, "recall_users": int(len(queries)),
                      "tuning_recall@10": tuned_recall, "build_seconds": round(build_seconds, 2),
                      "tuning_curve": curve},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": package_versions()}
        (tmp / c.METADATA).write_text(json.dumps(metadata, indent=2, default=str))
        _before_rename_hook(tmp)
        os.replace(tmp, export_dir / str(version))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_tf_serving_config(export_dir, version)
    log.info("exported version %d to %s (%.1fs)", version, export_dir / str(version),
             time.time() - started)
    return export_dir / str(version)


def _remove_dead_parts(export_dir: Path) -> None:
    """Deletes the half-written versions (`.tmp-VERSION-HOST-PID`) of exports that were killed
    on this host: their process is gone. Other hosts' (a shared directory) are left alone."""
    host = socket.gethostname()
    for part in export_dir.glob(f".tmp-*-{host}-*"):
        try:
            os.kill(int(part.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:  # dead: nothing will finish it
            shutil.rmtree(part, ignore_errors=True)
            log.info("removed %s, left by an export that was killed", part)
        except (ValueError, PermissionError):  # not ours, or alive under another user
            continue


def _before_rename_hook(tmp: Path) -> None:
    """Tests replace this to simulate an export that dies before the rename."""
