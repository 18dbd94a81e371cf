"""Item text and metadata clean-up shared by the readers: HTML stripped, whitespace normalised."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

TEXT_SEPARATOR = " | "
_TAG = re.compile(r"<[^>]*>")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+")


def clean_text(values: pd.Series) -> pd.Series:
    """Strip HTML tags and entities and collapse whitespace; missing values become ""."""
    s = values.astype(object).where(values.notna(), "").astype(str)
    s = s.str.replace(_TAG, " ", regex=True)
    has_entity = s.str.contains("&", regex=False)
    if has_entity.any():
        s = s.where(~has_entity, s[has_entity].map(html.unescape))
    return s.str.split().str.join(" ")


def clean_string(value: str) -> str:
    """clean_text for one string."""
    return " ".join(html.unescape(_TAG.sub(" ", value)).split())


def join_text(parts: Sequence[pd.Series]) -> pd.Series:
    """Clean each part and join the non-empty ones with TEXT_SEPARATOR, row by row.

    The parts must share one index; the result has it too.
    """
    cleaned = [clean_text(p).to_numpy(dtype=object) for p in parts]
    joined = [TEXT_SEPARATOR.join(p for p in row if p) for row in zip(*cleaned, strict=True)]
    return pd.Series(joined, index=parts[0].index, dtype=object)


def flatten_text(value: object) -> str:
    """A JSON metadata field as one string: lists (e.g. Amazon descriptions) joined by spaces."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(flatten_text(v) for v in value)
    if isinstance(value, dict):
        return ""
    return str(value)


def parse_price(value: object) -> float:
    """A price from a number or a string such as "$1,299.99"; a range gives its lower end.

    Anything without a number (None, "", "unavailable") is NaN.
    """
    if value is None or isinstance(value, bool):
        return float("nan")
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    match = _NUMBER.search(str(value))
    if match is None:
        return float("nan")
    return float(match.group().replace(",", ""))
