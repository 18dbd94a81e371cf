"""Train, evaluate and export the two-tower recommender (see `python train.py --help`).

`train.py --data DIR --out DIR [flags]` trains a run (runs/NAME-TIMESTAMP), prints its test
summary and exports it as saved_model/NAME/VERSION; `train.py export --run RUN_DIR` exports a
finished run again, from the run directory alone; `train.py report --run RUN_DIR` rebuilds the
run's report.html (each export rebuilds it too, with its ScaNN tuning curve). With
`--distribute multiworker` every worker runs the same command; with `--distribute
parameter_server` so do the chief, the workers and the ps tasks (TF_CONFIG says which is which;
workers and ps tasks serve until stopped).
"""

import sys
from pathlib import Path

from recdata.schema import DataError
from training import cli  # noqa: I001  (imports tfenv; TensorFlow itself loads later)
from training.cluster import cluster_task, serve
from training.config import config_from_args
from training.resume import TrainingStopped


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cli.configure_logging(cli.is_verbose(argv))
    try:
        if argv[:1] == ["export"]:
            args = cli.export_parser().parse_args(argv[1:])
            from export.build import export_run
            from training.run_report import try_run_report

            version = export_run(Path(args.run), Path(args.out) if args.out else None)
            try_run_report(Path(args.run), version)
            return 0
        if argv[:1] == ["report"]:
            args = cli.report_parser().parse_args(argv[1:])
            from training.run_report import write_run_report

            write_run_report(args.run)  # logs the report's path
            return 0
        args = cli.train_parser().parse_args(argv)
        base, resume_dir = cli.resolve_resume(args)
        config = config_from_args(args, base)
        task = cluster_task(config)  # TF_CONFIG, with --distribute multiworker|parameter_server
        if task.serves:  # a parameter-server cluster's worker or ps: serve until stopped
            serve(task)
            return 0
        if not Path(args.data).is_dir():
            raise ValueError(f"--data {args.data}: no such directory (run prepare_data.py)")
        from export.build import export_run
        from training.report import summary_lines
        from training.run_report import try_run_report
        from training.trainer import train

        run_dir = resume_dir or cli.run_dir_for(args.runs_dir, args.out)
        results = train(config, args.data, run_dir, export_dir=Path(args.out),
                        resume=resume_dir is not None)
        if not task.is_chief:
            print(f"{task.task_type} {task.task_index} done; the chief wrote the run directory")
            return 0
        print("\n".join(summary_lines(results)), flush=True)
        if config.export:  # the report training wrote gains the export's ScaNN curve
            try_run_report(run_dir, export_run(run_dir, Path(args.out)))
        print(f"run directory: {run_dir}")
        return 0
    except (ValueError, FileNotFoundError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
