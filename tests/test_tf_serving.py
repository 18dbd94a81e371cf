"""What TF Serving is handed: tf_serving/models.config and models_scann.config (read with TF
Serving's own config protos), the warmup requests in each SavedModel (replayed against the
model), and the models answering through saved_model_cli. tensorflow_model_server itself is not
installable here."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import tensorflow as tf
from google.protobuf import text_format
from support import op_types
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

ROOT = Path(__file__).resolve().parents[1]
STOCK_MODELS = {"retrieval_bruteforce", "ranking", "item_tower"}
RETRIEVAL_SIGNATURES = {"serving_default", "with_event_types", "include_seen",
                        "include_seen_with_event_types", "search", "live_history",
                        "live_history_include_seen"}
SIGNATURES = {"retrieval_bruteforce": RETRIEVAL_SIGNATURES, "retrieval": RETRIEVAL_SIGNATURES,
              "ranking": {"serving_default", "with_event_types"},
              "item_tower": {"serving_default"}}
OUTPUTS = {"retrieval_bruteforce": {"item_ids", "scores", "query"},
           "retrieval": {"item_ids", "scores", "query"}, "ranking": {"scores", "known"},
           "search": {"item_ids", "scores"},
           "item_tower": {"item_vectors", "content_vectors"}}

# The export builds a ScaNN index in this process, which registers ScaNN's ops here; a fresh
# interpreter that imports only TensorFlow knows the stock ops alone.
UNREGISTERED = r"""
import json, sys
sys.path.insert(0, {root!r})
import tfenv
from tensorflow.python.framework import op_def_registry
ops = json.loads(sys.stdin.read())
print(json.dumps({{name: sorted(op for op in names if op_def_registry.get(op) is None)
                  for name, names in ops.items()}}))
"""


def _unregistered_in_stock_tf(ops: dict[str, set[str]]) -> dict[str, list[str]]:
    result = subprocess.run([sys.executable, "-c", UNREGISTERED.format(root=str(ROOT))],
                            input=json.dumps({k: sorted(v) for k, v in ops.items()}),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _models(export_dir: Path, filename: str) -> dict[str, Path]:
    """model name -> the host directory its base_path names (docs/export.md mounts
    saved_model/NAME at /models/NAME)."""
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((export_dir / "tf_serving" / filename).read_text(), config)
    prefix = f"/models/{export_dir.name}/"
    models = {}
    for model in config.model_config_list.config:
        assert model.model_platform == "tensorflow"
        assert model.base_path.startswith(prefix), model.base_path
        assert model.name not in models
        models[model.name] = export_dir / model.base_path[len(prefix):]
    return models


def test_stock_config_lists_only_models_stock_tf_serving_loads(tiny_export):
    _, export_dir, _ = tiny_export
    stock = _models(export_dir, "models.config")
    scann = _models(export_dir, "models_scann.config")
    assert set(stock) == STOCK_MODELS
    assert set(scann) == STOCK_MODELS | {"retrieval"}
    assert all(scann[name] == stock[name] for name in stock)
    for base in scann.values():
        assert (base / "1" / "saved_model.pb").is_file()
    unregistered = _unregistered_in_stock_tf({name: op_types(base / "1")
                                              for name, base in scann.items()})
    for name in stock:
        assert not unregistered[name], f"{name} needs non-stock ops: {unregistered[name]}"
    # The check can tell: the ScaNN model's ops are unknown to stock TensorFlow.
    assert unregistered["retrieval"] and all(op.startswith("Scann")
                                             for op in unregistered["retrieval"])


def _warmup_logs(model_dir: Path) -> list:
    path = model_dir / "assets.extra" / "tf_serving_warmup_requests"
    assert path.is_file()
    return [prediction_log_pb2.PredictionLog.FromString(record.numpy())
            for record in tf.data.TFRecordDataset(str(path))]


@pytest.mark.parametrize("name", ["retrieval_bruteforce", "ranking", "retrieval", "item_tower"])
def test_warmup_requests_run_every_signature(tiny_export, name):
    _, export_dir, _ = tiny_export
    version = export_dir / "1"
    if name == "retrieval":
        import scann  # noqa: F401  registers the Scann ops
    catalog = set(pd.read_parquet(version / "items.parquet")["item_id"].astype(str))
    event_types = set(json.loads((version / "metadata.json").read_text())["event_types"])
    assert event_types  # the fixture has view and purchase events
    model = tf.saved_model.load(str(version / name))
    logs = _warmup_logs(version / name)
    assert 0 < len(logs) <= 1000  # TF Serving replays at most 1000
    answered = []
    for log in logs:
        request = log.predict_log.request
        assert request.model_spec.name == name
        signature = model.signatures[request.model_spec.signature_name]
        inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
        assert set(inputs) == set(signature.structured_input_signature[1])
        if "history" in inputs:
            assert set(inputs["history"].ravel().astype(str)) <= catalog
        if "candidates" in inputs:
            assert set(inputs["candidates"].ravel().astype(str)) <= catalog
        if "event_types" in inputs:
            assert set(inputs["event_types"].ravel().astype(str)) <= event_types
        out = signature(**{key: tf.constant(value) for key, value in inputs.items()})
        assert set(out) == (OUTPUTS[name] if name == "item_tower" else
                            OUTPUTS.get(request.model_spec.signature_name, OUTPUTS[name]))
        if "item_ids" in out:
            assert set(out["item_ids"].numpy().ravel().astype(str)) <= catalog
        answered.append(request.model_spec.signature_name)
    assert sorted(answered) == sorted(SIGNATURES[name]) == sorted(model.signatures)


def _saved_model_cli_run(model_dir: Path, input_exprs: str) -> str:
    cli = Path(sys.executable).parent / "saved_model_cli"
    result = subprocess.run([str(cli), "run", "--dir", str(model_dir), "--tag_set", "serve",
                             "--signature_def", "serving_default", "--input_exprs",
                             input_exprs], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_saved_model_cli_runs_the_stock_models(tiny_export):
    _, export_dir, _ = tiny_export
    version = export_dir / "1"
    ids = pd.read_parquet(version / "items.parquet")["item_id"].astype(str).tolist()
    history = json.dumps([[ids[0], ids[1]]])
    out = _saved_model_cli_run(version / "retrieval_bruteforce", f"history={history}")
    assert "item_ids" in out and "scores" in out
    assert any(f"b'{item}'" in out for item in ids[2:])
    candidates = json.dumps([[ids[2], "not-an-item", ids[3]]])
    out = _saved_model_cli_run(version / "ranking",
                               f"history={history};candidates={candidates}")
    assert "scores" in out and "known" in out
    assert "[[ True False  True]]" in out
