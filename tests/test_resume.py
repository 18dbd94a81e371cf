"""Runs that survive being killed (training/resume.py): a run killed with SIGKILL in the middle
of an epoch and resumed ends where the uninterrupted run ends (same weights, best epoch and
test metrics); a resume with other settings or data is refused by name; a loss that stops
being finite stops the run with its epoch and step, keeping the best checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from support import train_tiny, write_processed, write_tiny_distilbert

from towers import run_dir as run_files
from training.resume import DIR, STATE, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
KILL_EPOCH, KILL_STEP = 3, 2  # 1-based: the kill lands in the middle of epoch 3

# train.py, except that the process SIGKILLs itself after step KILL_STEP of epoch KILL_EPOCH
# (as a preempted machine would: no handler, no flush).
KILLER = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
sys.argv[0] = {str(ROOT / "train.py")!r}
from training import resume

def on_batch_end(self, batch, logs=None):
    if self.epoch + 1 == {KILL_EPOCH} and batch + 1 == {KILL_STEP}:
        os.kill(os.getpid(), signal.SIGKILL)

resume.LossGuard.on_train_batch_end = on_batch_end
import train
sys.exit(train.main())
"""


def _train(args, cwd, killer=False):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TRANSFORMERS_VERBOSITY")}
    command = ["-c", KILLER] if killer else [str(ROOT / "train.py")]
    return subprocess.run([sys.executable, *command, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run_dir / run_files.CHECKPOINT))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "OPTIMIZER_SLOT" not in name and not name.startswith("_CHECKPOINTABLE")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run twice: uninterrupted, and killed mid-epoch then resumed."""
    tmp = tmp_path_factory.mktemp("resume")
    data = write_processed(tmp / "data", event_types=("view", "purchase"))
    bert = write_tiny_distilbert(tmp / "bert")
    flags = ["--data", str(data), "--text-model", str(bert), "--epochs", "5", "--dim", "16",
             "--max-seq-len", "8", "--dropout", "0.3", "--id-dropout", "0.3", "--batch-size", "16",
             "--cache-dir", str(tmp / "cache"), "--export", "false"]
    whole = _train([*flags, "--out", str(tmp / "whole"), "--runs-dir", str(tmp / "w")], tmp)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _train([*flags, "--out", str(tmp / "killed"), "--runs-dir", str(tmp / "k")], tmp,
                    killer=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = next((tmp / "k").iterdir())
    state = json.loads((run / DIR / STATE).read_text())
    assert state["epoch"] == KILL_EPOCH - 1  # the last completed epoch
    assert not (run / run_files.METRICS).exists()
    shutil.copytree(run, tmp / "killed-copy")  # still unfinished, for the refusals
    resumed = _train(["--resume", str(run)], tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return tmp, data, flags, next((tmp / "w").iterdir()), run, resumed


def test_killed_run_resumed_ends_as_the_uninterrupted_run(runs):
    _, _, _, whole, resumed_run, resumed = runs
    assert f"resuming {resumed_run} after epoch {KILL_EPOCH - 1}" in resumed.stderr
    first = json.loads((whole / run_files.METRICS).read_text())
    second = json.loads((resumed_run / run_files.METRICS).read_text())
    assert second["best_epoch"] == first["best_epoch"]
    assert second["epochs"] == first["epochs"] == 5
    assert second["best_valid_ndcg@10"] == first["best_valid_ndcg@10"]
    assert second["test"] == first["test"]
    # The weights the export reads, bit for bit (so the exported top-k are the same too).
    a, b = _weights(whole), _weights(resumed_run)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # The per-epoch history has every epoch once, the resumed ones appended.
    epochs = [line.split(",")[0] for line in
              (resumed_run / run_files.HISTORY).read_text().splitlines()[1:]]
    assert epochs == [str(e) for e in range(5)]
    assert not (resumed_run / DIR).exists()  # a finished run keeps no resume state


def test_resume_refuses_other_settings_or_data(runs):
    tmp, data, _, _, finished, _ = runs
    result = _train(["--resume", str(finished)], tmp)
    assert result.returncode == 2 and "the run finished" in result.stderr
    run = tmp / "killed-copy"
    result = _train(["--resume", str(run), "--lr", "0.01"], tmp)
    assert result.returncode == 2
    assert "settings differ from the run's: lr (0.001 -> 0.01)" in result.stderr
    changed = tmp / "data-changed"
    shutil.copytree(data, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["num_events"] = manifest.get("num_events", 0) + 1
    (changed / "manifest.json").write_text(json.dumps(manifest))
    result = _train(["--resume", str(run), "--data", str(changed)], tmp)
    assert result.returncode == 2
    assert "data directory differs from the run's" in result.stderr
    moved = tmp / "run-of-changed-data"  # the same run, recorded as trained on `changed`
    shutil.copytree(run, moved)
    info = json.loads((moved / run_files.EXPORT_INFO).read_text())
    (moved / run_files.EXPORT_INFO).write_text(json.dumps({**info, "data": str(changed)}))
    result = _train(["--resume", str(moved)], tmp)
    assert result.returncode == 2
    assert "manifest.json differs from the run's data_manifest.json" in result.stderr
    fresh = tmp / "not-a-run"
    fresh.mkdir()
    result = _train(["--resume", str(fresh)], tmp)
    assert result.returncode == 2 and "not a run directory" in result.stderr
    result = _train(["--epochs", "2"], tmp)
    assert result.returncode == 2 and "--data and --out required" in result.stderr


def test_a_loss_that_is_not_finite_stops_the_run_and_keeps_the_best_checkpoint(tmp_path):
    # A learning rate no model survives: the weights overflow within the first epochs.
    with pytest.raises(TrainingDiverged, match=r"became (nan|inf) at epoch \d+, step \d+"):
        train_tiny(tmp_path, epochs=6, export=False, lr=1e30, text_model=None)
    run = tmp_path / "run"
    assert not (run / run_files.METRICS).exists()
    assert not (tmp_path / "export").exists()


def test_a_full_disk_stops_the_run_and_the_last_state_still_resumes(tmp_path, monkeypatch):
    import errno

    from training.config import TrainConfig
    from training.resume import TrainingStopped, resumable
    from training.trainer import train

    real_save = tf.train.CheckpointManager.save

    def save(self, checkpoint_number=None, **kwargs):
        if checkpoint_number == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    with pytest.raises(TrainingStopped, match=r"after epoch 3 .*No space left on device.*"
                                              r"state after epoch 2 is kept"):
        train_tiny(tmp_path, epochs=4, export=False, text_model=None)
    run = tmp_path / "run"
    assert resumable(run)["epoch"] == 2
    monkeypatch.undo()  # space again: the run continues from epoch 2
    metrics = train(TrainConfig.from_yaml(run / run_files.CONFIG), tmp_path / "data", run,
                    resume=True)
    assert metrics["epochs"] == 4 and np.isfinite(metrics["test"]["ndcg@10"])


def test_a_run_stopped_after_training_resumes_straight_to_the_test(tmp_path, monkeypatch):
    from training import trainer
    from training.config import TrainConfig
    from training.resume import resumable

    def crash(*args, **kwargs):
        raise RuntimeError("killed while testing")

    monkeypatch.setattr(trainer, "score_test_split", crash)
    with pytest.raises(RuntimeError, match="killed while testing"):
        train_tiny(tmp_path, epochs=2, export=False, text_model=None)
    run = tmp_path / "run"
    assert resumable(run) == {**resumable(run), "epoch": 2, "finished": True}
    monkeypatch.undo()
    fitted = []
    monkeypatch.setattr(trainer, "fit", lambda *args, **kwargs: fitted.append(1))
    metrics = trainer.train(TrainConfig.from_yaml(run / run_files.CONFIG), tmp_path / "data",
                            run, resume=True)
    assert not fitted and metrics["epochs"] == 2 and np.isfinite(metrics["test"]["ndcg@10"])
    assert len((run / run_files.HISTORY).read_text().splitlines()) == 3  # header + 2 epochs
