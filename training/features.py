"""Item feature tables for the item tower (text vectors or token ids, metadata codes, which
items were seen in training) and their installation into a new model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from towers.metadata import META_COLUMNS, category_codes, price_buckets
from towers.model import TwoTowerModel
from towers.text_encoder import TextEncoder, cached_text_embeddings, load_text_encoder, tokenize
from training.config import TrainConfig

log = logging.getLogger(__name__)



@dataclass
class ItemFeatures:
    """Tables with num_items + 1 rows (row 0 = padding)."""

    train_counts: np.ndarray  # training interactions per item (0: no id embedding used)
    text: np.ndarray | None = None  # frozen text vectors
    tokens: np.ndarray | None = None  # finetune token ids
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    meta_sizes: dict[str, int] = field(default_factory=dict)
    text_source: str = "none"  # the encoder actually used, as a person names it
    texts_encoded: int = 0  # texts not found in the cache this run
    encoder: TextEncoder | None = None

    @property
    def seen_in_training(self) -> np.ndarray:
        """1.0 for items with training interactions (their id embedding is used), else 0."""
        return (self.train_counts > 0).astype(np.float32)

    @property
    def text_dim(self) -> int:
        if self.text is not None:
            return int(self.text.shape[1])
        return self.encoder.hidden_size if self.tokens is not None else 0

    @property
    def text_tokens(self) -> int:
        return 0 if self.tokens is None else int(self.tokens.shape[1])


def item_features(items: pd.DataFrame, train_counts: np.ndarray,
                  config: TrainConfig) -> ItemFeatures:
    """Build every table the item tower needs from items.parquet (sorted by item_idx)."""
    num_items = len(items)
    pad = lambda a: np.concatenate([np.zeros((1,) + a.shape[1:], a.dtype), a])  # noqa: E731
    features = ItemFeatures(train_counts=train_counts)
    if config.use_metadata:
        for column in META_COLUMNS:
            if column in items and items[column].fillna("").astype(str).ne("").any():
                codes, size = category_codes(items[column])
                features.meta[column], features.meta_sizes[column] = pad(codes), size
        if "price" in items and pd.to_numeric(items["price"], errors="coerce").notna().any():
            features.meta["price_bucket"] = pad(price_buckets(items["price"],
                                                              config.price_buckets))
            features.meta_sizes["price_bucket"] = config.price_buckets
    if config.text_model == "none":
        return features
    texts = items["text"].fillna("").astype(str).tolist()
    encoder = load_text_encoder(config.text_model, allow_fallback=config.text_fallback)
    features.text_source, features.encoder = encoder.display_name, encoder
    if config.text_mode == "frozen":
        vectors, encoded = cached_text_embeddings(encoder, texts, config.cache_dir,
                                                  config.text_max_length, config.text_pooling,
                                                  config.text_batch_size)
        features.text, features.texts_encoded = pad(vectors), encoded
        log.info("text embeddings: %d items, %d newly encoded, %d from cache", num_items,
                 encoded, num_items - encoded)
    else:
        features.tokens = pad(tokenize(encoder, texts, config.text_max_length)["input_ids"])
    return features


def text_initial_ids(text: np.ndarray, dim: int, std: float = 0.02) -> np.ndarray:
    """Initial id embeddings from the text vectors [num_items + 1, d]: their top `dim`
    principal components, scaled to the random init's per-coordinate std (padding row 0 and
    textless rows stay 0); items with similar text start close together."""
    vectors = text.astype(np.float64)
    has_text = np.linalg.norm(vectors, axis=1) > 0
    has_text[0] = False
    out = np.zeros((len(text), dim), np.float32)
    if has_text.sum() < 2:
        return out
    centred = vectors[has_text] - vectors[has_text].mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:dim].T  # [n, <= dim]
    projected *= std / max(projected.std(), 1e-12)
    out[has_text, :projected.shape[1]] = projected
    return out


def install_features(model: TwoTowerModel, features: ItemFeatures, popularity: np.ndarray,
                     pooling: str, finetune_layers: int, id_init: str = "random") -> None:
    """Fill a new model's feature tables and the retrieval task's sampling popularity;
    `id_init="text"` starts the id table from the text vectors."""
    model.item_tower.set_item_features(features.seen_in_training, features.text,
                                       features.tokens, features.meta, features.train_counts)
    if id_init == "text" and features.text is not None:
        model.item_tower.id_embedding.assign(text_initial_ids(features.text,
                                                              model.item_tower.dim))
    if features.tokens is not None:
        model.item_tower.attach_text_encoder(features.encoder.model, pooling, finetune_layers)
    model.retrieval.build(None)
    model.retrieval.popularity.assign(popularity.astype(np.float32))
