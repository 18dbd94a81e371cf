"""The run directory: the one contract between training and export.

Training writes it; export (and anything else that needs the trained model) reads it and
nothing else: no data directory, no text encoder. `TwoTowerModel.from_run` rebuilds the model
from the spec and the best checkpoint.
"""

from __future__ import annotations

import platform
from pathlib import Path

CONFIG = "config.yaml"  # the TrainConfig of the run
SPEC = "model_spec.json"  # ModelSpec: everything needed to rebuild the model
CHECKPOINT = "checkpoints/best"  # weights of the best epoch, feature tables included
ITEMS = "items.parquet"  # item table: item_id, item_idx, display fields, count, train_count
USER_HISTORIES = "user_histories.parquet"  # user_id, history, event_types (raw ids, in order)
TEXT_VECTORS = "text_vectors.npy"  # fine-tuned runs only: the tuned encoder's item vectors
DATA_MANIFEST = "data_manifest.json"  # manifest.json of the prepared data the run used
METRICS = "metrics.json"
METADATA = "metadata.json"
HISTORY = "history.csv"  # per-epoch loss and validation metrics
CURVES = "training_curves.png"
EXPORT_INFO = "run.json"  # where the data came from and where exports go

REQUIRED = (CONFIG, SPEC, ITEMS, USER_HISTORIES, DATA_MANIFEST)


def check_run_dir(run_dir: str | Path) -> Path:
    """The run directory as a Path, or a ValueError naming what a finished run lacks."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run directory")
    missing = [name for name in REQUIRED if not (run_dir / name).exists()]
    if not list(run_dir.glob(CHECKPOINT + ".index")):
        missing.append(CHECKPOINT)
    if missing:
        raise ValueError(f"{run_dir}: not a finished run directory (missing "
                         f"{', '.join(missing)})")
    return run_dir


def package_versions() -> dict[str, str]:
    """Versions of the packages a run or an export depends on, recorded in their metadata."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("tensorflow", "tf-keras", "tensorflow-recommenders", "scann", "transformers",
                 "numpy", "pandas"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out
