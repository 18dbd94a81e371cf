"""Command line of train.py: `train.py --data DIR --out DIR [flags]` trains (then exports);
`train.py export --run RUN_DIR [--out DIR]` re-exports a finished run."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from training.config import add_config_flags, config_from_args


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train the two-tower model on a prepared data set, "
        "evaluate it (full-catalog leave-one-out) and export it for serving.")
    parser.add_argument("--data", required=True, help="prepared data dir (prepare_data.py --out)")
    parser.add_argument("--out", required=True, help="export dir, e.g. saved_model/NAME")
    parser.add_argument("--config", help="YAML file of TrainConfig settings; flags override it")
    parser.add_argument("--runs-dir", default="runs", help="where run directories go")
    add_config_flags(parser)
    return parser


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py export",
                                     description="Export a finished run as a new VERSION.")
    parser.add_argument("--run", required=True, help="run directory (runs/NAME-TIMESTAMP)")
    parser.add_argument("--out", help="export dir (default: the one the run was trained for)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv[:1] == ["export"]:
            from serving.export import export_run

            args = _export_parser().parse_args(argv[1:])
            export_run(Path(args.run), Path(args.out) if args.out else None)
            return 0
        args = _train_parser().parse_args(argv)
        config = config_from_args(args)
        if not Path(args.data).is_dir():
            raise ValueError(f"--data {args.data}: no such directory (run prepare_data.py)")
        from training.trainer import train

        name = Path(args.out).name
        run_dir = Path(args.runs_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        train(config, args.data, run_dir, export_dir=Path(args.out))
        print(f"run directory: {run_dir}")
        return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
