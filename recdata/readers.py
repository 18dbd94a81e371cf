"""One reader per source: each maps a raw data set onto `RawData` (events in file order + items).

Readers only translate formats and drop rows the source itself marks as unusable (e.g. Online
Retail cancellations); dedupe, filters and splits are `recdata.process`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from numpy.typing import ArrayLike

from recdata.cleaning import clean_string, clean_text, flatten_text, join_text, parse_price
from recdata.schema import DataError, RawData, make_events
from recdata.tables import input_files, iter_json_lines, read_delimited, read_table

SAMPLE_FILE = Path(__file__).resolve().parents[1] / "data" / "sample" / "online_retail.parquet"


def items_frame(
    item_id: ArrayLike,
    text: ArrayLike,
    category: ArrayLike | None = None,
    brand: ArrayLike | None = None,
    price: ArrayLike | None = None,
) -> pd.DataFrame:
    """A RawData.items frame with one row per item_id (the first row of each id wins).

    Missing category/brand columns become "", a missing price NaN.
    """
    n = len(item_id)
    blank = np.full(n, "", dtype=object)
    frame = pd.DataFrame(
        {
            "item_id": np.asarray(item_id, dtype=object),
            "text": np.asarray(text, dtype=object),
            "category": blank if category is None else np.asarray(category, dtype=object),
            "brand": blank if brand is None else np.asarray(brand, dtype=object),
            "price": np.full(n, np.nan) if price is None else np.asarray(price, np.float64),
        }
    )
    return frame.drop_duplicates("item_id", keep="first").reset_index(drop=True)


def _raw_data(
    events: pd.DataFrame,
    inputs: tuple[Path | None, ...],
    *,
    rows_read: int,
    bad_lines: int,
    items: tuple[pd.DataFrame, int] | None = None,
    dropped: dict[str, int] | None = None,
    detected: dict | None = None,
) -> RawData:
    """The RawData every reader returns.

    items: (items frame, item rows skipped), or None when there is no item metadata (an empty
    items frame). inputs: the input paths, None for an optional file not given. dropped: drop
    reasons beyond "bad_lines_skipped", which always comes first. detected: see RawData.
    """
    item_frame, item_rows_skipped = (items_frame([], []), 0) if items is None else items
    return RawData(
        events=events,
        items=item_frame,
        dropped={"bad_lines_skipped": bad_lines, **(dropped or {})},
        inputs=tuple(p for p in inputs if p is not None),
        rows_read=rows_read,
        item_rows_skipped=item_rows_skipped,
        detected=detected or {},
    )


# --- Amazon Reviews (2018 and 2023 layouts) ------------------------------------------------


@dataclass(frozen=True)
class _ReviewLayout:
    name: str
    user: str
    item: str
    time: str
    rating: str
    time_scale: int  # divide the time field by this to get seconds


_AMAZON_2018 = _ReviewLayout("2018", "reviewerID", "asin", "unixReviewTime", "overall", 1)
_AMAZON_2023 = _ReviewLayout("2023", "user_id", "parent_asin", "timestamp", "rating", 1000)


def _review_layout(record: dict) -> _ReviewLayout | None:
    if "reviewerID" in record:
        return _AMAZON_2018
    if "user_id" in record:
        return _AMAZON_2023
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _review_problem(record: dict, layout: _ReviewLayout) -> str | None:
    for key in (layout.user, layout.item, layout.time, layout.rating):
        if key not in record:
            return f"missing field '{key}' (Amazon {layout.name} layout)"
    for key in (layout.user, layout.item):
        if not isinstance(record[key], str) or not record[key].strip():
            return f"field '{key}' {record[key]!r} is not a non-empty string"
    for key in (layout.time, layout.rating):
        if not _is_number(record[key]):
            return f"field '{key}' {record[key]!r} is not a number"
    return None


def read_amazon(
    reviews: Path, meta: Path | None = None, *, skip_bad_lines: bool = False
) -> RawData:
    """Amazon Reviews 2018 (`CATEGORY.json.gz`, 5-core files) or 2023 (`CATEGORY.jsonl`) + meta.

    2018: user = reviewerID, item = asin, time = unixReviewTime, value = overall.
    2023: user = user_id, item = parent_asin, time = timestamp (ms), value = rating.
    Events are "rating"s. The layout is recognised from the first record.
    """
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    ratings: list[float] = []
    layout: _ReviewLayout | None = None
    rows = bad = 0
    for n, record in iter_json_lines(reviews, skip_bad_lines):
        rows += 1
        if record is not None and layout is None:
            layout = _review_layout(record)
        if record is None:
            problem = "bad JSON"
        elif layout is None:
            problem = "no 'reviewerID' (Amazon 2018 layout) or 'user_id' (2023 layout) field"
        else:
            problem = _review_problem(record, layout)
        if problem is not None:
            if not skip_bad_lines:
                raise DataError(f"{reviews} line {n}: {problem}")
            bad += 1
            continue
        users.append(record[layout.user].strip())
        items.append(record[layout.item].strip())
        times.append(int(record[layout.time]) // layout.time_scale)
        ratings.append(float(record[layout.rating]))
    events = make_events(
        pd.Categorical(users),
        pd.Categorical(items),
        np.array(times, np.int64),
        "rating",
        np.array(ratings, np.float32),
    )
    return _raw_data(
        events,
        (reviews, meta),
        rows_read=rows,
        bad_lines=bad,
        items=_read_amazon_meta(meta, skip_bad_lines) if meta else None,
    )


def _category_path(categories: object) -> list[str]:
    """A category field (list or string) as cleaned, non-empty entries (HTML-only ones go)."""
    entries = categories if isinstance(categories, list) else [categories]
    cleaned = (clean_string(flatten_text(entry)) for entry in entries)
    return [entry for entry in cleaned if entry]


def _read_amazon_meta(path: Path, skip_bad_lines: bool) -> tuple[pd.DataFrame, int]:
    """Amazon metadata: 2018 (asin, title, description, brand, category, price "$12.99") or
    2023 (parent_asin, title, description, store, categories, main_category, price)."""
    ids, titles, descriptions, brands, paths, leaves, prices = ([] for _ in range(7))
    bad = 0
    for n, record in iter_json_lines(path, skip_bad_lines):
        item = None if record is None else record.get("parent_asin", record.get("asin"))
        if not isinstance(item, str) or not item.strip():
            if not skip_bad_lines:
                raise DataError(f"{path} line {n}: missing field 'asin' / 'parent_asin'")
            bad += 1
            continue
        ids.append(item.strip())
        titles.append(flatten_text(record.get("title")))
        descriptions.append(flatten_text(record.get("description")))
        brands.append(flatten_text(record.get("brand", record.get("store"))))
        trail = _category_path(record.get("category", record.get("categories")))
        paths.append(", ".join(trail))
        # The most specific category; 2023 records without categories have main_category.
        main = clean_string(flatten_text(record.get("main_category")))
        leaves.append(trail[-1] if trail else main)
        prices.append(parse_price(record.get("price")))
    text = join_text(
        [
            pd.Series(titles, dtype=object),
            pd.Series(descriptions, dtype=object),
            pd.Series(brands, dtype=object),
            pd.Series(paths, dtype=object),
        ]
    )
    brand = clean_text(pd.Series(brands, dtype=object))
    return items_frame(ids, text, leaves, brand, np.array(prices, np.float64)), bad


# --- MovieLens ---------------------------------------------------------------------------


def _is_csv(path: Path) -> bool:
    return path.name.lower().removesuffix(".gz").endswith(".csv")


def read_movielens(
    ratings: Path, movies: Path | None = None, *, skip_bad_lines: bool = False
) -> RawData:
    """MovieLens ratings + movies: ML-1M/10M `.dat` ('::', latin-1, ratings maybe gzipped) or
    ML-latest/25M `.csv`. Events are "rating"s; item text = title + genres, category = first genre.
    """
    if _is_csv(ratings):
        user, movie, rating, ts = "userId", "movieId", "rating", "timestamp"
        table = read_delimited(ratings, [user, movie, rating, ts], skip_bad_lines=skip_bad_lines)
    else:
        user, movie, rating, ts = "UserID", "MovieID", "Rating", "Timestamp"
        table = read_delimited(
            ratings,
            [],
            names=[user, movie, rating, ts],
            double_colon=True,
            encoding="latin-1",
            skip_bad_lines=skip_bad_lines,
        )
    users, bad_user = table.ids(user)
    items, bad_item = table.ids(movie)
    values, bad_rating = table.number(rating)
    times, bad_time = table.number(ts, integer=True)
    keep = table.keep_good_rows(
        [
            (user, bad_user, "an id"),
            (movie, bad_item, "an id"),
            (rating, bad_rating, "a number"),
            (ts, bad_time, "an integer (epoch seconds)"),
        ],
        skip_bad_lines,
    )
    events = make_events(users[keep], items[keep], times[keep], "rating", values[keep])
    return _raw_data(
        events,
        (ratings, movies),
        rows_read=table.rows_read,
        bad_lines=table.bad_lines,
        items=_read_movies(movies, skip_bad_lines) if movies else None,
    )


def _read_movies(path: Path, skip_bad_lines: bool) -> tuple[pd.DataFrame, int]:
    if _is_csv(path):
        movie, title, genres = "movieId", "title", "genres"
        table = read_delimited(path, [movie, title, genres], skip_bad_lines=skip_bad_lines)
    else:
        movie, title, genres = "MovieID", "Title", "Genres"
        table = read_delimited(
            path,
            [],
            names=[movie, title, genres],
            double_colon=True,
            encoding="latin-1",
            skip_bad_lines=skip_bad_lines,
        )
    ids, bad_id = table.ids(movie)
    keep = table.keep_good_rows([(movie, bad_id, "an id")], skip_bad_lines)
    genre_lists = (
        table.text(genres)[keep]
        .str.replace("(no genres listed)", "", regex=False)
        .str.split("|")
        .map(lambda gs: [g.strip() for g in gs if g.strip()])
    )
    text = join_text([table.text(title)[keep], genre_lists.str.join(", ")])
    category = genre_lists.map(lambda gs: gs[0] if gs else "")
    return items_frame(np.asarray(ids[keep]), text, category), table.bad_lines


# --- UCI Online Retail (and Online Retail II) ---------------------------------------------


@dataclass(frozen=True)
class _RetailLayout:
    invoice: str
    price: str
    customer: str

    @property
    def columns(self) -> tuple[str, ...]:
        common = ("StockCode", "Description", "Quantity", "InvoiceDate")
        return (self.invoice, *common, self.price, self.customer)


# Online Retail (2010-2011) and its successor Online Retail II (2009-2011, one xlsx sheet a year).
RETAIL_LAYOUTS = {
    "online-retail": _RetailLayout("InvoiceNo", "UnitPrice", "CustomerID"),
    "online-retail-ii": _RetailLayout("Invoice", "Price", "Customer ID"),
}


def read_online_retail(path: Path, *, skip_bad_lines: bool = False) -> RawData:
    """UCI Online Retail or Online Retail II (xlsx, all sheets; csv, csv.gz or parquet): one
    "purchase" event per invoice line. The layout is recognised from the header.

    user = CustomerID / Customer ID (as an integer string), item = StockCode, value = Quantity.
    Rows are dropped, and counted in this order, for: no customer, cancellation (invoice
    "C..."), Quantity <= 0. Item text is the item's most frequent Description and price its
    median UnitPrice / Price, both over the kept rows.
    """
    layouts = {name: layout.columns for name, layout in RETAIL_LAYOUTS.items()}
    table = read_table(path, (), layouts=layouts, skip_bad_lines=skip_bad_lines)
    layout = RETAIL_LAYOUTS[table.layout]
    stock, bad_stock = table.ids("StockCode")
    quantity, bad_quantity = table.number("Quantity", integer=True)
    price, bad_price = table.number(layout.price)
    customer, bad_customer = table.number(layout.customer, integer=True, nullable=True)
    times, bad_time = table.epoch_seconds("InvoiceDate")
    good = table.keep_good_rows(
        [
            ("StockCode", bad_stock, "an id"),
            ("Quantity", bad_quantity, "an integer"),
            ("InvoiceDate", bad_time, "a date"),
            (layout.price, bad_price, "a number"),
            (layout.customer, bad_customer, "an integer"),
        ],
        skip_bad_lines,
    )
    no_customer = good & np.isnan(customer)
    is_cancellation = table.text(layout.invoice).str.strip().str.startswith("C").to_numpy(bool)
    cancelled = good & ~no_customer & is_cancellation
    non_positive = good & ~no_customer & ~cancelled & (quantity <= 0)
    use = good & ~no_customer & ~cancelled & ~non_positive

    customers, user_codes = np.unique(customer[use].astype(np.int64), return_inverse=True)
    users = pd.Categorical.from_codes(user_codes.astype(np.int32), customers.astype(str))
    events = make_events(users, stock[use], times[use], "purchase", quantity[use])
    detected = {"layout": table.layout} | ({"sheets": list(table.sheets)} if table.sheets else {})
    return _raw_data(
        events,
        (path,),
        rows_read=table.rows_read,
        bad_lines=table.bad_lines,
        items=(_retail_items(stock[use], table.text("Description")[use], price[use]), 0),
        dropped={
            "missing_customer": int(no_customer.sum()),
            "cancellation": int(cancelled.sum()),
            "non_positive_quantity": int(non_positive.sum()),
        },
        detected=detected,
    )


def _retail_items(stock: pd.Categorical, description: pd.Series, price: np.ndarray) -> pd.DataFrame:
    rows = pd.DataFrame(
        {
            "item_id": np.asarray(stock, dtype=object),
            "description": clean_text(description).to_numpy(),
        }
    )
    named = rows[rows["description"] != ""]
    # Most frequent description per item; ties go to the one seen first (groupby sort=False
    # lists groups in order of first appearance, and the sort below is stable).
    votes = named.groupby(["item_id", "description"], sort=False).size().rename("n").reset_index()
    best = votes.sort_values("n", ascending=False, kind="stable").drop_duplicates("item_id")
    median_price = pd.Series(price).groupby(rows["item_id"].to_numpy()).median()
    ids = median_price.index.to_numpy()
    text = best.set_index("item_id")["description"].reindex(ids).fillna("")
    return items_frame(ids, text, price=median_price)


def read_sample(*, skip_bad_lines: bool = False) -> RawData:
    """The embedded sample (data/sample/): UCI Online Retail, read like `read_online_retail`."""
    return read_online_retail(SAMPLE_FILE, skip_bad_lines=skip_bad_lines)


# --- Generic interaction logs ------------------------------------------------------------


@dataclass(frozen=True)
class EventColumns:
    """Which columns of an events file (and optional items table) mean what."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    event: str | None = None  # without it every event is an "interaction"
    value: str | None = None  # without it every value is 1.0
    item_id: str | None = None  # id column of the items table; defaults to `item`
    text: tuple[str, ...] = ()
    category: str | None = None
    brand: str | None = None
    price: str | None = None


