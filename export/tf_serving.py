"""What tensorflow_model_server needs beside the SavedModels of an export.

- `saved_model/NAME/tf_serving/`: one `<model>/<VERSION>` symlink per model (the
  base_path/VERSION/saved_model.pb layout the server watches), `models.config` listing the
  STOCK_OP_MODELS (what stock TF Serving can load) and `models_scann.config` listing every model,
  for a server built with ScaNN's ops linked in.
- `<model>/assets.extra/tf_serving_warmup_requests` in each SavedModel: one PredictionLog per
  signature, which the server replays when it loads the model (so the first real request does
  not pay for graph initialisation).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from export import contract as c


def _model_server_config(export_dir: Path, names: Sequence[str]) -> str:
    config = model_server_config_pb2.ModelServerConfig()
    for name in names:
        model = config.model_config_list.config.add()
        model.name = name
        # docs/export.md's docker command mounts saved_model/NAME at /models/NAME.
        model.base_path = f"/models/{export_dir.name}/{c.TF_SERVING_DIR}/{name}"
        model.model_platform = "tensorflow"
    return text_format.MessageToString(config)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_tf_serving_config(export_dir: Path, version: int) -> None:
    """tf_serving/<model>/<VERSION> symlinks for every model, `models.config` (stock-op models)
    and `models_scann.config` (all models)."""
    root = export_dir / c.TF_SERVING_DIR
    for name in c.SAVED_MODELS:
        if not (export_dir / str(version) / name).is_dir():
            continue  # item_tower: not in a fine-tuned run's export
        (root / name).mkdir(parents=True, exist_ok=True)
        link = root / name / str(version)
        if not link.exists():
            link.symlink_to(Path("..") / ".." / str(version) / name)
    served = [name for name in c.SAVED_MODELS if (root / name).is_dir()]
    _write_atomically(
        root / c.TF_SERVING_CONFIG,
        "# Stock tensorflow_model_server: models with stock TF ops only (no ScaNN).\n"
        + _model_server_config(export_dir, [n for n in c.STOCK_OP_MODELS if n in served]))
    _write_atomically(
        root / c.TF_SERVING_SCANN_CONFIG,
        "# A tensorflow_model_server built with ScaNN's TF ops linked in: every model.\n"
        + _model_server_config(export_dir, served))


def warmup_inputs(input_names: Sequence[str], item_ids: Sequence[str],
                  event_type: str | None) -> dict[str, np.ndarray]:
    """One-row [1, n] string inputs for a signature: real item ids as history and candidates,
    a real event type per history item ("" = the default type, if the model has none)."""
    values = {c.HISTORY: list(item_ids[:2]),
              c.EVENT_TYPES: [event_type or ""] * len(item_ids[:2]),
              c.CANDIDATES: list(item_ids[:3])}
    unknown = set(input_names) - set(values)
    if unknown:
        raise ValueError(f"no warmup value for signature inputs {sorted(unknown)}")
    return {name: np.array([values[name]], dtype=object) for name in input_names}


def write_warmup_requests(model_dir: Path, model_name: str, signatures: Mapping[str, object],
                          item_ids: Sequence[str], event_type: str | None) -> Path:
    """`model_dir/assets.extra/tf_serving_warmup_requests`: one PredictionLog per signature.

    signatures: signature name -> tf.function with an input_signature (add_signatures' result),
    whose TensorSpec names are the request's input keys."""
    path = model_dir / c.WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, function in signatures.items():
            specs = function.input_signature
            names = [spec.name for spec in specs
                     if spec.dtype == tf.string and spec.shape.rank == 2]
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
            for name, value in warmup_inputs(names, item_ids, event_type).items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=tf.string))
            for spec in specs:  # item_tower's metadata: one item with none
                if spec.dtype == tf.string and spec.shape.rank == 1:
                    request.inputs[spec.name].CopyFrom(tf.make_tensor_proto(
                        np.array([""], dtype=object), dtype=tf.string))
            for spec in specs:  # numeric inputs (`search`, item_tower): zeros, fetch 10
                if spec.dtype != tf.string:
                    shape = [1 if d is None else d for d in spec.shape.as_list()]
                    value = np.full(shape, 10 if spec.name == c.FETCH else 0,
                                    spec.dtype.as_numpy_dtype)
                    request.inputs[spec.name].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path
