"""recdata: raw interaction data sets -> items.parquet, events.parquet, manifest.json.

Readers (one per source) return `RawData`; `build_processed` dedupes, filters, splits and indexes
it following the evaluation protocol (shared/PROTOCOL.md); `write_processed` / `load_processed`
are the disk format. No TensorFlow here.
"""

from recdata.io import load_processed, make_manifest, write_processed
from recdata.process import Processed, ProcessOptions, build_processed
from recdata.readers import (
    EventColumns,
    read_amazon,
    read_events,
    read_movielens,
    read_online_retail,
    read_sample,
)
from recdata.schema import DataError, RawData
from recdata.synthetic import generate as generate_synthetic

__all__ = [
    "DataError",
    "EventColumns",
    "Processed",
    "ProcessOptions",
    "RawData",
    "build_processed",
    "generate_synthetic",
    "load_processed",
    "make_manifest",
    "read_amazon",
    "read_events",
    "read_movielens",
    "read_online_retail",
    "read_sample",
    "write_processed",
]
