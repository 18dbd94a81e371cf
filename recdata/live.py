"""The live service's database as training input: the events POSTed while serving and the
items PUT, added to what a source read (`prepare_data.py --live-db URL`), or on their own
(`--source events --live-db URL` without --input)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recdata.schema import DataError, RawData, empty_items, make_events

PAGE = 50_000


def read_live(url: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(events frame, items frame of the items put and not withdrawn since, manifest notes)."""
    from recdata.livedb import Database, DatabaseError, describe

    try:
        db = Database(url)
        events, changes = [], []
        while True:
            page = db.events(events[-1].seq if events else 0, limit=PAGE)
            events += page
            if len(page) < PAGE:
                break
        while True:
            page = db.item_changes(changes[-1].seq if changes else 0, limit=PAGE)
            changes += page
            if len(page) < PAGE:
                break
        db.close()
    except (DatabaseError, ValueError) as error:
        raise DataError(f"--live-db: {error}") from error
    latest = {}
    for change in changes:  # in order: the last change of an item wins
        latest[change.item_id] = change
    puts = [c for c in latest.values() if c.op == "put"]
    items = (
        pd.DataFrame(
            {
                "item_id": pd.Series([c.item_id for c in puts], dtype=object),
                "text": pd.Series([c.text or "" for c in puts], dtype=object),
                "category": pd.Series([c.category or "" for c in puts], dtype=object),
                "brand": pd.Series([c.brand or "" for c in puts], dtype=object),
                "price": pd.Series(
                    [np.nan if c.price is None else c.price for c in puts], dtype="float64"
                ),
            }
        )
        if puts
        else empty_items()
    )
    frame = make_events(
        pd.Categorical([e.user_id for e in events]),
        pd.Categorical([e.item_id for e in events]),
        np.array([int(e.ts) for e in events], np.int64),
        pd.Categorical([e.event_type for e in events]),
        np.ones(len(events), np.float32),
    )
    notes = {
        "live_db": describe(url),
        "live_events": len(events),
        "live_items": len(puts),
        "events_through": events[-1].seq if events else 0,
        "item_changes_through": changes[-1].seq if changes else 0,
    }
    return frame, items, notes


def _plain(events: pd.DataFrame) -> pd.DataFrame:
    return events.astype({name: object for name in ("user_id", "item_id", "event_type")})


def with_live(raw: RawData | None, url: str) -> tuple[RawData, dict]:
    """`raw` (None: nothing but the database) plus the live events and items; a live put
    replaces the source's text and metadata of that item."""
    events, items, notes = read_live(url)
    if raw is None:
        if events.empty:
            raise DataError(f"--live-db {notes['live_db']}: no events recorded yet")
        return RawData(events=events, items=items, rows_read=len(events)), notes
    merged = pd.concat([_plain(raw.events), _plain(events)], ignore_index=True)
    for name in ("user_id", "item_id", "event_type"):
        merged[name] = pd.Categorical(merged[name])
    base = raw.items
    if len(items):
        base = base[~base["item_id"].astype(str).isin(set(items["item_id"]))]
    all_items = pd.concat([base, items], ignore_index=True) if len(base) else items
    return RawData(
        events=merged,
        items=all_items,
        dropped=raw.dropped,
        inputs=raw.inputs,
        rows_read=raw.rows_read + len(events),
        item_rows_skipped=raw.item_rows_skipped,
        detected=raw.detected,
    ), notes
