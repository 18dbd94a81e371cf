"""Text encoder loading, pooling and the on-disk embedding cache (tiny random DistilBERT)."""

import numpy as np
import pytest
import tensorflow as tf
from support import write_tiny_distilbert

from towers.text_encoder import (
    cached_text_embeddings,
    load_text_encoder,
    packaged_minilm_dir,
    pool_hidden_states,
)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_text_encoder(str(write_tiny_distilbert(tmp_path_factory.mktemp("bert"))))


def test_mean_pooling_ignores_padding():
    hidden = tf.constant([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    mask = tf.constant([[1, 1, 0]])
    assert np.allclose(pool_hidden_states(hidden, mask, "mean").numpy(), [[2.0, 2.0]])
    assert np.allclose(pool_hidden_states(hidden, mask, "cls").numpy(), [[1.0, 1.0]])


def test_cache_is_reused_and_matches(encoder, tmp_path):
    texts = ["red mug", "blue lamp", "red mug", "garden star"]
    first, encoded = cached_text_embeddings(encoder, texts, tmp_path, max_length=16)
    assert encoded == 3  # duplicates encoded once
    assert first.shape == (4, 32) and np.isfinite(first).all()
    assert np.allclose(first[0], first[2])
    again, encoded_again = cached_text_embeddings(encoder, texts + ["paper box"], tmp_path,
                                                  max_length=16)
    assert encoded_again == 1  # only the new text
    assert np.allclose(again[:4], first, atol=1e-5)
    # A different max length is a different cache key.
    _, other = cached_text_embeddings(encoder, texts, tmp_path, max_length=8)
    assert other == 3


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="could not be loaded"):
        load_text_encoder(str(tmp_path / "no-such-model"))


def test_packaged_minilm_files_present():
    path = packaged_minilm_dir()
    assert (path / "model.safetensors").exists() and (path / "vocab.txt").exists()
