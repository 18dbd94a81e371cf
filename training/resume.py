"""Runs that survive being killed: after every epoch the run directory holds what continuing
needs, and `train.py --resume RUN_DIR` continues from the last completed epoch.

What an epoch leaves in RUN_DIR/resume/: a TensorFlow checkpoint of the model and its
optimizer (weights, Adam's or LazyAdam's moments, the step counter, the random generators of
dropout, id dropout and negative sampling), and `state.json` (the epoch, the validation
bookkeeping: best score and epoch, patience, validation schedule, epoch and validation
times, training time spent against the budget). The data order of an epoch depends on the
seed and the epoch number only, so a resumed run sees the same batches as an uninterrupted
one; on one machine with op determinism on (always, training/trainer.py) it ends with the
same weights, best epoch and test metrics.

Written checkpoint first, state second (by atomic rename), two checkpoints kept: a kill at any
moment leaves a state that names a complete checkpoint. A resume refuses, naming the
difference, when the data's manifest or any setting differs from the run's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import tensorflow as tf

from towers import run_dir as run_files
from training.config import TrainConfig

DIR = "resume"
STATE = "state.json"


class TrainingStopped(RuntimeError):
    """The run cannot go on (exit 1); the message says why and what the run directory keeps."""


class TrainingDiverged(TrainingStopped):
    """The loss became NaN or infinite; the run directory keeps the last good checkpoint."""


def resumable(run_dir: Path) -> dict | None:
    """The saved state of `run_dir` (None: no epoch completed yet)."""
    path = run_dir / DIR / STATE
    return json.loads(path.read_text()) if path.exists() else None


def check_run_dir(run_dir: str | Path) -> Path:
    """run_dir, refused unless it holds a run's config."""
    run_dir = Path(run_dir)
    if not (run_dir / run_files.CONFIG).exists():
        raise ValueError(f"--resume {run_dir}: not a run directory (no {run_files.CONFIG})")
    return run_dir


def check_same_run(run_dir: Path, config: TrainConfig, data_dir: Path) -> None:
    """ValueError naming every difference between this command's settings and data and the
    run's (resuming with other settings or data would be a different run)."""
    run_dir = check_run_dir(run_dir)
    if (run_dir / run_files.METRICS).exists():
        raise ValueError(f"--resume {run_dir}: the run finished (it has {run_files.METRICS}); "
                         f"export it with: train.py export --run {run_dir}")
    if resumable(run_dir) is None:
        raise ValueError(f"--resume {run_dir}: no completed epoch to resume from "
                         f"({DIR}/{STATE} missing); start the run again")
    recorded = TrainConfig.from_yaml(run_dir / run_files.CONFIG)
    changed = [f"{f.name} ({getattr(recorded, f.name)!r} -> {getattr(config, f.name)!r})"
               for f in fields(TrainConfig)
               if getattr(recorded, f.name) != getattr(config, f.name)]
    if changed:
        raise ValueError(f"--resume {run_dir}: settings differ from the run's: "
                         f"{', '.join(changed)}")
    info = json.loads((run_dir / run_files.EXPORT_INFO).read_text())
    if Path(info["data"]) != Path(data_dir).resolve():
        raise ValueError(f"--resume {run_dir}: data directory differs from the run's "
                         f"({info['data']} -> {Path(data_dir).resolve()})")
    manifest = Path(data_dir) / "manifest.json"
    if json.loads(manifest.read_text()) != json.loads(
            (run_dir / run_files.DATA_MANIFEST).read_text()):
        raise ValueError(f"--resume {run_dir}: {manifest} differs from the run's "
                         f"{run_files.DATA_MANIFEST} (the data changed since the run began)")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class LossGuard(tf.keras.callbacks.Callback):
    """Stops the run at the first step whose loss is not finite (one machine; parameter-server
    clusters allow no step-level callbacks, EpochState checks their epoch's loss)."""

    def __init__(self):
        super().__init__()
        self.epoch = 0
        self.diverged: str | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged = (f"the training loss became {float(loss)} at epoch "
                             f"{self.epoch + 1}, step {batch + 1}")
            self.model.stop_training = True


class EpochState(tf.keras.callbacks.Callback):
    """Saves the resume state after each epoch (after validation, which runs before it in the
    callback list), unless the epoch's loss is not finite: then it stops the run."""

    def __init__(self, run_dir: Path, validation, checkpoint: tf.train.Checkpoint,
                 guard: LossGuard | None = None):
        super().__init__()
        self.dir = Path(run_dir) / DIR
        self.validation, self.guard = validation, guard
        self.manager = tf.train.CheckpointManager(checkpoint, str(self.dir), max_to_keep=2)
        self.diverged: str | None = None
        self.state: dict | None = None  # the last state written

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.diverged:
            self.diverged = self.guard.diverged
        loss = float((logs or {}).get("loss", 0.0))
        if not self.diverged and not math.isfinite(loss):
            self.diverged = f"the training loss became {loss} in epoch {epoch + 1}"
            self.model.stop_training = True
        if self.diverged:
            return
        try:
            path = self.manager.save(checkpoint_number=epoch + 1)
            state = {"epoch": epoch + 1, "checkpoint": Path(path).name,
                     "validation": self.validation.state(), "finished": False}
            _write_atomically(self.dir / STATE, json.dumps(state, indent=2))
        except (OSError, tf.errors.OpError) as err:  # e.g. the disk is full
            kept = (f"the state after epoch {self.state['epoch']} is kept and --resume "
                    "continues from it" if self.state
                    else "no earlier state to resume from")
            raise TrainingStopped(f"could not write the resume state after epoch {epoch + 1} "
                                  f"in {self.dir} ({err}); {kept}") from None
        self.state = state

    def on_train_end(self, logs=None):
        # Stopped by patience, budget or the epoch count: a resume goes straight to the test.
        if not self.diverged and self.state:
            self.state["finished"] = True
            _write_atomically(self.dir / STATE, json.dumps(self.state, indent=2))


def restore(run_dir: Path, checkpoint: tf.train.Checkpoint, validation) -> tuple[int, bool]:
    """Loads the saved state into the model, optimizer and validation bookkeeping; returns the
    number of completed epochs (the epoch to start from) and whether training had ended."""
    state = resumable(run_dir)
    path = Path(run_dir) / DIR / state["checkpoint"]
    status = checkpoint.restore(str(path))
    status.assert_existing_objects_matched()
    finished = bool(state.get("finished"))
    if finished:  # no more steps: the optimizer's slots are never created to take their values
        status.expect_partial()
    validation.load_state(state["validation"])
    return int(state["epoch"]), finished


def finish(run_dir: Path) -> None:
    """The run is complete (metrics written): its resume state is no longer needed."""
    shutil.rmtree(Path(run_dir) / DIR, ignore_errors=True)


def epoch_seed(seed: int, epoch: int) -> np.random.Generator:
    """The data order's generator for one epoch: a function of the seed and the epoch only."""
    return np.random.default_rng([seed, epoch])
