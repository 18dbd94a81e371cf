"""prepare_data.py end to end: outputs, manifest, determinism, atomic writes, bad input."""

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from recdata import load_processed
from recdata.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "recdata"
ML_RATINGS = FIXTURES / "ml_ratings.dat"
ML_MOVIES = FIXTURES / "ml_movies.dat"
RETAIL = FIXTURES / "online_retail.csv"
DATA_FILES = ("items.parquet", "events.parquet", "manifest.json")
SMALL_SYNTHETIC = "--source synthetic --num-users 300 --num-items 200 --num-events 6000"


def argv(*parts) -> list[str]:
    """Strings are whitespace-separated flags; Paths stay whole."""
    out: list[str] = []
    for part in parts:
        out.extend([str(part)] if isinstance(part, Path) else str(part).split())
    return out


def run(capsys, *parts) -> tuple[int, str, str]:
    code = main(argv(*parts))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_fails(capsys, out: Path, *parts, message: str) -> None:
    """Exit code 2, one stderr line containing message, nothing at --out, no temp dirs."""
    before = set(out.parent.iterdir())
    code, _, stderr = run(capsys, *parts, "--out", out)
    assert code == 2
    assert message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()
    after = set(out.parent.iterdir())
    assert after == before, f"left behind: {after - before}"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ml_ratings_with(tmp_path: Path, replace: dict[int, str]) -> Path:
    """The MovieLens fixture with some lines (0-based index) replaced."""
    lines = ML_RATINGS.read_text(encoding="latin-1").splitlines()
    for index, line in replace.items():
        lines[index] = line
    return write(tmp_path / "ratings.dat", "\n".join(lines) + "\n", "latin-1")


# --- Outputs ------------------------------------------------------------------------------


