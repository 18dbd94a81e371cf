"""The exported item tower: new items' vectors computed as training computed those of items
without an id embedding."""

import json

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from support import op_types
from tensorflow.python.framework import op_def_registry

from export import contract as c
from towers.model import TwoTowerModel


def embed_catalog(version, items: pd.DataFrame) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    meta = json.loads((version / c.METADATA).read_text())["item_tower"]
    tokenizer = AutoTokenizer.from_pretrained(str(version / meta["tokenizer"]))
    tokens = tokenizer(items["text"].tolist(), max_length=meta["text_max_length"],
                       truncation=True, padding=True, return_tensors="np")
    serve = tf.saved_model.load(str(version / c.ITEM_TOWER)).signatures[c.SERVING_DEFAULT]
    out = serve(input_ids=tf.constant(tokens["input_ids"], tf.int32),
                attention_mask=tf.constant(tokens["attention_mask"], tf.int32),
                category=tf.constant(items["category"].fillna("").astype(str).tolist()),
                brand=tf.constant(items["brand"].fillna("").astype(str).tolist()),
                price=tf.constant(items["price"].astype(np.float64).to_numpy()))
    return {name: value.numpy() for name, value in out.items()}


def test_item_tower_equals_the_cold_path_of_training(tiny_export):
    """For every catalog item, text + metadata through the exported item tower give the vector
    the trained model gives it without its id embedding (count 0: a never-trained item)."""
    run_dir, export_dir, _ = tiny_export
    version = export_dir / "1"
    items = pd.read_parquet(version / c.ITEMS).sort_values("item_idx")
    model, spec = TwoTowerModel.from_run(run_dir)
    tower = model.item_tower
    tower.seen_in_training.assign(tf.zeros_like(tower.seen_in_training))
    cold = model.all_item_vectors().numpy()[1:]
    out = embed_catalog(version, items)
    assert out[c.ITEM_VECTORS].shape == cold.shape
    assert cold.shape[1] == spec.dim + spec.text_dim + 1  # the fixture has the content term
    np.testing.assert_allclose(out[c.ITEM_VECTORS], cold, atol=2e-5)
    text = tower.text_vectors(tf.range(1, spec.num_items + 1)).numpy()
    np.testing.assert_allclose(out[c.CONTENT_VECTORS], text, atol=2e-5)
    # A missing or unknown category/brand/price is code 0, as for a catalog item without one.
    odd = items.head(2).assign(category=["", "no-such-category"], brand="", price=np.nan)
    again = embed_catalog(version, odd)[c.ITEM_VECTORS]
    assert not np.allclose(again, out[c.ITEM_VECTORS][:2])
    assert np.isfinite(again).all()


def test_item_tower_has_stock_ops_and_tf_serving_lists_it(tiny_export):
    _, export_dir, _ = tiny_export
    missing = {op for op in op_types(export_dir / "1" / c.ITEM_TOWER)
               if op_def_registry.get(op) is None}
    assert not missing
    config = (export_dir / c.TF_SERVING_DIR / c.TF_SERVING_CONFIG).read_text()
    assert f'name: "{c.ITEM_TOWER}"' in config


def test_retrieval_returns_its_query_vectors(tiny_export):
    """The query vector retrieval scored with, so the API can score items the index lacks:
    its dot product with an item's exported vector is that item's retrieval score."""
    version = tiny_export[1] / "1"
    vectors = pd.read_parquet(version / c.ITEM_EMBEDDINGS)
    table = dict(zip(vectors["item_id"], np.stack(vectors["embedding"].to_numpy())))
    serve = tf.saved_model.load(str(version / c.RETRIEVAL_BRUTEFORCE)).signatures[
        c.SERVING_DEFAULT]
    out = serve(history=tf.constant([["SKU0001", "SKU0002"]]))
    query = out[c.QUERY].numpy()[0]
    for item, score in zip(out[c.ITEM_IDS].numpy()[0][:5], out[c.SCORES].numpy()[0][:5]):
        assert float(query @ table[item.decode()]) == pytest.approx(float(score), rel=1e-4,
                                                                      abs=1e-4)
