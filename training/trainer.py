"""A training run: prepared data -> towers -> fit with per-epoch validation (early stopping on
valid NDCG@10) -> one test evaluation -> a self-sufficient run directory (towers/run_dir.py),
written by the chief of a cluster (training/cluster.py)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from towers import run_dir as run_files
from towers.model import TwoTowerModel
from training.cluster import ClusterTask, cluster_task, sharded_tables
from training.config import TrainConfig
from training.data import (
    load_training_data,
    model_spec,
    multiworker_data,
    retrieval_mode,
    write_run_tables,
)
from training.features import install_features
from training.fit import check_graph_windows, device_name, fit, make_strategy
from training.optimizers import make_optimizer, resolve_optimizer
from training.precision import device_precision
from training.report import write_report
from training.resume import (
    EpochState,
    LossGuard,
    TrainingDiverged,
    TrainingStopped,
    check_same_run,
    finish,
    restore,
    resumable,
)
from training.scoring import UserScorer, ValidationCallback, score_test_split, validation_rows
from training.sequences import eval_set
from training.shard_input import INPUT_DIR, check_worker_count

log = logging.getLogger(__name__)


def train(config: TrainConfig, data_dir: str | Path, run_dir: str | Path,
          export_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train, validate every epoch, test once; returns the metrics written to metrics.json.

    `export_dir` is only recorded in the run directory, as the default target of an export.
    `resume`: continue `run_dir` from its last completed epoch (training/resume.py),
    refusing if the settings or the data differ from the run's; a multiworker cluster's other
    workers restore the chief's `run_dir` too.
    In a multi-worker cluster only the chief writes `run_dir`; the other workers train in step
    with it, keep their files in a temporary directory and delete it.
    """
    task = cluster_task(config)
    if task.serves:
        raise ValueError(f"TF_CONFIG task {task.task_type}:{task.task_index} only runs a "
                         "server (train.py starts it); the chief trains")
    if resume:
        check_same_run(Path(run_dir), config, Path(data_dir))
    if task.is_chief:
        return _train(config, task, data_dir, Path(run_dir), export_dir,
                      Path(run_dir) if resume else None)
    scratch = Path(tempfile.mkdtemp(prefix=f"towerrec-{task.task_type}{task.task_index}-"))
    try:  # a resumed worker restores the chief's state (its run directory, a shared path)
        return _train(config, task, data_dir, scratch, export_dir,
                      Path(run_dir) if resume else None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def unavailable_task(err: Exception) -> str:
    """Which task an UnavailableError is about, in a few words (TensorFlow's own first line is
    often just 'Graph execution error:')."""
    text = str(err)
    for pattern, say in ((r"(/job:[\w/:]+) is down", "{} is down"),
                         (r"[Ee]rror reported from (/job:[\w/:]+)", "error reported from {}"),
                         (r"ipv4:([\d.]+:\d+)", "{} refuses connections")):
        found = re.search(pattern, text)
        if found:
            detail = say.format(found.group(1).rstrip(":"))
            break
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = (lines or [type(err).__name__])[0][:200]
    if type(err).__name__ == "PSUnavailableError":
        return f"a parameter server: {detail}"
    return detail


def _train(config: TrainConfig, task: ClusterTask, data_dir: str | Path, run_dir: Path,
           export_dir: str | Path | None, resume_from: Path | None = None) -> dict:
    """`resume_from`: the run directory whose saved state this process continues (the chief's:
    its own; another multiworker worker's: the chief's), or None for a new run."""
    started = time.time()
    precision = device_precision(config.mixed_precision)  # refuses before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        config.save(run_dir / run_files.CONFIG)
        (run_dir / run_files.EXPORT_INFO).write_text(json.dumps({
            "data": str(Path(data_dir).resolve()),
            "export_dir": str(Path(export_dir).resolve()) if export_dir else None}, indent=2))
    tf.keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    # One machine: the step's random draws come from a generator saved with the checkpoints,
    # so a resumed run continues its stream (training/resume.py). Clusters keep stateful ops.
    local = task.mode == "single"

    if task.mode == "parameter_server":  # the item tables' partitioner needs the catalog size
        # Sharded data: the workers read window files (one per shard) instead of the graph.
        data = load_training_data(config, data_dir, window_dir=run_dir / INPUT_DIR)
        if data.window_shards is not None:
            check_worker_count(len(data.window_shards.files), len(task.cluster["worker"]))
            log.info("training input: %d window files in %s, each worker reads its own",
                     len(data.window_shards.files), run_dir / INPUT_DIR)
        else:
            check_graph_windows(data.windows)
        strategy = make_strategy(config, task, precision, data.seqs.num_items + 1)
    else:  # MultiWorkerMirroredStrategy wants to exist before TensorFlow runs anything
        strategy = make_strategy(config, task, precision)
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    spec = None
    if task.mode == "multiworker":  # a fine-tuned encoder's variables belong to the strategy
        with strategy.scope():  # (and the chief shares the data's choices by all-reduce)
            data, spec, retrieval_reason = multiworker_data(config, data_dir, task, strategy,
                                                            on_gpu)
        if data.worker_windows is not None:
            log.info("training input: %s of %s windows (worker %d of %d: %s)",
                     f"{len(data.worker_windows.arrays['history']):,}",
                     f"{data.window_count:,}", task.training_rank, task.training_workers,
                     ", ".join(data.worker_windows.shards))
    elif task.mode != "parameter_server":
        with strategy.scope():
            data = load_training_data(config, data_dir)
    if spec is None:
        retrieval = retrieval_mode(config, data, on_gpu)
        spec, retrieval_reason = model_spec(config, data, retrieval.mode), retrieval.reason
    features, seqs = data.features, data.seqs
    if features.text_source != "none":
        log.info("text encoder: %s", features.text_source)
    log.info("retrieval: %s softmax (%s); precision: %s (%s)", spec.retrieval_mode,
             retrieval_reason, precision.policy, precision.reason)
    spec.save(run_dir / run_files.SPEC)
    if task.is_chief:
        write_run_tables(run_dir, data)
    use_events = spec.num_event_types > 0
    optimizer = resolve_optimizer(config.optimizer, spec.retrieval_mode)

    with strategy.scope():
        model = TwoTowerModel.from_spec(spec, data.positions_per_batch(config))
        install_features(model, features, data.popularity, spec.text_pooling,
                         spec.finetune_layers, config.id_init)
        if local:
            model.seed_generator(config.seed)
        model.compile(optimizer=make_optimizer(optimizer, config.lr, config.adam_beta2))
    shards = sharded_tables(model.item_tower)
    for name, devices in shards.items():
        log.info("%s: %d shards on %s", name, len(devices), ", ".join(devices))

    checkpoint = run_dir / run_files.CHECKPOINT
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    scorer, valid_rows, valid_reason = None, None, "on the chief, which shares its results"
    if task.is_chief:  # a multiworker cluster's other workers learn the chief's results
        valid = eval_set(seqs, "valid", config.max_seq_len)
        scorer = UserScorer(model, valid, use_events)
        valid_rows, valid_reason = validation_rows(len(valid.target), seqs.num_items,
                                                   str(config.valid_users), config.seed)
    log.info("validation: %s; %s", valid_reason,
             "every epoch while it takes < 5 s, else as often as keeps it near 20% of the time"
             if config.valid_every == "auto" else f"every {config.valid_every} epoch(s)")
    validation = ValidationCallback(scorer, config, seqs.num_items, checkpoint, data.positions,
                                    valid_rows)
    log.info("training %s tower on %s sequences, %s positions/epoch, %s items (%s softmax, "
             "ranking: %s, %s) on %s", config.user_tower, f"{data.window_count:,}",
             f"{data.positions:,}", f"{seqs.num_items:,}", spec.retrieval_mode,
             spec.ranking_mode, optimizer, device_name())
    guard = LossGuard() if local else None
    epoch_state = EpochState(run_dir, validation,
                             tf.train.Checkpoint(model=model, optimizer=model.optimizer), guard)
    first_epoch, finished = 0, False
    if resume_from is not None:
        first_epoch, finished = restore(resume_from, epoch_state.manager.checkpoint,
                                        validation)
        log.info("resuming %s after epoch %d (best so far: epoch %d, valid NDCG@10 %.4f)%s",
                 resume_from, first_epoch, validation.best_epoch + 1, validation.best,
                 "; training had ended, testing" if finished else "")
    # Resume state after every epoch: one machine, a parameter-server cluster's chief (its
    # checkpoint reads the variables from the ps tasks), every multiworker worker (the chief's
    # in the run directory, the others' in their scratch directories, as Keras's own
    # BackupAndRestore does it). The step-level loss check on one machine only.
    callbacks = ([validation, guard, epoch_state] if local else [validation, epoch_state])
    if not finished:
        try:
            fit(model, data.training_input, config, run_dir, callbacks,
                use_events, first_epoch, workers=len(task.cluster.get("worker", [])) or 1)
        except tf.errors.UnavailableError as err:  # a ps (or every worker) went away
            saved = epoch_state.state or resumable(resume_from or run_dir)
            # (another multiworker worker's run_dir is its scratch directory, deleted on exit)
            chiefs = run_dir if task.is_chief else "the chief's run directory"
            again = (f"restart every worker with --resume {chiefs}"
                     if task.mode == "multiworker" else
                     f"restart the stopped tasks, then this chief with --resume {run_dir}")
            kept = (f"the state after epoch {saved['epoch']} is kept: {again}" if saved
                    else "no epoch completed; start the run again")
            raise TrainingStopped(f"a cluster task stopped answering during training "
                                  f"({unavailable_task(err)}); {kept}") from None
    if data.window_shards is not None:  # done with them (a resumed run writes them again)
        shutil.rmtree(run_dir / INPUT_DIR, ignore_errors=True)
    if epoch_state.diverged:
        kept = (f"the best checkpoint so far (epoch {validation.best_epoch + 1}) is kept in "
                f"{checkpoint}" if validation.best_epoch >= 0 else "no epoch was validated")
        raise TrainingDiverged(f"{epoch_state.diverged}; stopped, not tested or exported; "
                               f"{kept}. Try a lower --lr.")
    if not task.is_chief:  # a multiworker worker: the chief tests, reports and exports
        return {}

    # The test split is scored once, with the checkpoint chosen on validation.
    model.load_weights(str(checkpoint)).expect_partial()  # optimizer slots: not needed now
    text = features.text
    if spec.text_tokens:  # fine-tuned: export rebuilds the item tower from these vectors
        ids = np.arange(seqs.num_items + 1, dtype=np.int32)
        text = np.concatenate([
            tf.cast(model.item_tower.text_vectors(ids[i:i + 256]), tf.float32).numpy()
            for i in range(0, len(ids), 256)])
        np.save(run_dir / run_files.TEXT_VECTORS, text)
    results = score_test_split(model, seqs, config, data.train_counts.astype(np.float64),
                               use_events, text)
    epoch_times = validation.epoch_times
    results.update({
        "best_valid_ndcg@10": validation.best, "best_epoch": validation.best_epoch + 1,
        "epochs": len(epoch_times), "seconds_per_epoch": float(np.mean(epoch_times)),
        "positions_per_epoch": data.positions,
        "positions_per_second": data.positions / float(np.median(epoch_times)),
        "text_encoder": spec.text_source, "texts_encoded": features.texts_encoded,
        "retrieval_mode": spec.retrieval_mode, "retrieval_mode_reason": retrieval_reason,
        "ranking_mode": spec.ranking_mode,
        "optimizer": optimizer, "id_dropout": spec.id_dropout, "dropout": spec.dropout,
        "validation": {"users": valid_reason, **validation.summary()},
        "sampled_negatives": config.sampled_negatives,
        "sampled_metrics_note": f"sampled_* rank the target among {config.sampled_negatives} "
                                "random unseen items"})
    write_report(run_dir, results, {
        "data": str(data_dir), "device": device_name(), "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
        "cluster": {job: len(tasks) for job, tasks in task.cluster.items()},
        "item_table_shards": shards,
        "precision": precision.policy, "precision_reason": precision.reason,
        "wall_seconds": round(time.time() - started, 1)}, data.manifest, html=task.is_chief)
    finish(run_dir)
    return results
