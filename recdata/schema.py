"""The shapes data takes on its way through recdata: what a reader returns, what is written.

Readers return `RawData` (events in file order, item metadata); `recdata.process.build_processed`
turns it into the `items.parquet` / `events.parquet` tables whose Arrow schemas are defined here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

SCHEMA_VERSION = 1

# Columns of RawData.events (file order).
RAW_EVENT_COLUMNS = ("user_id", "item_id", "timestamp", "event_type", "value")

ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("item_idx", pa.int32()),
        ("text", pa.string()),
        ("category", pa.string()),
        ("brand", pa.string()),
        ("price", pa.float64()),
        ("count", pa.int64()),
    ]
)
EVENTS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_idx", pa.int32()),
        ("timestamp", pa.int64()),
        ("event_type", pa.string()),
        ("value", pa.float32()),
        ("split", pa.string()),
    ]
)
SPLITS = ("train", "valid", "test")


class DataError(Exception):
    """Bad input a user can fix: the message names the file (and line) and what is wrong."""


@dataclass(frozen=True)
class RawData:
    """What a reader hands to `recdata.process.build_processed`.

    events: user_id, item_id (strings or categoricals of strings), timestamp (int64 seconds),
        event_type (string), value (float32); rows in input file order.
    items: item_id, text, category, brand (strings, "" if unknown), price (float64, NaN if
        unknown); at most one row per item_id; may list items that have no events.
    dropped: event rows dropped while reading, by reason (e.g. "cancellation").
    inputs: the files read, for the manifest.
    rows_read: event rows seen, dropped ones included.
    item_rows_skipped: malformed rows of the item metadata file skipped (--skip-bad-lines).
    detected: what the reader found out about the input, for the manifest's options (e.g.
        {"layout": "online-retail-ii", "sheets": [...]}).
    """

    events: pd.DataFrame
    items: pd.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)
    inputs: tuple[Path, ...] = ()
    rows_read: int = 0
    item_rows_skipped: int = 0
    detected: dict = field(default_factory=dict)


def make_events(
    user_id: pd.Categorical,
    item_id: pd.Categorical,
    timestamp: np.ndarray,
    event_type: str | pd.Categorical,
    value: np.ndarray,
) -> pd.DataFrame:
    """A RawData.events frame; a single event_type string is stored as a one-category column."""
    if isinstance(event_type, str):
        event_type = pd.Categorical.from_codes(np.zeros(len(timestamp), np.int8), [event_type])
    return pd.DataFrame(
        {
            "user_id": user_id,
            "item_id": item_id,
            "timestamp": np.asarray(timestamp, dtype=np.int64),
            "event_type": event_type,
            "value": np.asarray(value, dtype=np.float32),
        }
    )


def empty_items() -> pd.DataFrame:
    """An items frame with no rows (sources without item metadata)."""
    return pd.DataFrame(
        {
            "item_id": pd.Series([], dtype=object),
            "text": pd.Series([], dtype=object),
            "category": pd.Series([], dtype=object),
            "brand": pd.Series([], dtype=object),
            "price": pd.Series([], dtype="float64"),
        }
    )
