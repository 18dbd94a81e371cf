"""The run report: report.html in the run directory, one page that opens offline (every figure
an inlined PNG, also saved beside it; no scripts or stylesheets from elsewhere) with the training
curves, the test metrics beside the baselines and by slice, an atlas of the item vectors, SASRec
attention maps of a few test users and, once the run is exported, the ScaNN tuning curve.

Built from the run directory (and an export of it) alone: at the end of training, after
`train.py export` and by `train.py report --run RUN`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from towers import run_dir as run_files
from towers.model import TwoTowerModel
from towers.spec import ModelSpec
from training.evaluate import interval_text
from training.slices import ITEM_BUCKETS, item_buckets

log = logging.getLogger(__name__)

REPORT = "report.html"
FIGURES = {"curves": "report_curves.png", "atlas": "report_atlas.png",
           "attention": "report_attention.png", "scann": "report_scann.png"}
VERSION_METADATA = "metadata.json"  # export/contract.py METADATA (training cannot import it)
VERSION_NAME = re.compile(r"[0-9]+")  # as serving/model_store.py: str.isdigit() accepts "²"
ATLAS_POINTS = 20_000  # most items drawn in the atlas (the labelled ones always are)
ATLAS_LABELS = 15  # most-interacted items named in the atlas
ATLAS_CATEGORIES = 10  # the rest are "other"
ATTENTION_USERS = 3
SCORE_USERS = 500  # test-split users whose scores of each item bucket are summarised
ATTENTION_HISTORY = 10  # attention users have at least this many items (if anyone has)
NO_ATTENTION = ("The GRU user tower has no attention: its state after the newest item is a "
                "recurrence over the whole history, with no weight per item to show.")
SCORERS = {"model": "model", "popularity": "popularity", "text_knn": "text kNN"}
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right}th:first-child,td:first-child{text-align:left}img{max-width:100%}
.note{color:#555}"""


def write_run_report(run_dir: str | Path, version_dir: Path | None = None) -> Path:
    """Write report.html and its PNGs into a finished run directory; returns the report's path.

    `version_dir` is an export of the run; by default the newest one under the export directory
    the run recorded, if any."""
    started = time.time()
    run_dir = run_files.check_run_dir(run_dir)
    missing = [name for name in (run_files.METRICS, run_files.HISTORY)
               if not (run_dir / name).exists()]
    if missing:
        raise ValueError(f"{run_dir}: the run has not finished (missing {', '.join(missing)})")
    results = json.loads((run_dir / run_files.METRICS).read_text())
    history = pd.read_csv(run_dir / run_files.HISTORY)
    items = pd.read_parquet(run_dir / run_files.ITEMS)
    histories = pd.read_parquet(run_dir / run_files.USER_HISTORIES)
    version_dir = version_dir or newest_export(run_dir)
    export = (json.loads((version_dir / VERSION_METADATA).read_text())
              if version_dir else None)
    model, spec = TwoTowerModel.from_run(run_dir)
    vectors = tf.cast(model.all_item_vectors(), tf.float32).numpy()  # [num_items + 1, dim]

    pngs = {"curves": curves_png(history)}
    pngs["atlas"], atlas_note = atlas_png(vectors, items)
    pngs["attention"], attention_note = (
        attention_png(model, spec, vectors, items, histories) if spec.user_tower == "sasrec"
        else (None, NO_ATTENTION))
    pngs["scann"] = scann_png(export["scann"]) if export else None
    sections = [
        _section("Training curves", pngs["curves"], "Loss, validation metrics (full catalog) "
                 "and training speed per epoch."),
        "<h2>Test metrics (full catalog)</h2>" + metrics_tables(results),
        "<h2>Test metrics by slice</h2>" + slices_table(results.get("slices", {})),
        "<h2>Item vectors by popularity</h2><p class='note'>Length of the item-tower vectors "
        "and the scores test-split users give them, by the items' training interactions (head, "
        "torso, tail, cold as in the slices).</p>"
        + vector_table(model, spec, vectors, items, histories),
        content_section(model, spec),
        _section("Item embedding atlas", pngs["atlas"], atlas_note),
        _section("Attention of the newest position", pngs["attention"], attention_note),
        export_section(export, version_dir, pngs["scann"])]
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{_e(run_dir.name)}"
            f"</title><style>{STYLE}</style></head><body>\n<h1>Run {_e(run_dir.name)}</h1>\n"
            f"{run_summary(results, spec)}\n" + "\n".join(sections) + "\n</body></html>\n")
    for name, png in pngs.items():
        if png is not None:
            _write_atomic(run_dir / FIGURES[name], png)
    _write_atomic(run_dir / REPORT, page.encode())
    log.info("report: %s (%.1fs)", run_dir / REPORT, time.time() - started)
    return run_dir / REPORT


