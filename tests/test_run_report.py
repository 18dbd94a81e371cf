"""report.html of a run: one page that opens offline (inlined PNGs, nothing fetched), the slices
table, the ScaNN curve once the run is exported, SASRec attention weights, and the errors of
`train.py report`."""

import base64
import html
import io
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from towers.model import TwoTowerModel
from training.run_report import FIGURES, REPORT, write_run_report

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Every <img> src and every tag that could load something from elsewhere."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.loaders = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag in ("script", "link", "iframe", "object", "embed"):
            self.loaders.append(tag)


def test_report_is_self_contained_with_slices_and_the_scann_curve(tiny_export):
    run_dir, export_dir, metrics = tiny_export
    assert "Not exported yet" in (run_dir / REPORT).read_text()  # as training wrote it

    page = write_run_report(run_dir).read_text()  # now finds the run's export
    parsed = _Page(page)
    assert len(parsed.images) == len(FIGURES) and not parsed.loaders
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert png[:8] == PNG_SIGNATURE
        assert min(Image.open(io.BytesIO(png)).size) > 50
    assert "http://" not in page and "https://" not in page
    for name, entry in metrics["slices"].items():
        assert (f"<td>{html.escape(name)}</td>" in page) == (entry["users"] > 0), name
    version = max(int(p.name) for p in export_dir.iterdir() if p.name.isdigit())
    assert "ScaNN tuning curve" in page and f"Version {version} " in page
    assert "Not exported yet" not in page
    # The tiny model has the content term: its learned weights are shown, one row per count,
    # g for 0 (known only by text), 1, 5, 50 and 500 training interactions.
    content = page[page.index("<h2>Content term</h2>"):page.index("Item embedding atlas")]
    assert content.count("<tr>") == 1 + 5 and "g (candidate)" in content
    vectors = page[page.index("Item vectors by popularity"):]
    assert "mean norm" in vectors and "<td>head</td>" in vectors
    for name in [REPORT, *FIGURES.values()]:
        assert (run_dir / name).stat().st_size > 0
    assert not list(run_dir.glob(".*.tmp-*"))


def test_attention_rows_sum_to_one_over_real_items(tiny_export):
    run_dir, _, _ = tiny_export
    model, spec = TwoTowerModel.from_run(run_dir)
    history = tf.constant([[0, 0, 0, 0, 0, 3, 4, 5], [0, 0, 1, 2, 3, 4, 5, 6], [7] * 8])
    events = tf.where(history > 0, 1, 0)
    embedded = tf.gather(model.all_item_vectors()[:, :spec.dim], history)
    real = history > 0
    weights = model.user_tower.attention_weights(embedded, real, events)
    assert len(weights) == spec.num_blocks
    real = real.numpy()
    visible = np.tril(np.ones((8, 8), bool))[None] & real[:, :, None] & real[:, None, :]
    for w in weights:
        w = w.numpy()  # [batch, heads, query, key]
        assert w.shape == (3, spec.num_heads, 8, 8)
        np.testing.assert_allclose(w.sum(-1), np.broadcast_to(real[:, None], w.shape[:3]),
                                   atol=1e-5)
        assert (w[~np.broadcast_to(visible[:, None], w.shape)] == 0).all()
        assert (w[np.broadcast_to(visible[:, None], w.shape)] > 0).all()
    # Asking for the weights leaves the output alone.
    encoder = model.user_tower.encoder
    with_weights, _ = encoder(embedded, history > 0, event_types=events, training=False,
                              return_attention=True)
    np.testing.assert_array_equal(with_weights.numpy(), encoder(
        embedded, history > 0, event_types=events, training=False).numpy())


def test_report_of_an_unfinished_run_fails_and_writes_nothing(tmp_path):
    half = tmp_path / "half-run"
    half.mkdir()
    (half / "config.yaml").write_text("dim: 16\n")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "report", "--run",
                             str(half)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not a finished run directory" in result.stderr and "model_spec.json" in result.stderr
    assert [p.name for p in half.iterdir()] == ["config.yaml"]
    with pytest.raises(ValueError, match="no such run directory"):
        write_run_report(tmp_path / "no-such-run")


def test_report_shows_the_cold_shelf_and_the_score_calibration():
    from training.run_report import metrics_tables

    def scored(ndcg, users=7):
        return {"users": users, "hr@10": 0.5, "ndcg@10": ndcg, "mrr": 0.2, "coverage@10": 0.3}
    results = {"test": {**scored(0.2, 70), "ndcg@10_low": 0.1625, "ndcg@10_high": 0.2375},
               "popularity_test": scored(0.01, 70),
               "text_knn_test": scored(0.1, 70), "cold_items": 12,
               "cold_test": scored(0.0811), "cold_popularity_test": scored(0.0),
               "cold_text_knn_test": scored(0.1234),
               "cold_test_among_cold": scored(0.2718), "cold_text_knn_test_among_cold":
               scored(0.2345),
               "score_calibration": {"users": 70, "cold_share_of_top10": 0.083,
                                     "warm_top10": {"mean": 4.5, "p90": 6.25, "p99": 7.75},
                                     "cold_top10": {"mean": 3.125, "p90": 4.5, "p99": 6.5}}}
    html = metrics_tables(results)
    for figure in ("0.2718", "0.2345", "0.0811", "0.1234", "8.3%", "7.7500", "3.1250",
                   "among cold", "0.1625-0.2375"):
        assert figure in html, figure
    assert "among cold" not in metrics_tables({k: v for k, v in results.items()
                                               if "cold" not in k})
