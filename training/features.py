"""Item feature tables for the item tower: text vectors (cached) or token ids, metadata codes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from towers.text import (
    TextEncoder,
    cached_only,
    cached_text_embeddings,
    load_text_encoder,
    tokenize,
)
from training.config import TrainConfig

log = logging.getLogger(__name__)

META_COLUMNS = ("category", "brand")


@dataclass
class ItemFeatures:
    """Tables with num_items + 1 rows (row 0 = padding)."""

    warm: np.ndarray
    text: np.ndarray | None = None  # frozen text vectors
    tokens: np.ndarray | None = None  # finetune token ids
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    meta_sizes: dict[str, int] = field(default_factory=dict)
    text_source: str = "none"  # the encoder actually used
    texts_encoded: int = 0  # texts not found in the cache this run
    encoder: TextEncoder | None = None


def _codes(values: pd.Series) -> tuple[np.ndarray, int]:
    """'' / missing -> 0, other values -> 1..K in sorted order."""
    values = values.fillna("").astype(str)
    vocab = sorted(v for v in values.unique() if v)
    codes = pd.Categorical(values, categories=vocab).codes.astype(np.int32) + 1
    return np.where(values.to_numpy() == "", 0, codes).astype(np.int32), len(vocab)


def price_buckets(prices: pd.Series, buckets: int) -> np.ndarray:
    """Quantile buckets 1..buckets of known prices; missing price -> 0."""
    values = pd.to_numeric(prices, errors="coerce").to_numpy(np.float64)
    known = values[np.isfinite(values)]
    if len(known) == 0:
        return np.zeros(len(values), np.int32)
    edges = np.unique(np.quantile(known, np.linspace(0, 1, buckets + 1)[1:-1]))
    out = np.searchsorted(edges, values, side="right").astype(np.int32) + 1
    out[~np.isfinite(values)] = 0
    return out


def item_features(items: pd.DataFrame, warm_counts: np.ndarray, config: TrainConfig,
                  text_source: str | None = None) -> ItemFeatures:
    """Build every table the item tower needs from items.parquet (sorted by item_idx).

    `text_source` (the encoder a finished run actually used) lets a re-export read frozen text
    vectors from the cache without loading the encoder at all.
    """
    num_items = len(items)
    pad = lambda a: np.concatenate([np.zeros((1,) + a.shape[1:], a.dtype), a])  # noqa: E731
    features = ItemFeatures(warm=(warm_counts > 0).astype(np.float32))
    if config.use_metadata:
        for column in META_COLUMNS:
            if column in items and items[column].fillna("").astype(str).ne("").any():
                codes, size = _codes(items[column])
                features.meta[column], features.meta_sizes[column] = pad(codes), size
        if "price" in items and pd.to_numeric(items["price"], errors="coerce").notna().any():
            features.meta["price_bucket"] = pad(price_buckets(items["price"],
                                                              config.price_buckets))
            features.meta_sizes["price_bucket"] = config.price_buckets
    if config.text_model == "none":
        return features
    texts = items["text"].fillna("").astype(str).tolist()
    if text_source and config.text_mode == "frozen":
        cached = cached_only(text_source, texts, config.cache_dir, config.text_max_length,
                             config.text_pooling)
        if cached is not None:
            features.text, features.text_source = pad(cached), text_source
            return features
    encoder = load_text_encoder(text_source or config.text_model,
                                allow_fallback=config.text_fallback and not text_source)
    features.text_source, features.encoder = encoder.source, encoder
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
