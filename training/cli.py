"""Command line of train.py: flags (one per TrainConfig field, see training/config.py) and what
the console shows. `train.py --data DIR --out DIR [flags]` trains (then exports);
`train.py export --run RUN_DIR [--out DIR]` re-exports a finished run; `train.py report --run
RUN_DIR` rebuilds its report.html."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import tfenv
from training.config import add_config_flags

OWN_PACKAGES = ("training", "towers", "export", "serving", "recdata", "sequential")


def _verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show TensorFlow's, absl's and transformers' log lines")


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train the two-tower model on a prepared data set, "
        "evaluate it (full-catalog leave-one-out) and export it for serving.")
    parser.add_argument("--data", help="prepared data dir (prepare_data.py --out); required "
                        "unless --resume")
    parser.add_argument("--out", help="export dir, e.g. saved_model/NAME; required unless "
                        "--resume")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue this run from its last completed epoch: the same data "
                        "and settings (a difference is refused by name); --data and --out "
                        "default to the run's. Clusters: a parameter-server chief, or every "
                        "multiworker worker, with the chief's run directory")
    parser.add_argument("--config", help="YAML file of TrainConfig settings; flags override it")
    parser.add_argument("--runs-dir", default="runs", help="where run directories go")
    _verbose_flag(parser)
    add_config_flags(parser)
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py export",
                                     description="Export a finished run as a new VERSION. "
                                     "Needs only the run directory.")
    parser.add_argument("--run", required=True, help="run directory (runs/NAME-TIMESTAMP)")
    parser.add_argument("--out", help="export dir (default: the one the run was trained for)")
    _verbose_flag(parser)
    return parser


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py report",
                                     description="Rebuild report.html of a finished run, with "
                                     "the ScaNN tuning curve of its newest export.")
    parser.add_argument("--run", required=True, help="run directory (runs/NAME-TIMESTAMP)")
    _verbose_flag(parser)
    return parser


def resolve_resume(args: argparse.Namespace):
    """(the run's settings, run dir) of `--resume RUN_DIR`, the base the flags go on top of
    (any that differ are refused later, by name), with --data / --out filled in from the run;
    (None, None) without --resume. Without it, --data and --out are required."""
    if not args.resume:
        missing = [flag for flag in ("data", "out") if not getattr(args, flag)]
        if missing:
            raise ValueError(f"--{' and --'.join(missing)} required (or --resume RUN_DIR)")
        return None, None
    import json

    from towers import run_dir as run_files
    from training.config import TrainConfig
    from training.resume import check_run_dir

    run_dir = check_run_dir(args.resume)
    info = json.loads((run_dir / run_files.EXPORT_INFO).read_text())
    args.data = args.data or info["data"]
    args.out = args.out or info["export_dir"] or f"saved_model/{run_dir.name}"
    return TrainConfig.from_yaml(run_dir / run_files.CONFIG), run_dir


def run_dir_for(runs_dir: str | Path, export_dir: str | Path) -> Path:
    """runs/NAME-TIMESTAMP, NAME being the export directory's name."""
    return Path(runs_dir) / f"{Path(export_dir).name}-{time.strftime('%Y%m%d-%H%M%S')}"


class _ConsoleFormat(logging.Formatter):
    """Our own INFO lines as plain text; anything else with its level and logger name."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.split(".")[0] in OWN_PACKAGES:
            return record.getMessage()
        return f"{record.levelname} {record.name}: {record.getMessage()}"


def configure_logging(verbose: bool) -> None:
    """One line per step of our own on stderr, library INFO lines only when verbose. Call
    before TensorFlow loads."""
    tfenv.library_noise(verbose)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormat())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in OWN_PACKAGES:  # verbose: our DEBUG lines too (e.g. each ScaNN tuning point)
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def is_verbose(argv: list[str]) -> bool:
    return "-v" in argv or "--verbose" in argv
