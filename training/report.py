"""What a finished run reports: metrics.json, training curves, metadata.json (where the data
came from, versions, device, time, memory), report.html (training/run_report.py) and the
summary lines the CLI prints."""

from __future__ import annotations

import hashlib
import json
import math
import resource
from pathlib import Path

import pandas as pd

from towers import run_dir as run_files
from towers.run_dir import package_versions
from training.evaluate import interval_text
from training.run_report import try_run_report
from training.slices import slice_lines


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_curves(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(history["epoch"] + 1, history["loss"], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    right.plot(history["epoch"] + 1, history["val_ndcg@10"], marker="o", label="NDCG@10")
    right.plot(history["epoch"] + 1, history["val_hr@10"], marker="o", label="HR@10")
    right.set(xlabel="epoch", title="validation (full catalog)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, results: dict, metadata: dict, manifest: dict,
                 html: bool = True) -> None:
    """metrics.json, training_curves.png (from history.csv), metadata.json and (unless `html`
    is false: a cluster's non-chief worker, whose run directory is thrown away) report.html."""
    (run_dir / run_files.METRICS).write_text(json.dumps(results, indent=2))
    plot_curves(pd.read_csv(run_dir / run_files.HISTORY), run_dir / run_files.CURVES)
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    metadata = {"data": metadata.pop("data"),
                "data_manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                "versions": package_versions(), **metadata,
                "peak_rss_mb": round(peak_rss_mb(), 1)}
    (run_dir / run_files.METADATA).write_text(json.dumps(metadata, indent=2))
    if html:
        try_run_report(run_dir)


def summary_lines(results: dict) -> list[str]:
    """The run's test results as a person reads them."""
    test, pop = results["test"], results["popularity_test"]
    lines = [f"test (full catalog, {test['users']:,} users): HR@10 {test['hr@10']:.4f}  "
             f"NDCG@10 {test['ndcg@10']:.4f}  MRR {test['mrr']:.4f}  "
             f"coverage@10 {test['coverage@10']:.3f}"]
    if interval := interval_text(test):
        lines.append(f"  NDCG@10 95% interval over the test users: {interval} (runs closer "
                     f"than its half-width are not told apart)")
    lines += [f"popularity baseline:             HR@10 {pop['hr@10']:.4f}  "
              f"NDCG@10 {pop['ndcg@10']:.4f}  MRR {pop['mrr']:.4f}"]
    if "text_knn_test" in results:
        knn = results["text_knn_test"]
        lines.append(f"text kNN baseline (last item):   HR@10 {knn['hr@10']:.4f}  "
                     f"NDCG@10 {knn['ndcg@10']:.4f}  MRR {knn['mrr']:.4f}")
    if "sampled_hr@10" in test:
        lines.append(f"sampled ({results['sampled_negatives']} negatives, not comparable to "
                     f"full): HR@10 {test['sampled_hr@10']:.4f}  "
                     f"NDCG@10 {test['sampled_ndcg@10']:.4f}")
    if "cold_test" in results:
        cold = results["cold_test"]
        lines.append(f"cold items ({cold['users']} test users): HR@10 {cold['hr@10']:.4f}  "
                     f"NDCG@10 {cold['ndcg@10']:.4f}")
        shelf = results.get("cold_test_among_cold")
        knn = results.get("cold_text_knn_test")
        knn_shelf = results.get("cold_text_knn_test_among_cold")
        if knn:
            lines.append(f"  text kNN on them:              NDCG@10 {knn['ndcg@10']:.4f}")
        if shelf:
            lines.append(f"  ranked among cold items only:  NDCG@10 {shelf['ndcg@10']:.4f}"
                         + (f" (text kNN {knn_shelf['ndcg@10']:.4f})" if knn_shelf else ""))
        calibration = results.get("score_calibration") or {}
        warm, cold_top = calibration.get("warm_top10"), calibration.get("cold_top10")
        if warm and cold_top:
            lines.append(f"  top-10 scores, warm vs cold items: mean {warm['mean']:.2f} vs "
                         f"{cold_top['mean']:.2f}, p90 {warm['p90']:.2f} vs "
                         f"{cold_top['p90']:.2f}, p99 {warm['p99']:.2f} vs "
                         f"{cold_top['p99']:.2f}; cold share of the top 10 "
                         f"{calibration['cold_share_of_top10']:.1%}")
    if "slices" in results:
        lines.extend(slice_lines(results["slices"]))
    if math.isfinite(results["positions_per_second"]):
        lines.append(f"{results['epochs']} epochs, {results['seconds_per_epoch']:.1f}s/epoch, "
                     f"{results['positions_per_second']:,.0f} positions/s")
    return lines