def try_run_report(run_dir: Path, version_dir: Path | None = None) -> None:
    """write_run_report after work that is already done (training, an export): a figure that
    cannot be drawn must not cost the run its export nor the export its exit code, so a failure
    is logged with the command that retries it."""
    try:
        write_run_report(run_dir, version_dir)
    except Exception:
        log.exception("report.html was not written; the run is complete (retry: python "
                      "train.py report --run %s)", run_dir)


def newest_export(run_dir: Path) -> Path | None:
    """The newest VERSION under the run's recorded export directory exported from this run."""
    info_file = run_dir / run_files.EXPORT_INFO
    export_dir = json.loads(info_file.read_text()).get("export_dir") if info_file.exists() else None
    if not export_dir or not Path(export_dir).is_dir():
        return None
    versions = sorted((p for p in Path(export_dir).iterdir()
                       if VERSION_NAME.fullmatch(p.name) and (p / VERSION_METADATA).exists()),
                      key=lambda p: int(p.name), reverse=True)
    return next((v for v in versions if json.loads((v / VERSION_METADATA).read_text())
                 .get("run_dir") == str(run_dir.resolve())), None)


# ---- figures (PNG bytes) ----
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _short(text: object, width: int = 32) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _titles(items: pd.DataFrame) -> np.ndarray:
    """Each item's title (its text, else its id) by item_idx; 0 is padding."""
    text = items["text"].fillna("").astype(str).to_numpy()
    titles = np.full(int(items["item_idx"].to_numpy().max(initial=0)) + 1, "", dtype=object)
    titles[items["item_idx"].to_numpy()] = np.where(text != "", text,
                                                    items["item_id"].astype(str).to_numpy())
    return titles


def curves_png(history: pd.DataFrame) -> bytes:
    epoch = history["epoch"] + 1
    fig, (loss, valid, speed) = _pyplot().subplots(1, 3, figsize=(14, 3.6))
    loss.plot(epoch, history["loss"], marker="o")
    loss.set(xlabel="epoch", title="training loss")
    checked = history.dropna(subset=["val_ndcg@10"])  # epochs validated (training/scoring.py)
    valid.plot(checked["epoch"] + 1, checked["val_ndcg@10"], marker="o", label="NDCG@10")
    valid.plot(checked["epoch"] + 1, checked["val_hr@10"], marker="o", label="HR@10")
    valid.set(xlabel="epoch", title="validation (full catalog)")
    valid.legend()
    if "positions_per_second" in history:
        speed.plot(epoch, history["positions_per_second"], marker="o")
    speed.set(xlabel="epoch", title="training positions / s")
    return _png(fig)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of x [n, d] on their first two principal components, and each one's variance share."""
    centered = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    return centered @ vt[:2].T, (s[:2] ** 2) / max(float((s ** 2).sum()), 1e-12)


