"""recdata.readers: each source's field mapping on tiny fixtures (tests/fixtures/recdata/)."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recdata import readers
from recdata.cleaning import clean_text, parse_price
from recdata.process import ProcessOptions, build_processed
from recdata.schema import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "recdata"


def sequences(result) -> dict[str, list[tuple[str, str]]]:
    """user -> [(item_id, split), ...] in stored order."""
    ids = result.items.set_index("item_idx")["item_id"]
    ev = result.events.assign(item_id=result.events["item_idx"].map(ids))
    return {
        str(user): list(zip(seq["item_id"], seq["split"].astype(str), strict=True))
        for user, seq in ev.groupby("user_id", observed=True, sort=True)
    }


def item(result, item_id: str) -> dict:
    return result.items.set_index("item_id").loc[item_id].to_dict()


def gzipped(src: Path, dst: Path) -> Path:
    with open(src, "rb") as f, gzip.GzipFile(dst, "wb", mtime=0) as g:
        shutil.copyfileobj(f, g)
    return dst


def test_amazon_2018_reviews_and_meta(tmp_path):
    reviews = gzipped(FIXTURES / "amazon2018_reviews.json", tmp_path / "Mugs.json.gz")
    meta = gzipped(FIXTURES / "amazon2018_meta.json", tmp_path / "meta_Mugs.json.gz")
    raw = readers.read_amazon(reviews, meta)
    assert raw.rows_read == 10  # the blank line is not a row
    result = build_processed(raw, ProcessOptions())
    # A1 reviewed B001 twice (t=100, t=300): the first is kept; B003 ties B001's repeat at t=300.
    # A3 has 2 reviews: below min-seq-len 3.
    assert sequences(result) == {
        "A1": [("B001", "train"), ("B002", "train"), ("B003", "valid"), ("B004", "test")],
        "A2": [("B002", "train"), ("B003", "valid"), ("B005", "test")],
    }
    ev = result.events
    assert ev["event_type"].unique().tolist() == ["rating"]
    assert ev.loc[ev["user_id"] == "A1", "value"].tolist() == [5.0, 3.0, 5.0, 5.0]
    b001 = item(result, "B001")
    assert (
        b001["text"]
        == "Red & Blue Mug | A mug. Dishwasher safe. | Acme | Home & Kitchen, Kitchen, Mugs"
    )
    assert (b001["category"], b001["brand"], b001["price"]) == ("Mugs", "Acme", 12.99)
    b002 = item(result, "B002")  # string description, HTML-only category entry, no price
    assert b002["text"] == "Tea Pot | A plain string description | Home & Kitchen, Teapots"
    assert b002["category"] == "Teapots" and np.isnan(b002["price"])
    b003 = item(result, "B003")  # the duplicate meta row is ignored
    assert (b003["text"], b003["brand"], b003["price"]) == ("Kettle | Boil Co", "Boil Co", 1299.0)
    assert item(result, "B005")["price"] == 10.0  # "$10.00 - $20.00": lower end
    assert item(result, "B004")["text"] == ""  # no meta line
    assert result.counts["items_without_metadata"] == 1
    assert "B999" not in set(result.items["item_id"])  # meta-only items are not indexed


def test_amazon_2023_jsonl_layout():
    raw = readers.read_amazon(
        FIXTURES / "amazon2023_reviews.jsonl", FIXTURES / "amazon2023_meta.jsonl"
    )
    result = build_processed(raw, ProcessOptions())
    assert sequences(result) == {
        "U1": [("P1", "train"), ("P2", "valid"), ("P3", "test")],
        "U2": [("P1", "train"), ("P2", "valid"), ("P3", "test")],
    }
    # Millisecond timestamps become seconds (floored).
    assert result.events["timestamp"].tolist()[:3] == [1588687728, 1588687729, 1588687800]
    p1 = item(result, "P1")
    assert p1["text"] == "Rose Soap | Hand-made soap | SoapCo | Beauty, Bath, Soaps"
    assert (p1["category"], p1["brand"], p1["price"]) == ("Soaps", "SoapCo", 9.5)
    p2 = item(result, "P2")  # no categories: main_category; store null: no brand
    assert (p2["category"], p2["brand"]) == ("All Beauty", "")


def test_movielens_dat_latin1_gzipped_ratings(tmp_path):
    ratings = gzipped(FIXTURES / "ml_ratings.dat", tmp_path / "ratings.dat.gz")
    raw = readers.read_movielens(ratings, FIXTURES / "ml_movies.dat")
    result = build_processed(raw, ProcessOptions(min_seq_len=5))
    seqs = sequences(result)
    assert set(seqs) == {"1", "2"}  # user 3 has 2 ratings
    # Movies 10 and 40 share a timestamp: file order (10 first) is kept.
    assert [m for m, _ in seqs["1"]] == ["10", "40", "30", "20", "50", "60"]
    assert [s for _, s in seqs["1"]] == ["train"] * 4 + ["valid", "test"]
    assert item(result, "10")["text"] == "Café Stories (1999) | Comedy, Drama"
    assert item(result, "10")["category"] == "Comedy"
    assert item(result, "40")["text"] == '"Quoted" Title (1997) | Children\'s, Animation'
    assert item(result, "30")["text"] == "Night Train: Part II (1998) | Thriller, Mystery"
    assert result.events["value"].tolist()[:2] == [5.0, 2.0]


def test_movielens_csv_layout():
    raw = readers.read_movielens(FIXTURES / "ml_ratings.csv", FIXTURES / "ml_movies.csv")
    result = build_processed(raw, ProcessOptions())
    assert sequences(result)["2"] == [("10", "train"), ("20", "valid"), ("40", "test")]
    assert result.events["value"].tolist()[:3] == [4.5, 3.0, 0.5]
    assert item(result, "10")["text"] == "Movie, With Comma (2010) | Action, Adventure"
    assert (item(result, "20")["text"], item(result, "20")["category"]) == (
        "Another Movie (2011)",
        "",
    )  # "(no genres listed)" is no genre
    assert item(result, "30")["text"] == "Café Film (2012) | Drama"


def retail_copies(tmp_path: Path) -> dict[str, Path]:
    """The retail fixture as csv, csv.gz, parquet and xlsx (typed like the UCI originals)."""
    csv_path = FIXTURES / "online_retail.csv"
    frame = pd.read_csv(csv_path, dtype={"InvoiceNo": str, "StockCode": str})
    frame["InvoiceDate"] = pd.to_datetime(frame["InvoiceDate"])
    paths = {
        "csv": csv_path,
        "csv.gz": gzipped(csv_path, tmp_path / "retail.csv.gz"),
        "parquet": tmp_path / "retail.parquet",
        "xlsx": tmp_path / "retail.xlsx",
    }
    frame.assign(InvoiceDate=frame["InvoiceDate"].dt.strftime("%Y-%m-%d %H:%M:%S")).to_parquet(
        paths["parquet"]
    )
    frame.to_excel(paths["xlsx"], index=False)
    return paths


def test_online_retail_all_formats_agree(tmp_path):
    results = {
        fmt: build_processed(readers.read_online_retail(path), ProcessOptions())
        for fmt, path in retail_copies(tmp_path).items()
    }
    first = results["csv"]
    assert sequences(first) == {
        # 85123A bought again on Dec 2 is a repeat; 12345 has 2 items (< 3).
        "17850": [("85123A", "train"), ("71053", "valid"), ("22633", "test")],
        # 84879 and 22745 are on one invoice: file order.
        "13047": [("84879", "train"), ("22745", "train"), ("85123A", "valid"), ("71053", "test")],
    }
    assert first.counts["dropped"] == {
        "bad_lines_skipped": 0,
        "missing_customer": 1,
        "cancellation": 1,
        "non_positive_quantity": 1,
        "duplicate": 1,
        "min_seq_len": 2,
    }
    assert set(first.events["event_type"]) == {"purchase"}
    assert first.events["value"].tolist()[:2] == [32.0, 6.0]
    # Most frequent description (tie: first seen), trailing space gone; median price.
    lantern = item(first, "71053")
    assert (lantern["text"], lantern["price"]) == ("WHITE METAL LANTERN", pytest.approx(3.695))
    assert item(first, "22633")["price"] == pytest.approx(1.925)  # missing-customer row ignored
    for fmt, other in results.items():
        pd.testing.assert_frame_equal(other.items, first.items, obj=fmt)
        pd.testing.assert_frame_equal(other.events, first.events, obj=fmt)
        assert other.counts == first.counts, fmt


def retail_ii_frame() -> pd.DataFrame:
    """The retail fixture in the Online Retail II layout (typed like the UCI original)."""
    frame = pd.read_csv(FIXTURES / "online_retail.csv", dtype={"InvoiceNo": str, "StockCode": str})
    frame["InvoiceDate"] = pd.to_datetime(frame["InvoiceDate"])
    return frame.rename(
        columns={"InvoiceNo": "Invoice", "UnitPrice": "Price", "CustomerID": "Customer ID"}
    )


def write_year_sheets(frame: pd.DataFrame, path: Path) -> Path:
    """frame as an xlsx with Online Retail II's two sheets (rows 0-5, then the rest)."""
    with pd.ExcelWriter(path) as excel:
        for sheet, rows in (("Year 2009-2010", frame[:6]), ("Year 2010-2011", frame[6:])):
            rows.to_excel(excel, sheet_name=sheet, index=False)
    return path