def read_events(
    path: Path,
    items: Path | None = None,
    *,
    columns: EventColumns = EventColumns(),
    skip_bad_lines: bool = False,
) -> RawData:
    """Any interaction log (CSV, CSV.gz, Parquet or a directory of Parquet shards) plus an
    optional items table.

    Times may be epoch seconds, epoch milliseconds or ISO 8601 strings.
    """
    c = columns
    required = [c.user, c.item, c.time, *(x for x in (c.event, c.value) if x)]
    table = read_table(path, required, skip_bad_lines=skip_bad_lines)
    users, bad_user = table.ids(c.user)
    item_ids, bad_item = table.ids(c.item)
    times, bad_time = table.epoch_seconds(c.time)
    checks = [
        (c.user, bad_user, "an id"),
        (c.item, bad_item, "an id"),
        (c.time, bad_time, "a time (epoch seconds/ms or ISO 8601)"),
    ]
    values = np.ones(len(times), np.float64)
    if c.value:
        values, bad_value = table.number(c.value)
        checks.append((c.value, bad_value, "a number"))
    event_type: str | pd.Categorical = "interaction"
    if c.event:
        event_type, bad_event = table.ids(c.event)
        checks.append((c.event, bad_event, "an event type"))
    keep = table.keep_good_rows(checks, skip_bad_lines)
    if not isinstance(event_type, str):
        event_type = event_type[keep]
    events = make_events(users[keep], item_ids[keep], times[keep], event_type, values[keep])
    return _raw_data(
        events,
        (*input_files(path), items),
        rows_read=table.rows_read,
        bad_lines=table.bad_lines,
        items=read_item_table(items, c, skip_bad_lines) if items else None,
    )


def read_item_table(path: Path, c: EventColumns, skip_bad_lines: bool) -> tuple[pd.DataFrame, int]:
    id_col = c.item_id or c.item
    wanted = [id_col, *c.text, *(x for x in (c.category, c.brand, c.price) if x)]
    table = read_table(path, list(dict.fromkeys(wanted)), skip_bad_lines=skip_bad_lines)
    ids, bad_id = table.ids(id_col)
    keep = table.keep_good_rows([(id_col, bad_id, "an id")], skip_bad_lines)
    text = join_text([table.text(col)[keep] for col in c.text]) if c.text else None
    category = clean_text(table.text(c.category)[keep]) if c.category else None
    brand = clean_text(table.text(c.brand)[keep]) if c.brand else None
    price = None
    if c.price:
        col = table.column(c.price)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            price = table.number(c.price, nullable=True)[0][keep]
        else:  # strings such as "$12.99"
            price = table.text(c.price)[keep].map(parse_price)
    item_ids = np.asarray(ids[keep], dtype=object)
    if text is None:
        text = np.full(len(item_ids), "", dtype=object)
    return items_frame(item_ids, text, category, brand, price), table.bad_lines