def atlas_png(vectors: np.ndarray, items: pd.DataFrame, seed: int = 0) -> tuple[bytes, str]:
    """The item vectors in 2-D (PCA), coloured by category, the most-interacted items named."""
    counts = items["train_count"].to_numpy()
    labelled = [i for i in np.argsort(-counts, kind="stable")[:ATLAS_LABELS] if counts[i] > 0]
    rows = np.arange(len(items))
    if len(rows) > ATLAS_POINTS:
        others = np.setdiff1d(rows, labelled)
        rows = np.union1d(labelled, np.random.default_rng(seed).choice(
            others, ATLAS_POINTS - len(labelled), replace=False))
    item_idx = items["item_idx"].to_numpy()
    xy, share = pca_2d(vectors[item_idx[rows]])
    categories = items["category"].fillna("").astype(str).to_numpy()[rows]
    top = pd.Series(categories[categories != ""]).value_counts().index[:ATLAS_CATEGORIES]
    groups = np.where(np.isin(categories, top), categories, "other")
    fig, ax = _pyplot().subplots(figsize=(11, 8))
    ax.scatter(*xy[groups == "other"].T, s=5, c="#bbbbbb", alpha=0.6,
               label="other" if len(top) else "items")
    for name in top:
        ax.scatter(*xy[groups == name].T, s=5, alpha=0.7, label=_short(name, 24))
    position, titles = {row: i for i, row in enumerate(rows)}, _titles(items)
    for i in labelled:
        ax.annotate(_short(titles[item_idx[i]]), xy[position[i]], fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
        ax.scatter(*xy[position[i]], s=18, facecolors="none", edgecolors="black")
    ax.set(xlabel=f"PC1 ({share[0]:.0%} of variance)", ylabel=f"PC2 ({share[1]:.0%})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=3, fontsize=8)
    note = (f"{len(rows):,} of {len(items):,} item-tower vectors projected on their first two "
            "principal components"
            + (f", coloured by category (the {len(top)} largest, the rest 'other')" if len(top)
               else " (no category in the item table)")
            + f"; the {len(labelled)} items with the most training interactions are named.")
    return _png(fig), note


def attention_users(histories: pd.DataFrame, items: pd.DataFrame, spec: ModelSpec,
                    count: int = ATTENTION_USERS, seed: int = 0):
    """A few users' test-split inputs (history minus the last item, newest max_seq_len, left-
    padded): (user ids, item_idx [n, max_seq_len], event type ids [n, max_seq_len] or None)."""
    lengths = histories["history"].map(len).to_numpy() - 1
    eligible = np.flatnonzero(lengths >= min(ATTENTION_HISTORY, spec.max_seq_len,
                                             max(lengths.max(initial=0), 1)))
    chosen = np.sort(np.random.default_rng(seed).choice(
        eligible, min(count, len(eligible)), replace=False))
    item_idx = dict(zip(items["item_id"].astype(str), items["item_idx"]))
    event_id = {name: i + 1 for i, name in enumerate(spec.event_vocab)}
    history = np.zeros((len(chosen), spec.max_seq_len), np.int32)
    events = np.zeros_like(history)
    for row, u in enumerate(chosen):
        ids = list(histories["history"].iloc[u])[:-1][-spec.max_seq_len:]
        history[row, spec.max_seq_len - len(ids):] = [item_idx[i] for i in ids]
        if spec.num_event_types:
            kinds = list(histories["event_types"].iloc[u])[:-1][-spec.max_seq_len:]
            events[row, spec.max_seq_len - len(ids):] = [event_id[k] for k in kinds]
    return (histories["user_id"].to_numpy()[chosen], history,
            events if spec.num_event_types else None)


def attention_png(model: TwoTowerModel, spec: ModelSpec, vectors: np.ndarray,
                  items: pd.DataFrame, histories: pd.DataFrame) -> tuple[bytes | None, str]:
    """Per test user and block: the newest position's attention over the history."""
    users, history, events = attention_users(histories, items, spec)
    if not len(users):
        return None, "No user has a test-split history to show."
    weights = model.user_tower.attention_weights(
        tf.gather(vectors[:, :spec.dim], history), tf.constant(history > 0),
        None if events is None else tf.constant(events))
    newest = np.stack([w[:, :, -1, :].numpy().mean(axis=1) for w in weights], 1)  # [u, b, seq]
    titles, lengths = _titles(items), (history > 0).sum(axis=1)
    fig, axes = _pyplot().subplots(
        len(users), spec.num_blocks, squeeze=False, sharex=True,
        figsize=(3.2 * spec.num_blocks + 3, 0.22 * lengths.sum() + 1.1 * len(users)),
        gridspec_kw={"height_ratios": np.maximum(lengths, 2)})
    for row, (user, n) in enumerate(zip(users, lengths)):
        for block, ax in enumerate(axes[row]):
            ax.barh(np.arange(n), newest[row, block, -n:], color="tab:blue")
            ax.set_yticks(np.arange(n), [_short(t, 28) for t in titles[history[row, -n:]]],
                          fontsize=7)
            ax.tick_params(labelleft=block == 0)
            ax.invert_yaxis()  # oldest on top, newest at the bottom
            ax.set_title(f"user {_short(user, 20)}, block {block + 1}", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("attention weight")
    note = (f"{len(users)} test users (each one's history without its last item, as in the test "
            "split, newest at the bottom): the weight the newest position gives each item, one "
            f"panel per block, averaged over the {spec.num_heads} head(s).")
    return _png(fig), note


def vector_table(model: TwoTowerModel, spec: ModelSpec, vectors: np.ndarray,
                 items: pd.DataFrame, histories: pd.DataFrame) -> str:
    """Item vectors by popularity bucket (training/slices.py): how long they are and how the
    users of the test split score them. A cold item can only be recommended if its vector
    lives on the scale and in the region of warm ones."""
    counts = np.zeros(len(vectors), np.int64)
    counts[items["item_idx"].to_numpy()] = items["train_count"].to_numpy()
    buckets = item_buckets(counts)
    _, history, events = attention_users(histories, items, spec, count=SCORE_USERS)
    scores = None
    if len(history):
        users = model.user_vector(tf.constant(history), tf.constant(vectors),
                                  None if events is None else tf.constant(events))
        scores = tf.cast(users, tf.float32).numpy() @ vectors.T  # [users, num_items + 1]
    norms = np.linalg.norm(vectors, axis=1)
    rows = []
    for code, name in enumerate(ITEM_BUCKETS):
        members = np.flatnonzero(buckets == code)
        members = members[members > 0]  # not the padding row
        if not len(members):
            continue
        row = [name, f"{len(members):,}", _number(float(norms[members].mean())),
               _number(float(np.median(norms[members])))]
        if scores is not None:
            bucket_scores = scores[:, members]
            row += [_number(float(bucket_scores.mean())),
                    _number(float(np.percentile(bucket_scores, 99)))]
        rows.append(row)
    header = ["items", "count", "mean norm", "median norm"]
    if scores is not None:
        header += [f"mean score ({len(history)} users)", "99th pct score"]
    return _table(header, rows)


def scann_png(scann: dict) -> bytes:
    """recall@10 against latency for each (leaves_to_search, reorder) tuning tried."""
    curve = pd.DataFrame(scann["tuning_curve"])
    fig, ax = _pyplot().subplots(figsize=(8, 4.5))
    for leaves, points in curve.groupby("leaves_to_search"):
        ax.plot(points["ms_per_query"], points["recall@10"], marker="o",
                label=f"{leaves} leaves searched")
        for x, y, reorder in zip(points["ms_per_query"], points["recall@10"],
                                 points["reorder"]):
            ax.annotate(f"r{reorder}", (x, y), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
    chosen = curve[(curve["leaves_to_search"] == scann["leaves_to_search"])
                   & (curve["reorder"] == scann["reorder"])]
    ax.scatter(chosen["ms_per_query"], chosen["recall@10"], marker="*", s=250, c="tab:red",
               zorder=3, label=f"chosen: {scann['leaves_to_search']} leaves, "
               f"reorder {scann['reorder']}")
    ax.set(xlabel="ms per query (median, one query)", ylabel="recall@10 vs exact",
           title=f"ScaNN tuning ({scann['num_leaves']} leaves; r = reorder)")
    ax.legend(fontsize=8)
    return _png(fig)


# ---- HTML ----
def _e(value: object) -> str:
    return html.escape(str(value))


def _number(value: object, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[object]]) -> str:
    cells = lambda row, tag: "".join(f"<{tag}>{_e(c)}</{tag}>" for c in row)  # noqa: E731
    return (f"<table><tr>{cells(header, 'th')}</tr>"
            + "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows) + "</table>")


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _section(title: str, png: bytes | None, note: str) -> str:
    return (f"<h2>{_e(title)}</h2>\n<p class='note'>{_e(note)}</p>\n"
            + (_img(png, title) if png is not None else ""))


def run_summary(results: dict, spec: ModelSpec) -> str:
    tower = (f"SASRec ({spec.num_blocks} blocks, {spec.num_heads} heads, {spec.sasrec_layout})"
             if spec.user_tower == "sasrec" else f"GRU4Rec ({spec.gru_layers} layers)")
    return _table(["", ""], [
        ["user tower", f"{tower}, dim {spec.dim}, history {spec.max_seq_len}"],
        ["items", f"{spec.num_items:,} (text: {spec.text_source})"],
        ["retrieval / ranking", f"{spec.retrieval_mode} softmax / {spec.ranking_mode}"],
        ["epochs", f"{results['epochs']} (best {results['best_epoch']}, valid NDCG@10 "
                   f"{results['best_valid_ndcg@10']:.4f})"],
        ["speed", f"{results['seconds_per_epoch']:.1f} s/epoch, "
                  f"{results['positions_per_second']:,.0f} positions/s"],
        ["report built", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())]])


def metrics_tables(results: dict) -> str:
    """Overall test metrics of the model and the baselines; the cold-item targets if any."""
    rows = [[label, _number(m.get("users")), *(_number(m.get(k)) for k in
                                                ("hr@10", "ndcg@10", "mrr", "coverage@10")),
             interval_text(m) or "–"]
            for name, label in SCORERS.items()
            if (m := results.get("test" if name == "model" else f"{name}_test"))]
    out = _table(["scorer", "users", "HR@10", "NDCG@10", "MRR", "coverage@10",
                  "NDCG@10 95% interval"], rows)
    cold = [[label, _number(m["users"]), _number(m["hr@10"]), _number(m["ndcg@10"])]
            for name, label in SCORERS.items()
            if (m := results.get("cold_test" if name == "model" else f"cold_{name}_test"))]
    if cold:
        for row in cold:
            name = next(n for n, label in SCORERS.items() if label == row[0])
            shelf = results.get(("cold_test" if name == "model" else f"cold_{name}_test")
                                + "_among_cold")
            row.append(_number(shelf["ndcg@10"]) if shelf else "")
        out += (f"<p>Targets among the {results.get('cold_items', 0):,} held-out (cold) items "
                "(full catalog; last column: ranked among cold items only, a new-arrivals "
                "shelf):</p>" + _table(["scorer", "users", "HR@10", "NDCG@10",
                                        "NDCG@10 among cold"], cold))
    calibration = results.get("score_calibration") or {}
    parts = [(name, calibration.get(f"{name}_top10")) for name in ("warm", "cold")]
    if all(p for _, p in parts):
        out += (f"<p>Model scores of the top 10 warm and top 10 cold items per user "
                f"({calibration['users']:,} test users; cold items are "
                f"{calibration['cold_share_of_top10']:.1%} of the full top 10):</p>"
                + _table(["items", "mean", "p90", "p99"],
                         [[name, *(_number(p[k]) for k in ("mean", "p90", "p99"))]
                          for name, p in parts]))
    return out


CONTENT_COUNTS = (0, 1, 5, 50, 500)
CONTENT_LENGTHS = (1, 5, 20, 50)


def content_section(model: TwoTowerModel, spec: ModelSpec) -> str:
    """The learned content-term weights (towers/item_tower.py ContentWeight): g of a candidate
    and beta of a query by training count (0: known only by text), beta also by history
    length, and the bias of items known only by text. Empty without the term."""
    if not spec.content_term:
        return ""
    weight = model.item_tower.content
    log_counts = np.log1p(np.array(CONTENT_COUNTS, np.float32))
    g, _ = weight.item_terms(tf.constant(log_counts))
    rows = []
    for count, x, g_value in zip(CONTENT_COUNTS, log_counts, g.numpy()):
        betas = [float(weight.beta(tf.fill([1, n], x), tf.ones([1, n], bool))[0, -1])
                 for n in CONTENT_LENGTHS]
        rows.append([f"{count:,}", _number(float(g_value), 3),
                     *(_number(b, 3) for b in betas)])
    bias = float(weight.item_terms(tf.zeros([1]))[1][0])
    return ("<h2>Content term</h2><p class='note'>score = u . v + beta * g * cos(text of the "
            "newest history item, text of the item) + b. g weighs a candidate's text likeness "
            "by its training interactions (0: known only by text); beta weighs the query's, by "
            f"its newest item's interactions and the history length. b of items known only by "
            f"text: {bias:.3f} (0 for the others).</p>"
            + _table(["training interactions", "g (candidate)",
                      *(f"beta, history {n}" for n in CONTENT_LENGTHS)], rows))


def slices_table(slices: dict) -> str:
    """HR@10 / NDCG@10 by target popularity and history length (slices with users only)."""
    scorers = [s for s in SCORERS if any(s in entry for entry in slices.values())]
    rows = [[name, _number(entry["users"]),
             *(_number(entry[s][k]) for s in scorers for k in ("hr@10", "ndcg@10"))]
            for name, entry in slices.items() if entry["users"]]
    if not rows:
        return "<p class='note'>No slices in metrics.json.</p>"
    return _table(["slice", "users", *(f"{SCORERS[s]} {k}" for s in scorers
                                       for k in ("HR@10", "NDCG@10"))], rows)


def export_section(export: dict | None, version_dir: Path | None, png: bytes | None) -> str:
    if export is None:
        return ("<h2>Export</h2>\n<p>Not exported yet: <code>train.py export --run RUN</code> "
                "adds the ScaNN tuning curve here.</p>")
    scann = export["scann"]
    note = (f"Version {export['model_version']} ({version_dir}), exported {export['created']}: "
            f"ScaNN with {scann['num_leaves']} leaves, {scann['leaves_to_search']} searched, "
            f"reorder {scann['reorder']}; recall@10 against brute force "
            f"{scann['recall@10_vs_bruteforce']:.4f} on {scann['recall_users']:,} users.")
    chosen = (scann["leaves_to_search"], scann["reorder"])
    rows = [[p["leaves_to_search"], p["reorder"], _number(p["recall@10"]),
             _number(p["ms_per_query"], 3),
             "chosen" if (p["leaves_to_search"], p["reorder"]) == chosen else ""]
            for p in scann["tuning_curve"]]
    return (_section("Export: ScaNN tuning curve", png, note)
            + _table(["leaves searched", "reorder", "recall@10", "ms/query", ""], rows))


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
