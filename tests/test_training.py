"""train.py end to end on tiny data: run directory contents, loss goes down, config handling,
both towers, sampled softmax, fine-tuning, MirroredStrategy + mixed precision on CPU."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from support import train_tiny, write_processed, write_tiny_distilbert

from training.cli import train_parser
from training.config import TrainConfig, config_from_args
from training.data import expected_pool, load_training_data, retrieval_mode
from training.precision import CPU_BF16_FLAGS, cpu_flags
from training.scoring import VALID_MIN_SECONDS, validation_interval, validation_rows

ROOT = Path(__file__).resolve().parents[1]


def _run_train(args, cwd):
    # As from a fresh shell: without the log settings this test process's tfenv exported.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TRANSFORMERS_VERBOSITY")}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """train.py run once from the command line on tiny data: (workdir, run_dir, result)."""
    tmp_path = tmp_path_factory.mktemp("cli")
    data = write_processed(tmp_path / "data", event_types=("view", "cart", "purchase"))
    bert = write_tiny_distilbert(tmp_path / "bert")
    result = _run_train(["--data", str(data), "--out", str(tmp_path / "models" / "tiny"),
                         "--text-model", str(bert), "--epochs", "4", "--dim", "16",
                         "--max-seq-len", "8", "--patience", "10",
                         # 0.2, not auto's 0.5 for these ~8-event users: at 0.5 four epochs
                         # on random data leave the epoch loss flat within noise
                         "--dropout", "0.2",
                         "--cache-dir", str(tmp_path / "cache"), "--export-k", "10"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path, next((tmp_path / "runs").glob("tiny-*")), result


def test_train_cli_sasrec_end_to_end(cli_run):
    tmp_path, run_dir, result = cli_run
    for name in ("config.yaml", "metadata.json", "history.csv", "metrics.json",
                 "training_curves.png", "model_spec.json", "items.parquet",
                 "user_histories.parquet", "data_manifest.json"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "checkpoints").glob("best*"))
    assert list((run_dir / "tensorboard").rglob("events.out.*"))
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 4
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("hr@10", "ndcg@10", "mrr", "coverage@10", "sampled_ndcg@10"):
        assert 0.0 <= metrics["test"][key] <= 1.0
    assert metrics["popularity_test"]["users"] == metrics["test"]["users"]
    assert metrics["dropout"] == 0.2
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["versions"]["tensorflow"].startswith("2.20")
    assert metadata["peak_rss_mb"] > 0
    assert (tmp_path / "models" / "tiny" / "1" / "retrieval_bruteforce").is_dir()
    assert "test (full catalog" in result.stdout and "run directory:" in result.stdout


def test_console_shows_one_line_per_epoch_and_no_library_noise(cli_run):
    _, _, result = cli_run
    console = result.stdout + result.stderr
    epoch_lines = [line for line in console.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == [f"epoch {i}" for i in range(1, 5)]
    assert all("valid NDCG@10" in line and "loss" in line for line in epoch_lines)
    for noise in ("Epoch 1/4", "Sharding callback", "cuInit", "INFO absl", "INFO tensorflow",
                  "Some weights of", "TensorFlow and JAX classes are deprecated",
                  "absl::InitializeLog", "I0000"):
        assert noise not in console, noise
    assert "text encoder: " in result.stderr


def test_export_needs_only_the_run_directory(cli_run):
    """The prepared data directory (and the text encoder) can be gone: export reads the run."""
    tmp_path, run_dir, _ = cli_run
    shutil.rmtree(tmp_path / "data")
    shutil.rmtree(tmp_path / "bert")
    shutil.rmtree(tmp_path / "cache")
    out = tmp_path / "reexport"
    result = _run_train(["export", "--run", str(run_dir), "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    first, again = tmp_path / "models" / "tiny" / "1", out / "1"
    for name in ("items.parquet", "user_histories.parquet", "item_embeddings.parquet"):
        assert pd.read_parquet(first / name).equals(pd.read_parquet(again / name)), name
    missing = _run_train(["export", "--run", str(tmp_path / "no-such-run"), "--out", str(out)],
                         tmp_path)
    assert missing.returncode == 2 and "no-such-run" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_gru_tower_learns_the_rule(tmp_path):
    _, _, metrics = train_tiny(tmp_path, user_tower="gru", epochs=8, text_model=None,
                               export=False, lr=0.01)
    # Each user walks the catalog in a cycle: popularity cannot know where a user is.
    assert metrics["test"]["hr@10"] > metrics["popularity_test"]["hr@10"]


def test_same_seed_same_metrics(tmp_path):
    first = train_tiny(tmp_path / "a", epochs=2, text_model=None, export=False)[2]
    second = train_tiny(tmp_path / "b", epochs=2, text_model=None, export=False)[2]
    assert first["test"] == second["test"]


def test_sampled_softmax_and_cold_items(tmp_path):
    _, _, metrics = train_tiny(tmp_path, epochs=2, text_model="tiny", export=False,
                               negatives="sampled", num_negatives=8, cold_items=0.25,
                               test_users=40)
    assert metrics["retrieval_mode"] == "sampled" and metrics["optimizer"] == "lazy_adam"
    assert metrics["test"]["users"] == metrics["popularity_test"]["users"] == 40
    assert metrics["cold_items"] == 6
    # 6 of 24 items never trained on: `auto` turns the content term on (sampled softmax path).
    assert json.loads((tmp_path / "run" / "model_spec.json").read_text())["content_term"]
    assert np.isfinite(metrics["cold_test"]["ndcg@10"])
    assert "cold_popularity_test" in metrics
    # The new-arrivals shelf: the same cold targets ranked among the 6 cold items only, so
    # every target is in the top 10 and no scorer can do worse than in the full catalog.
    shelf, knn_shelf = metrics["cold_test_among_cold"], metrics["cold_text_knn_test_among_cold"]
    assert shelf["users"] == metrics["cold_test"]["users"] and shelf["hr@10"] == 1.0
    assert shelf["ndcg@10"] >= metrics["cold_test"]["ndcg@10"]
    assert knn_shelf["ndcg@10"] >= metrics["cold_text_knn_test"]["ndcg@10"]
    calibration = metrics["score_calibration"]
    assert calibration["users"] == 40
    for part in ("warm_top10", "cold_top10"):
        assert calibration[part]["mean"] <= calibration[part]["p90"] <= calibration[part]["p99"]
    assert 0.0 <= calibration["cold_share_of_top10"] <= 1.0


def test_finetune_mirrored_mixed_precision_on_cpu(tmp_path):
    try:  # float16 forced: emulated on this CPU, but the loss-scaled path runs
        _, _, metrics = train_tiny(tmp_path, epochs=1, text_model="tiny", export=False,
                                   text_mode="finetune", negatives="sampled", num_negatives=8,
                                   distribute="mirrored", mixed_precision="float16")
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(metrics["test"]["ndcg@10"])
    run = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert run["strategy"] == "MirroredStrategy" and run["precision"] == "mixed_float16"
    assert run["precision_reason"] == "--mixed-precision float16"


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dim: 32\nuser_tower: gru\nepochs: 7\n")
    args = train_parser().parse_args(["--data", "d", "--out", "o", "--config", str(path),
                                       "--epochs", "3", "--logq-correction", "false"])
    config = config_from_args(args)
    assert (config.dim, config.user_tower, config.epochs) == (32, "gru", 3)
    assert config.logq_correction is False
    assert config.lr == TrainConfig().lr


@pytest.mark.parametrize("yaml_text, message", [
    ("dimm: 3\n", "unknown setting"), ("user_tower: lstm\n", "user_tower"),
    ("- a\n", "mapping")])
def test_bad_config_file(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    args = train_parser().parse_args(["--data", "d", "--out", "o", "--config", str(path)])
    with pytest.raises(ValueError, match=message):
        config_from_args(args)


def test_cli_errors_exit_nonzero(tmp_path):
    missing = _run_train(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                         tmp_path)
    assert missing.returncode == 2 and "nope" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_flag = _run_train(["--data", str(tmp_path), "--out", "o", "--user-tower", "lstm"],
                          tmp_path)
    assert bad_flag.returncode == 2 and "user_tower" in bad_flag.stderr
    no_text = _run_train(["--data", str(tmp_path), "--out", "o", "--text-model", "none",
                          "--content-term", "on"], tmp_path)
    assert no_text.returncode == 2 and "content_term" in no_text.stderr
    assert "Traceback" not in no_text.stderr
    if not cpu_flags() & set(CPU_BF16_FLAGS):  # a CPU without 16-bit arithmetic: refused
        data = write_processed(tmp_path / "data")
        on = _run_train(["--data", str(data), "--out", "o", "--mixed-precision", "on"],
                        tmp_path)
        assert on.returncode == 2 and "--mixed-precision on" in on.stderr
        assert "amx_bf16" in on.stderr and "Traceback" not in on.stderr
        assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("settings, named", [
    ({"content_term": "on", "text_mode": "finetune"}, "content_term"),
    ({"content_term": "maybe"}, "content_term"), ({"content_beta": 0.0}, "content_beta"),
    ({"id_max_norm": -1.0}, "id_max_norm")])
def test_content_settings_that_cannot_work_are_refused(settings, named):
    with pytest.raises(ValueError, match=named):
        TrainConfig(**settings).validate()


def test_expected_pool_matches_sampling():
    rng = np.random.default_rng(0)
    popularity = np.concatenate([[0.0], rng.pareto(1.5, 500) + 0.01])
    popularity /= popularity.sum()
    sizes = [len(np.unique(np.concatenate([rng.choice(501, 300, p=popularity),
                                           rng.integers(1, 501, 100)])))
             for _ in range(200)]
    assert expected_pool(popularity, 300, 100) == pytest.approx(np.mean(sizes), rel=0.02)


def test_auto_negatives_follow_the_pool_share(tmp_path):
    data_dir = write_processed(tmp_path / "data")
    config = TrainConfig(text_model="none", max_seq_len=8)
    data = load_training_data(config, data_dir)
    # big batches cover the small catalog: sampling would save nothing
    assert retrieval_mode(config, data, on_gpu=False).mode == "full"
    few = TrainConfig(text_model="none", max_seq_len=8, batch_size=1, num_negatives=1)
    choice = retrieval_mode(few, data, on_gpu=False)
    assert choice.mode == "sampled" and "of" in choice.reason
    assert retrieval_mode(few, data, on_gpu=True).mode == "full"  # the cap alone on a GPU
    capped = TrainConfig(text_model="none", full_softmax_max_items=3)
    assert retrieval_mode(capped, data, on_gpu=True).mode == "sampled"
    assert retrieval_mode(TrainConfig(negatives="full", batch_size=1, num_negatives=1), data,
                          on_gpu=False).mode == "full"


def test_validation_users_and_interval():
    assert validation_rows(3000, 3600, "auto", 0)[0] is None  # the dev sets stay whole
    rows, reason = validation_rows(30_000, 24_000, "auto", 0)
    assert len(rows) == 4166 and len(set(rows)) == 4166 and "subset" in reason
    assert np.array_equal(rows, validation_rows(30_000, 24_000, "auto", 0)[0])  # fixed
    assert len(validation_rows(30_000, 1_000_000, "auto", 0)[0]) == 2000
    assert validation_rows(30_000, 24_000, "0", 0)[0] is None
    assert len(validation_rows(30_000, 24_000, "500", 0)[0]) == 500
    assert validation_interval("auto", VALID_MIN_SECONDS - 1, 0.1, 10) == 1
    assert validation_interval("auto", 10.0, 40.0, 10) == 1  # 20% already
    assert validation_interval("auto", 10.0, 20.0, 10) == 2
    assert validation_interval("auto", 60.0, 10.0, 10) == 5  # capped at patience / 2
    assert validation_interval("3", 60.0, 10.0, 10) == 3


def test_validation_every_n_epochs_and_the_last(tmp_path):
    run_dir, _, metrics = train_tiny(tmp_path, epochs=5, text_model=None, export=False,
                                     valid_every="2", patience=20)
    history = pd.read_csv(run_dir / "history.csv")
    assert history["val_ndcg@10"].notna().tolist() == [True, False, True, False, True]
    assert metrics["validation"]["validations"] == 3
    assert metrics["best_epoch"] in (1, 3, 5)


def test_every_flag_says_what_it_does_and_what_it_accepts():
    text = " ".join(train_parser().format_help().split())
    for spec in dataclasses.fields(TrainConfig):
        assert len(spec.metadata["help"]) > 15, spec.name
        if spec.metadata["choices"]:
            assert "{" + ",".join(spec.metadata["choices"]) + "}" in text, spec.name
    assert "--negatives {auto,full,sampled}" in text and "retrieval softmax" in text
    with pytest.raises(ValueError, match="distribute='ring': expected one of auto, mirrored"):
        TrainConfig(distribute="ring").validate()