def test_online_retail_ii_layout_reads_like_the_old_one(tmp_path):
    old = readers.read_online_retail(FIXTURES / "online_retail.csv")
    assert old.detected == {"layout": "online-retail"}
    expected = build_processed(old, ProcessOptions())
    frame = retail_ii_frame()
    paths = {
        "csv": tmp_path / "online_retail_II.csv",
        "parquet": tmp_path / "online_retail_II.parquet",
        "xlsx": write_year_sheets(frame, tmp_path / "online_retail_II.xlsx"),
    }
    frame.to_csv(paths["csv"], index=False)
    assert ",17850.0," in paths["csv"].read_text()  # Customer ID is a float column
    frame.to_parquet(paths["parquet"])
    for fmt, path in paths.items():
        raw = readers.read_online_retail(path)
        sheets = {"sheets": ["Year 2009-2010", "Year 2010-2011"]} if fmt == "xlsx" else {}
        assert raw.detected == {"layout": "online-retail-ii"} | sheets, fmt
        result = build_processed(raw, ProcessOptions())
        pd.testing.assert_frame_equal(result.items, expected.items, obj=fmt)
        pd.testing.assert_frame_equal(result.events, expected.events, obj=fmt)
        assert result.counts == expected.counts, fmt


def test_xlsx_errors_name_the_sheet_and_its_row(tmp_path):
    frame = retail_ii_frame().astype({"Quantity": object})
    frame.loc[7, "Quantity"] = "six"  # the second data row of the second sheet
    path = write_year_sheets(frame, tmp_path / "online_retail_II.xlsx")
    with pytest.raises(DataError) as error:
        readers.read_online_retail(path)
    assert str(error.value) == (
        f"{path} sheet 'Year 2010-2011' row 3: Quantity 'six' is not an integer"
    )


