"""Quality and speed table: prepare a real data set, train the SASRec and GRU4Rec towers (text
tower + ranking task) and the reference configuration (SASRec, id-only, single task), and print
HR@10 / NDCG@10 (full-catalog leave-one-out, shared/PROTOCOL.md) beside popularity.

    python bench/bench_quality.py --dataset online-retail --budget-minutes 10
    python bench/bench_quality.py --dataset ml-1m --budget-minutes 10

Each training run is a `train.py` subprocess with the given time budget (early stopping on
valid NDCG@10 may end it sooner); results are appended to bench/results/quality.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"

DATASETS = {
    "online-retail": (["--source", "online-retail", "--input",
                       str(SHARED / "online-retail" / "online_retail.parquet")], 50),
    "ml-1m": (["--source", "movielens", "--ratings",
               str(SHARED / "ml-1m" / "partial" / "ratings.head-487650.dat.gz"),
               "--movies", str(SHARED / "ml-1m" / "movies.dat")], 200),
    "sample": (["--source", "sample"], 50),
}

# The reference SASRec of shared/PROTOCOL.md: id only, single task, dropout 0.2 whatever the data.
REFERENCE = ["--user-tower", "sasrec", "--text-model", "none", "--use-metadata", "false",
             "--ranking-weight", "0", "--dropout", "0.2"]
CONFIGS = {
    "sasrec": ["--user-tower", "sasrec"],
    "gru": ["--user-tower", "gru"],
    "sasrec-reference": REFERENCE,
    # Ablations of the reference configuration (not run unless named in --configs): each
    # undoes one training choice that raised NDCG@10 here.
    "ablate-last-window": [*REFERENCE, "--train-windows", "last"],
    "ablate-projection": [*REFERENCE, "--user-projection", "true"],
    "ablate-pre-ln": [*REFERENCE, "--sasrec-layout", "pre_ln", "--adam-beta2", "0.999"],
    # The reference with a sampled softmax (1,024 uniform negatives + in-batch, log-Q), with
    # dense Adam and with LazyAdam (row-sparse table updates).
    "reference-sampled-adam": [*REFERENCE, "--negatives", "sampled", "--optimizer", "adam"],
    "reference-sampled-lazy": [*REFERENCE, "--negatives", "sampled", "--optimizer", "lazy_adam"],
}
# Making text pay off (docs/results.md "Text"): each technique alone and together on the full model.
CONFIGS.update({
    # Rows of docs/results.md text tables, each exactly as run: "old negatives" rows ran while
    # never-trained items were still softmax negatives (--unseen-negatives true), and every
    # row names its id dropout because the default (auto) depends on the data.
    "sasrec-unseen-negatives": ["--user-tower", "sasrec", "--id-dropout", "0",
                                "--unseen-negatives", "true"],
    "sasrec-no-id-dropout": ["--user-tower", "sasrec", "--id-dropout", "0"],
    "sasrec-id-dropout": ["--user-tower", "sasrec", "--id-dropout", "0.3"],
    "sasrec-id-dropout-0.5": ["--user-tower", "sasrec", "--id-dropout", "0.5"],
    "sasrec-text-init": ["--user-tower", "sasrec", "--id-dropout", "0", "--id-init", "text",
                         "--unseen-negatives", "true"],
    "sasrec-text-init-id-dropout": ["--user-tower", "sasrec", "--id-init", "text",
                                    "--id-dropout", "0.3"],
    "sasrec-moe": ["--user-tower", "sasrec", "--id-dropout", "0", "--text-experts", "4",
                   "--unseen-negatives", "true"],
    "sasrec-no-ranking": ["--user-tower", "sasrec", "--ranking-weight", "0"],
    "reference-dropout-0.5": [*REFERENCE, "--dropout", "0.5"],
    # Shorter text: each item's text cut to its first 8 tokens (ml-1m: about the title and
    # year, without the genres).
    "sasrec-short-text": ["--user-tower", "sasrec", "--text-max-length", "8"],
    # The content term (towers/item_tower.py, on by default with text) off: the model before it.
    "sasrec-no-content": ["--user-tower", "sasrec", "--content-term", "off"],
    # Id embeddings bounded: a warm item = its text + metadata vector + an offset of norm <= 0.5.
    "sasrec-id-max-norm": ["--user-tower", "sasrec", "--id-max-norm", "0.5"],
})
DEFAULT_CONFIGS = ["sasrec", "gru", "sasrec-reference"]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--text-model", default="distilbert-base-uncased",
                        help="falls back to the packaged MiniLM when it can't be downloaded")
    parser.add_argument("--work", default=str(ROOT / "data" / "bench"))
    parser.add_argument("--train-args", default="",
                        help="extra train.py flags for every run, e.g. '--cold-items 0.1'")
    parser.add_argument("--prepare-args", default="",
                        help="extra prepare_data.py flags, e.g. '--max-user-events 5' (the "
                             "variant gets its own data directory)")
    args = parser.parse_args()

    unknown = sorted(set(args.configs.split(",")) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    prepare_args, max_len = DATASETS[args.dataset]
    work = Path(args.work)
    variant = "".join(c if c.isalnum() else "-" for c in args.prepare_args).strip("-")
    data = work / (f"{args.dataset}-{variant}" if variant else args.dataset)
    run([sys.executable, "prepare_data.py", *prepare_args, *args.prepare_args.split(),
         "--out", str(data)])
    rows = []
    for name in args.configs.split(","):
        runs_dir = work / "runs" / f"{data.name}-{name}"
        cmd = [sys.executable, "train.py", "--data", str(data),
               "--out", str(work / "models" / f"{args.dataset}-{name}"),
               "--runs-dir", str(runs_dir), "--max-seq-len", str(max_len),
               "--epochs", str(args.epochs), "--time-budget-minutes", str(args.budget_minutes),
               "--export", "false", "--text-model", args.text_model, "--text-fallback", "true",
               *CONFIGS[name], *args.train_args.split()]
        started = time.time()
        run(cmd)
        run_dir = max(runs_dir.glob("*"), key=lambda p: p.stat().st_mtime)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metadata = json.loads((run_dir / "metadata.json").read_text())
        text = metrics["text_encoder"]
        text = "all-MiniLM-L6-v2" if "minilm" in text.lower() else Path(text).name
        row = {"dataset": args.dataset, "variant": args.prepare_args,
               "train_args": args.train_args, "config": name, "text": text,
               "hr@10": metrics["test"]["hr@10"], "ndcg@10": metrics["test"]["ndcg@10"],
               "mrr": metrics["test"]["mrr"],
               "pop_hr@10": metrics["popularity_test"]["hr@10"],
               "pop_ndcg@10": metrics["popularity_test"]["ndcg@10"],
               "knn_ndcg@10": metrics.get("text_knn_test", {}).get("ndcg@10"),
               "cold_ndcg@10": metrics.get("cold_test", {}).get("ndcg@10"),
               "cold_knn_ndcg@10": metrics.get("cold_text_knn_test", {}).get("ndcg@10"),
               "cold_shelf_ndcg@10": metrics.get("cold_test_among_cold", {}).get("ndcg@10"),
               "cold_knn_shelf_ndcg@10": metrics.get("cold_text_knn_test_among_cold",
                                                     {}).get("ndcg@10"),
               "calibration": metrics.get("score_calibration"),
               "slices": {name: {"users": entry["users"],
                                 **{scorer: entry[scorer]["ndcg@10"] for scorer in entry
                                    if scorer != "users"}}
                          for name, entry in metrics.get("slices", {}).items()},
               "epochs": metrics["epochs"], "best_epoch": metrics["best_epoch"],
               "s/epoch": metrics["seconds_per_epoch"],
               "positions/s": metrics["positions_per_second"],
               "peak_mb": metadata["peak_rss_mb"], "wall_s": round(time.time() - started),
               "budget_min": args.budget_minutes, "run_dir": str(run_dir)}
        rows.append(row)
        results = ROOT / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        with open(results / "quality.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    print("\n| data set | tower | text | HR@10 | NDCG@10 | pop HR@10 | pop NDCG@10 | epochs "
          "| s/epoch | positions/s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['config']} | {r['text']} | {r['hr@10']:.4f} "
              f"| {r['ndcg@10']:.4f} | {r['pop_hr@10']:.4f} | {r['pop_ndcg@10']:.4f} "
              f"| {r['epochs']} | {r['s/epoch']:.1f} | {r['positions/s']:,.0f} "
              f"| {r['peak_mb']:,.0f} |")
    print_slices(rows)
    return 0


def print_slices(rows: list[dict]) -> None:
    """NDCG@10 by slice, each model beside the popularity and text kNN baselines."""
    names = [n for n in rows[0]["slices"] if any(r["slices"][n]["users"] for r in rows)]
    if not names:
        return
    print("\nNDCG@10 by slice: model (popularity / text kNN); users in the header")
    print("| tower | " + " | ".join(f"{n} ({rows[0]['slices'][n]['users']:,})" for n in names)
          + " |")
    print("|---|" + "---|" * len(names))
    for r in rows:
        cells = []
        for n in names:
            entry = r["slices"][n]
            knn = f" / {entry['text_knn']:.4f}" if "text_knn" in entry else ""
            cells.append(f"{entry['model']:.4f} ({entry['popularity']:.4f}{knn})")
        print(f"| {r['config']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
