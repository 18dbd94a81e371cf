"""Item metadata as the item tower reads it: text columns as codes (1..K in sorted order,
0 = none) and prices as quantile buckets. Training builds the catalog's codes here; export
hands the same vocabularies and bucket edges to the item tower SavedModel, so a new item's
metadata is coded as a catalog item's was."""

from __future__ import annotations

import numpy as np
import pandas as pd

META_COLUMNS = ("category", "brand")


def category_codes(values: pd.Series) -> tuple[np.ndarray, int]:
    """'' / missing -> 0, other values -> 1..K in sorted order."""
    values = values.fillna("").astype(str)
    vocab = sorted(v for v in values.unique() if v)
    codes = pd.Categorical(values, categories=vocab).codes.astype(np.int32) + 1
    return np.where(values.to_numpy() == "", 0, codes).astype(np.int32), len(vocab)


def price_edges(prices: pd.Series, buckets: int) -> np.ndarray:
    """Inner quantile edges of the known prices (float64, ascending, distinct)."""
    values = pd.to_numeric(prices, errors="coerce").to_numpy(np.float64)
    known = values[np.isfinite(values)]
    if len(known) == 0:
        return np.zeros(0, np.float64)
    return np.unique(np.quantile(known, np.linspace(0, 1, buckets + 1)[1:-1]))


def price_buckets(prices: pd.Series, buckets: int) -> np.ndarray:
    """Quantile buckets 1..buckets of known prices; missing price -> 0."""
    values = pd.to_numeric(prices, errors="coerce").to_numpy(np.float64)
    out = np.searchsorted(price_edges(prices, buckets), values, side="right").astype(np.int32)
    out += 1
    out[~np.isfinite(values)] = 0
    return out


def metadata_vocabularies(items: pd.DataFrame, meta_sizes: dict[str, int],
                          buckets: int) -> dict[str, list]:
    """What turns a new item's metadata into the codes training gave the catalog: the sorted
    vocabulary of each text column the model embeds (code = position + 1; unknown or empty ->
    0) and the price bucket edges ("price_bucket")."""
    out: dict[str, list] = {}
    for column in META_COLUMNS:
        if column in meta_sizes:
            values = items[column].fillna("").astype(str)
            out[column] = sorted(v for v in values.unique() if v)
    if "price_bucket" in meta_sizes:
        out["price_bucket"] = price_edges(items["price"], buckets).tolist()
    return out