def test_events_csv_with_iso_times_and_item_table():
    columns = readers.EventColumns(
        user="user",
        item="item",
        time="ts",
        event="action",
        value="weight",
        item_id="id",
        text=("title", "desc"),
        category="cat",
        brand="maker",
        price="cost",
    )
    raw = readers.read_events(FIXTURES / "events.csv", FIXTURES / "items.csv", columns=columns)
    result = build_processed(raw, ProcessOptions())
    assert sequences(result) == {
        "alice": [("apple", "train"), ("banana", "train"), ("cherry", "valid"), ("date", "test")],
        "bob": [("apple", "train"), ("cherry", "valid"), ("banana", "test")],
    }
    alice = result.events[result.events["user_id"] == "alice"]
    assert alice["event_type"].tolist() == ["view", "cart", "purchase", "view"]
    assert alice["value"].tolist() == [1.0, 2.0, 3.0, 1.0]
    # ISO strings with "T", " " or "Z" all become UTC epoch seconds.
    assert alice["timestamp"].tolist() == [1704103200, 1704106800, 1704182400, 1704274200]
    apple = item(result, "apple")
    assert apple["text"] == "Apple | Crisp, red apple"
    assert (apple["category"], apple["brand"], apple["price"]) == ("Fruit", "Orchard Inc", 1.2)
    assert item(result, "banana")["price"] == 0.5 and np.isnan(item(result, "cherry")["price"])


def test_events_parquet_with_epoch_milliseconds_and_defaults(tmp_path):
    path = tmp_path / "log.parquet"
    pd.DataFrame(
        {
            "user_id": [7, 7, 7, 8, 8, 8],  # integer ids become strings
            "item_id": ["a", "b", "c", "a", "c", "b"],
            "timestamp": [
                1_700_000_000_500,
                1_700_000_001_000,
                1_700_000_002_000,
                1_700_000_000_000,
                1_700_000_003_999,
                1_700_000_004_000,
            ],
        }
    ).to_parquet(path)
    result = build_processed(readers.read_events(path), ProcessOptions())
    assert sequences(result)["8"] == [("a", "train"), ("c", "valid"), ("b", "test")]
    assert result.events["timestamp"].tolist()[:3] == [1_700_000_000, 1_700_000_001, 1_700_000_002]
    assert set(result.events["event_type"]) == {"interaction"}
    assert set(result.events["value"]) == {1.0}


def test_clean_text_and_prices():
    values = pd.Series(["<p>Hi&nbsp;&amp; <b>bye</b></p>", None, "  a \n\t b ", 3])
    assert clean_text(values).tolist() == ["Hi & bye", "", "a b", "3"]
    assert parse_price("$1,299.99") == 1299.99
    assert parse_price("$5.00 - $9.00") == 5.0
    assert parse_price(7) == 7.0
    assert np.isnan(parse_price("")) and np.isnan(parse_price(None))
