"""Exported SavedModels, loaded in a fresh Python process as a server would load them."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from support import op_types as _op_types

import export.build as export
from export.contract import UNFILLED_SCORE
from towers.model import TwoTowerModel

ROOT = Path(__file__).resolve().parents[1]

LOADER = r"""
import json, sys
sys.path.insert(0, {root!r})
import tfenv
import tensorflow as tf
if {with_scann}:
    import scann  # registers the Scann ops
model = tf.saved_model.load({path!r})
histories = tf.constant(json.loads({histories!r}))
out = model.signatures["serving_default"](history=histories)
print(json.dumps({{"scann_imported": "scann" in sys.modules,
                  "item_ids": out["item_ids"].numpy().astype(str).tolist(),
                  "scores": out["scores"].numpy().tolist(),
                  "signatures": sorted(model.signatures.keys())}}))
"""


def _load_in_subprocess(path: Path, histories: list, with_scann: bool) -> dict:
    code = LOADER.format(root=str(ROOT), path=str(path), histories=json.dumps(histories),
                         with_scann=with_scann)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def restored(tiny_export):
    run_dir, export_dir, _ = tiny_export
    model, spec = TwoTowerModel.from_run(run_dir)
    items = pd.read_parquet(run_dir / "items.parquet")
    return spec, model, items, export_dir / "1"


def _histories(items):
    ids = items["item_id"].tolist()
    return [[ids[0], ids[1], ids[2], "", ""], ["", ids[5], "NOT-AN-ITEM", ids[6], ids[7]],
            [ids[10], ids[11], ids[12], ids[13], ids[14]]]


def _exact_top_k(model, items, spec, histories, k, version):
    """Reference answer from the in-memory model: exact scores, history excluded, every event
    of the default type (what a request without event types means)."""
    metadata = json.loads((version / "metadata.json").read_text())
    event = metadata["event_types"].index(metadata["default_event_type"]) + 1
    index = {item: i + 1 for i, item in enumerate(items["item_id"])}
    vectors = tf.cast(model.all_item_vectors(), tf.float32).numpy()
    out = []
    for row in histories:
        idx = [index[x] for x in row if x in index][-spec.max_seq_len:]
        padded = np.zeros((1, spec.max_seq_len), np.int32)
        padded[0, spec.max_seq_len - len(idx):] = idx
        events = np.where(padded > 0, event, 0).astype(np.int32)
        user = model.user_vector(tf.constant(padded), tf.constant(vectors),
                                 tf.constant(events)).numpy()[0]
        scores = vectors @ user
        scores[0] = -np.inf
        scores[idx] = -np.inf
        best = np.argsort(-scores, kind="stable")[:k]
        out.append(([items["item_id"].iloc[i - 1] for i in best], scores[best]))
    return out


def test_bruteforce_equals_in_memory_model_without_scann(restored):
    spec, model, items, version = restored
    histories = _histories(items)
    loaded = _load_in_subprocess(version / "retrieval_bruteforce", histories, with_scann=False)
    assert not loaded["scann_imported"]
    assert {"serving_default", "with_event_types", "include_seen"} <= set(loaded["signatures"])
    for (ids, scores), got_ids, got_scores, hist in zip(
            _exact_top_k(model, items, spec, histories, 10, version), loaded["item_ids"],
            loaded["scores"], histories):
        assert got_ids[:10] == ids
        assert np.allclose(got_scores[:10], scores, atol=1e-4)
        assert not set(got_ids[:10]) & set(hist)  # seen items excluded


def test_scann_model_recall_against_exact(restored):
    spec, model, items, version = restored
    histories = _histories(items)
    loaded = _load_in_subprocess(version / "retrieval", histories, with_scann=True)
    exact = _exact_top_k(model, items, spec, histories, 10, version)
    recall = np.mean([len(set(got[:10]) & set(ids)) / 10
                      for got, (ids, _) in zip(loaded["item_ids"], exact)])
    assert recall >= 0.95
    metadata = json.loads((version / "metadata.json").read_text())
    assert metadata["scann"]["recall@10_vs_bruteforce"] >= 0.95


def test_unknown_ids_are_padding(restored):
    _, _, items, version = restored
    model = tf.saved_model.load(str(version / "retrieval_bruteforce"))
    ids = items["item_id"].tolist()
    plain = model.signatures["serving_default"](history=tf.constant([[ids[3], ids[4]]]))
    noisy = model.signatures["serving_default"](
        history=tf.constant([["???", ids[3], "", "nope", ids[4], ""]]))
    assert plain["item_ids"].numpy().tolist() == noisy["item_ids"].numpy().tolist()
    assert np.allclose(plain["scores"].numpy(), noisy["scores"].numpy(), atol=1e-5)


def test_signatures_and_dtypes(restored):
    _, _, items, version = restored
    ranking = tf.saved_model.load(str(version / "ranking"))
    fn = ranking.signatures["serving_default"]
    inputs = fn.structured_input_signature[1]
    assert inputs["history"].dtype == tf.string and inputs["candidates"].dtype == tf.string
    ids = items["item_id"].tolist()
    out = fn(history=tf.constant([[ids[0], ids[1]]]),
             candidates=tf.constant([[ids[2], "unknown", ids[3]]]))
    assert out["scores"].dtype == tf.float32 and out["scores"].shape == (1, 3)
    assert out["known"].numpy().tolist() == [[True, False, True]]
    retrieval = tf.saved_model.load(str(version / "retrieval_bruteforce"))
    outputs = retrieval.signatures["serving_default"].structured_outputs
    assert outputs["item_ids"].dtype == tf.string and outputs["scores"].dtype == tf.float32
    # With every item in the history, the default signature has nothing left to recommend
    # (all slots unfilled) while include_seen still ranks the whole catalog.
    everything = tf.constant([ids])
    excluded = retrieval.signatures["serving_default"](history=everything)["scores"].numpy()
    included = retrieval.signatures["include_seen"](history=everything)
    assert (excluded <= UNFILLED_SCORE).all()
    assert (included["scores"].numpy() > UNFILLED_SCORE).all()
    assert set(included["item_ids"].numpy().astype(str)[0]) <= set(ids)


def test_saved_model_cli_lists_signatures(restored):
    version = restored[3]
    cli = Path(sys.executable).parent / "saved_model_cli"
    result = subprocess.run([str(cli), "show", "--all", "--dir",
                             str(version / "retrieval_bruteforce")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("serving_default", "with_event_types", "include_seen", "history",
                 "item_ids", "DT_STRING"):
        assert name in result.stdout


def test_export_files_and_tf_serving_config(tiny_export):
    _, export_dir, _ = tiny_export
    version = export_dir / "1"
    for name in ("item_embeddings.parquet", "items.parquet", "user_histories.parquet",
                 "metadata.json"):
        assert (version / name).exists()
    metadata = json.loads((version / "metadata.json").read_text())
    for key in ("model_version", "config", "test_metrics", "k", "embedding_dim", "scann",
                "created", "versions", "data_manifest"):
        assert key in metadata
    config_text = (export_dir / "tf_serving" / "models.config").read_text()
    assert 'name: "retrieval_bruteforce"' in config_text
    link = export_dir / "tf_serving" / "retrieval_bruteforce" / "1"
    assert (link / "saved_model.pb").exists()


def test_interrupted_export_leaves_no_version(tiny_export, monkeypatch):
    run_dir, export_dir, _ = tiny_export
    target = export_dir.parent / "interrupted"

    def die(tmp):
        raise RuntimeError("simulated crash during export")

    monkeypatch.setattr(export, "_before_rename_hook", die)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export.export_run(run_dir, target)
    assert not any(p.name.isdigit() for p in target.iterdir())
    assert not list(target.glob(".tmp-*"))


def test_export_killed_while_writing_leaves_no_version_and_runs_again(tiny_export, tmp_path):
    """SIGKILL while the SavedModels are being written (no handler runs): no version directory
    appears, the run directory is untouched, and the same command again exports version 1,
    removing the killed export's half-written part."""
    import os
    import signal
    import time

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"  # a copy: an export rewrites the run's report.html
    shutil.copytree(tiny_export[0], run_dir)
    target = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    command = [sys.executable, str(root / "train.py"), "export", "--run", str(run_dir),
               "--out", str(target)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(target.glob(".tmp-*/*")):  # writing has begun
        assert process.poll() is None and time.time() < deadline, "export never started writing"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not any(p.name.isdigit() for p in target.iterdir())
    assert len(list(target.glob(".tmp-*"))) == 1  # what the killed export left
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "left by an export that was killed" in again.stderr
    assert [p.name for p in target.iterdir() if not p.name.startswith("tf_serving")] == ["1"]
    assert (target / "1" / "retrieval_bruteforce" / "saved_model.pb").exists()


def test_reexport_makes_next_version(tiny_export, tmp_path):
    run_dir, _, _ = tiny_export
    out = tmp_path / "models"
    first = export.export_run(run_dir, out)
    second = export.export_run(run_dir, out)
    assert (first.name, second.name) == ("1", "2")


def test_only_the_scann_model_needs_custom_ops(restored):
    from tensorflow.python.framework import op_def_registry

    version = restored[3]
    brute, scann_ops = _op_types(version / "retrieval_bruteforce"), _op_types(version / "retrieval")
    assert not {op for op in brute if op.lower().startswith("scann")}
    assert {op for op in scann_ops if op.startswith("Scann")}
    # Every op of the brute-force and ranking models is a stock TensorFlow op.
    for name in ("retrieval_bruteforce", "ranking"):
        missing = {op for op in _op_types(version / name) if op_def_registry.get(op) is None}
        assert not missing, f"{name} needs non-stock ops: {missing}"


def _served_hr_at_10(version: Path) -> tuple[float, int]:
    """HR@10 of the test split recomputed through an exported brute-force model: each user's
    history but the last item, with its real event types, and the last item as the target."""
    users = pd.read_parquet(version / "user_histories.parquet")
    model = tf.saved_model.load(str(version / "retrieval_bruteforce"))
    serve = model.signatures["with_event_types"]
    width = max(len(h) for h in users["history"]) - 1
    pad = lambda rows: [[""] * (width - len(r)) + list(r) for r in rows]  # noqa: E731
    histories = pad(h[:-1] for h in users["history"])
    events = pad(e[:-1] for e in users["event_types"])
    out = serve(history=tf.constant(histories), event_types=tf.constant(events))
    top10 = out["item_ids"].numpy()[:, :10].astype(str)
    hits = [h[-1] in row for h, row in zip(users["history"], top10)]
    return float(np.mean(hits)), len(hits)


def test_served_model_reproduces_offline_test_metric(tiny_export):
    """Train/serve parity: HR@10 recomputed through the exported model (raw string ids, the
    user's real event types) equals the HR@10 that training reported for the test split."""
    _, export_dir, metrics = tiny_export
    hr, users = _served_hr_at_10(export_dir / "1")
    assert users == metrics["test"]["users"]
    assert hr == pytest.approx(metrics["test"]["hr@10"], abs=1e-9)


def test_finetuned_run_exports_without_its_encoder(tmp_path):
    """A run that fine-tuned the text encoder keeps the tuned item text vectors: its export
    needs neither the encoder files nor the data, and serves what training measured."""
    from support import train_tiny

    run_dir, export_dir, metrics = train_tiny(tmp_path, epochs=2, text_model="tiny",
                                              export=False, text_mode="finetune",
                                              negatives="sampled", num_negatives=8)
    shutil.rmtree(tmp_path / "tinybert")
    shutil.rmtree(tmp_path / "data")
    version = export.export_run(run_dir, export_dir)
    hr, users = _served_hr_at_10(version)
    assert users == metrics["test"]["users"]
    assert hr == pytest.approx(metrics["test"]["hr@10"], abs=1e-9)


def test_a_run_trained_with_a_removed_setting_is_refused_by_name(tiny_export, tmp_path):
    """text_skip and frequency_gate were removed (they measured no gain): a run trained with
    one cannot be exported as if it never had it; the message names the setting and the
    commit that still has it. The same spec with the setting off loads."""
    import json
    import shutil

    from towers import run_dir as run_files
    from towers.spec import ModelSpec

    run_dir = Path(tmp_path / "old-run")
    shutil.copytree(tiny_export[0], run_dir)
    spec_path = run_dir / run_files.SPEC
    data = json.loads(spec_path.read_text())
    for off in (False, None):
        spec_path.write_text(json.dumps({**data, "text_skip": off}))
        assert ModelSpec.load(spec_path).num_items == data["num_items"]
    spec_path.write_text(json.dumps({**data, "frequency_gate": True}))
    with pytest.raises(ValueError, match="frequency_gate, removed after commit 1979ee7"):
        export.export_run(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_content_term_is_exported_in_the_scored_vectors(restored):
    # The tiny model has frozen text, so the content term is on by default: every exported
    # item vector is [v ; c] with c the unit text vector, and the parity tests above score it.
    spec, model, items, version = restored
    assert spec.content_term and spec.text_dim
    vectors = np.stack(pd.read_parquet(version / "item_embeddings.parquet")["embedding"])
    assert vectors.shape == (spec.num_items, spec.dim + spec.text_dim + 1)
    text = vectors[:, spec.dim:-1]  # g_i c_i: a positive multiple of the unit text vector
    unit = model.item_tower.text_table.numpy()[1:]
    np.testing.assert_allclose(text / np.linalg.norm(text, axis=1, keepdims=True), unit,
                               atol=1e-5)
    metadata = json.loads((version / "metadata.json").read_text())
    assert metadata["embedding_dim"] == spec.dim + spec.text_dim + 1