def test_movielens_run_writes_the_three_files_and_a_complete_manifest(tmp_path, capsys):
    out = tmp_path / "processed" / "ml"
    code, stdout, stderr = run(
        capsys, "--source movielens --ratings", ML_RATINGS, "--movies", ML_MOVIES, "--out", out
    )
    assert code == 0, stderr
    assert stderr == ""
    assert "2 users, 6 items, 11 events" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(DATA_FILES)
    items, events, manifest = load_processed(out)
    assert manifest["schema_version"] == 1 and manifest["source"] == "movielens"
    assert manifest["inputs"] == [
        {"name": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in (ML_RATINGS, ML_MOVIES)
    ]
    options = manifest["options"]
    assert options["min_seq_len"] == 5  # the MovieLens default
    assert options["dedupe"] is True and options["split"] == "leave-one-out"
    assert options["skip_bad_lines"] is False
    assert {"kcore_users", "kcore_items", "cutoff", "valid_cutoff"} <= set(options)
    counts = manifest["counts"]
    assert (counts["num_users"], counts["num_items"], counts["num_events"]) == (2, 6, 11)
    assert counts["events_per_split"] == {"train": 7, "valid": 2, "test": 2}
    assert counts["dropped"]["min_seq_len"] == 2
    assert counts["sequence_length"] == {"p50": 5.5, "p90": 5.9, "p99": 5.99, "max": 6}
    assert len(items) == counts["num_items"] and len(events) == counts["num_events"]
    assert str(tmp_path) not in (out / "manifest.json").read_text()  # no absolute paths


def test_same_input_gives_byte_identical_files(tmp_path, capsys):
    for name in ("a", "b"):
        code, _, err = run(capsys, SMALL_SYNTHETIC, "--seed 5 --out", tmp_path / name)
        assert code == 0, err
    for name in DATA_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert run(capsys, SMALL_SYNTHETIC, "--seed 6 --out", tmp_path / "c")[0] == 0
    other = (tmp_path / "c" / "events.parquet").read_bytes()
    assert other != (tmp_path / "a" / "events.parquet").read_bytes()


def test_fixture_run_is_byte_identical_too(tmp_path, capsys):
    for name in ("a", "b"):
        assert (
            run(capsys, "--source online-retail --input", RETAIL, "--out", tmp_path / name)[0] == 0
        )
    for name in DATA_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_options_are_recorded_and_applied(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(
        capsys,
        "--source online-retail --input",
        RETAIL,
        "--keep-repeats --min-seq-len 2 --split temporal --cutoff 2010-12-02",
        "--valid-cutoff 2010-12-01T08:35:00 --out",
        out,
    )
    assert code == 0, err
    _, events, manifest = load_processed(out)
    options = manifest["options"]
    assert options["dedupe"] is False and options["min_seq_len"] == 2
    assert options["cutoff"] == 1291248000 and options["valid_cutoff"] == 1291192500
    assert "duplicate" not in manifest["counts"]["dropped"]
    assert "no_train_history" in manifest["counts"]["dropped"]
    assert set(events["split"]) == {"train", "valid", "test"}


def test_sparser_variant_options_are_recorded_and_applied(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(
        capsys, SMALL_SYNTHETIC, "--max-user-events 10 --drop-events 0.25 --seed 3 --out", out
    )
    assert code == 0, err
    _, _, manifest = load_processed(out)
    options, dropped = manifest["options"], manifest["counts"]["dropped"]
    assert (options["max_user_events"], options["drop_events"], options["seed"]) == (10, 0.25, 3)
    assert "seed" not in options["synthetic"]  # one seed for generator and drop
    after_dedupe = 6000 - dropped["duplicate"]
    assert dropped["drop_events"] == round(0.25 * after_dedupe)
    assert dropped["max_user_events"] > 0
    assert manifest["counts"]["sequence_length"]["max"] == 10
    assert list(dropped)[-4:] == ["duplicate", "drop_events", "max_user_events", "min_seq_len"]


def test_seed_and_drop_events_apply_to_file_sources_too(tmp_path, capsys):
    out = tmp_path / "out"
    retail = ("--source online-retail --input", RETAIL, "--split temporal --cutoff 2010-12-02")
    code, _, err = run(capsys, *retail, "--min-seq-len 1 --drop-events 0.3 --seed 7 --out", out)
    assert code == 0, err
    _, _, manifest = load_processed(out)
    assert manifest["options"]["layout"] == "online-retail"
    assert manifest["options"]["seed"] == 7
    assert manifest["counts"]["dropped"]["drop_events"] == 3  # 30% of the 9 deduped events
    assert "max_user_events" not in manifest["counts"]["dropped"]


def test_existing_output_is_replaced_on_success_and_kept_on_failure(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "--source movielens --ratings", ML_RATINGS, "--out", out)[0] == 0
    first = (out / "manifest.json").read_bytes()
    missing = tmp_path / "nope.dat"
    assert run(capsys, "--source movielens --ratings", missing, "--out", out)[0] == 2
    assert (out / "manifest.json").read_bytes() == first
    code, _, _ = run(
        capsys, "--source movielens --ratings", ML_RATINGS, "--min-seq-len 3 --out", out
    )
    assert code == 0
    assert json.loads((out / "manifest.json").read_text())["options"]["min_seq_len"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup dirs


def test_refuses_to_replace_a_directory_that_is_not_an_output(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    write(out / "notes.txt", "keep me")
    code, _, err = run(capsys, "--source movielens --ratings", ML_RATINGS, "--out", out)
    assert code == 2 and "refusing to replace" in err
    assert (out / "notes.txt").read_text() == "keep me"


# --- Bad input ----------------------------------------------------------------------------


def test_missing_file(tmp_path, capsys):
    missing = tmp_path / "ratings.dat"
    assert_fails(
        capsys, tmp_path / "out", "--source movielens --ratings", missing,
        message=f"{missing}: no such file",
    )  # fmt: skip


def test_truncated_gzip(tmp_path, capsys):
    data = gzip.compress(ML_RATINGS.read_bytes() * 50, mtime=0)
    path = tmp_path / "ratings.dat.gz"
    path.write_bytes(data[: len(data) // 2])
    assert_fails(
        capsys, tmp_path / "out", "--source movielens --ratings", path,
        message="ratings.dat.gz: unreadable or truncated gzip",
    )  # fmt: skip


def test_gz_name_that_is_not_gzip(tmp_path, capsys):
    path = write(tmp_path / "Books.json.gz", '{"reviewerID": "A"}\n')
    assert_fails(
        capsys, tmp_path / "out", "--source amazon --reviews", path,
        message="Books.json.gz: not a gzip file",
    )  # fmt: skip


def test_wrong_field_count_names_the_line(tmp_path, capsys):
    path = ml_ratings_with(tmp_path, {6: "2::20::5"})
    assert_fails(
        capsys, tmp_path / "out", "--source movielens --ratings", path,
        message="ratings.dat line 7: expected 4 fields, found 3",
    )  # fmt: skip


def test_non_numeric_rating_names_the_line(tmp_path, capsys):
    path = ml_ratings_with(tmp_path, {9: "2::40::four::978301003"})
    assert_fails(
        capsys, tmp_path / "out", "--source movielens --ratings", path,
        message="ratings.dat line 10: Rating 'four' is not a number",
    )  # fmt: skip


def test_line_numbers_count_blank_lines_and_quoted_newlines(tmp_path, capsys):
    text = 'user,item,ts\n\na,"multi\nline item",1\na,y,2\na,z,yesterday\n'
    path = write(tmp_path / "log.csv", text)
    assert_fails(
        capsys, tmp_path / "out", "--source events --input", path,
        "--user-col user --item-col item --time-col ts",
        message="log.csv line 6: ts 'yesterday' is not a time",
    )  # fmt: skip


def test_bad_json_names_the_line(tmp_path, capsys):
    lines = (FIXTURES / "amazon2018_reviews.json").read_text().splitlines()
    lines[2] = lines[2][:40]
    path = write(tmp_path / "Mugs.json", "\n".join(lines) + "\n")
    assert_fails(
        capsys, tmp_path / "out", "--source amazon --reviews", path,
        message="Mugs.json line 3: bad JSON",
    )  # fmt: skip


def test_json_record_missing_a_field(tmp_path, capsys):
    lines = (FIXTURES / "amazon2023_reviews.jsonl").read_text().splitlines()
    lines[4] = lines[4].replace('"rating": 1.0, ', "")
    path = write(tmp_path / "Beauty.jsonl", "\n".join(lines) + "\n")
    assert_fails(
        capsys, tmp_path / "out", "--source amazon --reviews", path,
        message="Beauty.jsonl line 5: missing field 'rating'",
    )  # fmt: skip


def test_missing_column_lists_the_columns_found(tmp_path, capsys):
    path = write(tmp_path / "events.csv", "user,item,ts\na,x,1\n")
    assert_fails(
        capsys, tmp_path / "out", "--source events --input", path,
        message="events.csv line 1: missing column 'user_id' (found: user, item, ts)",
    )  # fmt: skip


def test_retail_file_of_neither_layout_lists_both(tmp_path, capsys):
    path = tmp_path / "retail.parquet"
    pd.DataFrame({"InvoiceNo": ["1"], "StockCode": ["x"]}).to_parquet(path)
    assert_fails(
        capsys, tmp_path / "out", "--source online-retail --input", path,
        message="retail.parquet: columns match no known layout: "
        "online-retail needs InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice, "
        "CustomerID; online-retail-ii needs Invoice, StockCode, Description, Quantity, "
        "InvoiceDate, Price, Customer ID (found: InvoiceNo, StockCode)",
    )  # fmt: skip


def test_missing_column_in_parquet(tmp_path, capsys):
    path = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": ["1"], "item_id": ["x"]}).to_parquet(path)
    assert_fails(
        capsys, tmp_path / "out", "--source events --input", path,
        message="log.parquet: missing column 'timestamp' (found: user_id, item_id)",
    )  # fmt: skip


def test_empty_after_filtering(tmp_path, capsys):
    assert_fails(
        capsys, tmp_path / "out", "--source movielens --ratings", ML_RATINGS,
        "--min-seq-len 50",
        message="ml_ratings.dat: no events left after filtering",
    )  # fmt: skip


def test_skip_bad_lines_skips_and_counts(tmp_path, capsys):
    # A line with a missing field and one with a non-numeric rating.
    path = ml_ratings_with(tmp_path, {3: "1::30::4", 6: "1::50::x::978303000"})
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "--source movielens --ratings", path,
        "--skip-bad-lines --min-seq-len 3 --out", out,
    )  # fmt: skip
    assert code == 0, err
    _, events, manifest = load_processed(out)
    counts = manifest["counts"]
    assert manifest["options"]["skip_bad_lines"] is True
    assert counts["dropped"]["bad_lines_skipped"] == 2
    assert counts["dropped"]["min_seq_len"] == 2  # user 3
    assert counts["rows_read"] == 13 and counts["num_events"] == len(events) == 13 - 2 - 2


def test_usage_errors_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "--source movielens --out", out)[0] == 2  # no --ratings
    assert run(capsys, "--source sample --input", ML_RATINGS, "--out", out)[0] == 2
    assert run(capsys, "--source sample --split temporal --out", out)[0] == 2  # no --cutoff
    code, _, err = run(capsys, "--source sample --min-seq-len 2 --out", out)
    assert code == 2 and "--min-seq-len >= 3" in err
    code, _, err = run(capsys, "--source events --input", RETAIL, "--text-cols a --out", out)
    assert code == 2 and "--text-cols needs --items" in err
    for flags, message in (
        ("--drop-events 1", "argument --drop-events: must be >= 0 and < 1, got 1"),
        ("--drop-events -0.1", "argument --drop-events: must be >= 0 and < 1, got -0.1"),
        ("--drop-events x", "argument --drop-events: 'x' is not a number"),
        ("--max-user-events 0", "argument --max-user-events: must be >= 1, got 0"),
        ("--max-user-events 2", "--max-user-events 2 is below --min-seq-len 3"),
    ):
        code, _, err = run(capsys, "--source sample", flags, "--out", out)
        assert code == 2 and message in err, err
    code, _, err = run(
        capsys, "--source movielens --ratings", ML_RATINGS, "--max-user-events 4 --out", out
    )
    assert code == 2 and "below --min-seq-len 5" in err  # the MovieLens default
    assert not out.exists()


def test_sample_source_reproduces_the_protocol_counts(tmp_path, capsys):
    code, stdout, err = run(capsys, "--source sample --out", tmp_path / "s")
    assert code == 0, err
    assert "4192 users, 3665 items, 266600 events" in stdout
    _, events, manifest = load_processed(tmp_path / "s")
    assert manifest["inputs"][0]["name"] == "online_retail.parquet"
    assert manifest["counts"]["dropped"]["missing_customer"] == 135080
    assert manifest["counts"]["dropped"]["cancellation"] == 8905
    assert events["user_id"].str.fullmatch(r"\d{5}").all()  # "17850", not "17850.0"


# --- Real subprocesses --------------------------------------------------------------------


def prepare(*parts) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "prepare_data.py"), *argv(*parts)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_subprocess_success_and_failure(tmp_path):
    ok = prepare("--source online-retail --input", RETAIL, "--out", tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    assert "2 users, 5 items, 7 events" in ok.stdout
    missing = tmp_path / "missing.xlsx"
    bad = prepare("--source online-retail --input", missing, "--out", tmp_path / "bad")
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"prepare_data.py: error: {missing}: no such file"
    assert not (tmp_path / "bad").exists()
    usage = prepare("--source nope --out", tmp_path / "x")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
