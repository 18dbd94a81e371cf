"""Batch scoring (serving/batch.py) over the tiny exported model: the same answers as the API,
--users, resuming an interrupted run, bad input, the command line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from serving import batch
from serving.app import create_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tiny_export, tmp_path_factory):
    """A private copy of the fixture's version 1 (other tests add versions to the shared one)."""
    root = tmp_path_factory.mktemp("batch-model")
    shutil.copytree(tiny_export[1] / "1", root / "1")
    return root


@pytest.fixture(scope="module")
def exported_k(model_dir):
    return json.loads((model_dir / "1" / "metadata.json").read_text())["k"]


@pytest.fixture(scope="module")
def all_users(model_dir):
    return pd.read_parquet(model_dir / "1" / "user_histories.parquet")["user_id"].tolist()


@pytest.fixture(scope="module")
def api_answers(model_dir, all_users, exported_k):
    """GET /recommendations/{user}?k=K for every user, exact index."""
    k = exported_k - 3
    answers = {}
    with TestClient(create_app(model_dir, index="bruteforce", poll_seconds=0)) as client:
        for user in all_users:
            response = client.get(f"/recommendations/{user}", params={"k": k})
            assert response.status_code == 200, response.text
            answers[user] = [(r["item_id"], r["score"]) for r in response.json()["recommendations"]]
    return k, answers


def read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def leftovers(directory: Path, out: Path) -> list[str]:
    """Anything besides `out` that the job left in directory (temp files, parts)."""
    return sorted(p.name for p in directory.iterdir() if p != out)


def test_output_equals_the_api_for_every_user(model_dir, api_answers, all_users, tmp_path,
                                              capsys):
    k, answers = api_answers
    out = tmp_path / "recs.parquet"
    # batch size 7: several batches, the last one short, rows of different history lengths
    assert batch.main(["--model-dir", str(model_dir), "--out", str(out), "--k", str(k),
                       "--index", "bruteforce", "--batch-size", "7"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(all_users)} users" in printed and "users/s" in printed

    schema = pq.read_schema(out)
    assert schema.field("user_id").type == pa.string()
    assert schema.field("item_ids").type == pa.list_(pa.string())
    assert schema.field("scores").type == pa.list_(pa.float32())
    assert pa.types.is_integer(schema.field("model_version").type)
    frame = read(out)
    assert frame["user_id"].tolist() == all_users  # every known user, in the file's order
    assert (frame["model_version"] == 1).all()
    for user, item_ids, scores in zip(frame["user_id"], frame["item_ids"], frame["scores"]):
        expected = answers[user]  # < k items where the history leaves fewer unseen ones
        assert list(item_ids) == [item for item, _ in expected], user
        assert list(scores) == pytest.approx([score for _, score in expected], abs=1e-4)
    assert leftovers(tmp_path, out) == []


def test_scann_index_returns_k_items_per_user(model_dir, all_users, tmp_path):
    out = tmp_path / "recs.parquet"
    assert batch.main(["--model-dir", str(model_dir), "--out", str(out), "--k", "5",
                       "--index", "scann", "--batch-size", "16"]) == 0
    frame = read(out)
    assert frame["user_id"].tolist() == all_users
    assert frame["item_ids"].map(len).eq(5).all()
    assert frame["scores"].map(len).eq(5).all()
    for item_ids, scores in zip(frame["item_ids"], frame["scores"]):
        assert len(set(item_ids)) == 5
        assert list(scores) == sorted(scores, reverse=True)


def test_users_file_subset_and_unknown_ids(model_dir, api_answers, all_users, tmp_path, capsys):
    k, answers = api_answers
    subset = [all_users[5], all_users[0], all_users[5], all_users[-1]]  # a repeat: scored once
    users_file = tmp_path / "users.txt"
    users_file.write_text("\n".join([subset[0], "  no-such-user  ", "", *subset[1:],
                                     "ghost"]) + "\n")
    out = tmp_path / "subset.parquet"
    assert batch.main(["--model-dir", str(model_dir), "--out", str(out), "--k", str(k),
                       "--users", str(users_file), "--index", "bruteforce"]) == 0
    captured = capsys.readouterr()
    assert "2 unknown user id(s) skipped" in captured.err
    assert "'no-such-user'" in captured.err and "'ghost'" in captured.err
    frame = read(out)
    assert frame["user_id"].tolist() == [all_users[5], all_users[0], all_users[-1]]
    for user, item_ids in zip(frame["user_id"], frame["item_ids"]):
        assert list(item_ids) == [item for item, _ in answers[user]]


def test_resume_after_interruption_skips_finished_chunks(model_dir, all_users, tmp_path,
                                                         monkeypatch):
    args = ["--model-dir", str(model_dir), "--k", "6", "--index", "bruteforce",
            "--batch-size", "4", "--chunk-size", "12"]
    reference = tmp_path / "reference.parquet"
    assert batch.main([*args, "--out", str(reference)]) == 0

    out_dir = tmp_path / "job"
    out = out_dir / "recs.parquet"
    real_score_batch = batch.score_batch
    scored: list[str] = []

    def failing(model, users, k):  # the 4th batch is the first of the second chunk
        if len(scored) >= 12:
            raise KeyboardInterrupt
        scored.extend(users)
        return real_score_batch(model, users, k)

    monkeypatch.setattr(batch, "score_batch", failing)
    assert batch.main([*args, "--out", str(out)]) == 130
    assert not out.exists()
    parts = batch.parts_dir_for(out)
    assert sorted(p.name for p in parts.iterdir()) == ["part-000000.parquet", "run.json"]
    first_chunk = set(read(parts / "part-000000.parquet")["user_id"])
    assert first_chunk == set(all_users[:12])

    def counting(model, users, k):
        scored.extend(users)
        return real_score_batch(model, users, k)

    scored.clear()
    monkeypatch.setattr(batch, "score_batch", counting)
    assert batch.main([*args, "--out", str(out), "--resume"]) == 0
    assert sorted(scored) == sorted(all_users[12:])  # the first chunk was not scored again
    pd.testing.assert_frame_equal(read(out), read(reference))
    assert not parts.exists() and leftovers(out_dir, out) == []


def test_resume_refuses_parts_of_a_different_run(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "recs.parquet"
    args = ["--model-dir", str(model_dir), "--out", str(out), "--index", "bruteforce",
            "--batch-size", "4", "--chunk-size", "8"]
    real_score_batch = batch.score_batch
    calls = []

    def failing(model, users, k):
        calls.append(users)
        if len(calls) > 2:
            raise RuntimeError("simulated crash")
        return real_score_batch(model, users, k)

    monkeypatch.setattr(batch, "score_batch", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        batch.main([*args, "--k", "6"])
    monkeypatch.setattr(batch, "score_batch", real_score_batch)
    assert batch.main([*args, "--k", "7", "--resume"]) == 2  # other k: not mixed
    assert not out.exists() and batch.parts_dir_for(out).exists()
    assert batch.main([*args, "--k", "7"]) == 0  # without --resume: starts over
    assert read(out)["item_ids"].map(len).eq(7).all()
    assert leftovers(tmp_path, out) == []


@pytest.mark.parametrize("problem", ["k too large", "k zero", "no model dir", "no version",
                                     "missing version", "unreadable users", "empty users"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(problem, model_dir, exported_k,
                                                            tmp_path, capsys):
    empty = tmp_path / "empty-model-dir"
    empty.mkdir()
    (empty / "tf_serving").mkdir()
    (empty / ".tmp-3-x").mkdir()
    (tmp_path / "blank.txt").write_text("\n  \n")
    argv = {"k too large": ["--k", str(exported_k + 1)],
            "k zero": ["--k", "0"],
            "no model dir": ["--model-dir", str(tmp_path / "nowhere")],
            "no version": ["--model-dir", str(empty)],
            "missing version": ["--version", "7"],
            "unreadable users": ["--users", str(tmp_path / "missing.txt")],
            "empty users": ["--users", str(tmp_path / "blank.txt")]}[problem]
    out = tmp_path / "out" / "recs.parquet"
    base = ["--model-dir", str(model_dir), "--out", str(out), "--index", "bruteforce"]
    assert batch.main(base + argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serving.batch: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()  # nothing written, not even the directory
    if problem == "k too large":
        assert f"k={exported_k}" in lines[0]


def test_command_line_in_a_subprocess(model_dir, exported_k, tmp_path):
    out = tmp_path / "recs.parquet"
    command = [sys.executable, "-m", "serving.batch", "--model-dir", str(model_dir),
               "--out", str(out), "--k", "3", "--index", "bruteforce"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "users/s" in done.stdout
    assert read(out)["item_ids"].map(len).eq(3).all()

    bad = subprocess.run([*command[:-4], "--k", str(exported_k + 1)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "Traceback" not in bad.stderr


def test_user_without_catalog_items_gets_the_api_fallback(model_dir, tmp_path):
    """A stored history with no catalog item: the popular items, as GET /recommendations."""
    root = tmp_path / "model"
    shutil.copytree(model_dir / "1", root / "1")
    path = root / "1" / "user_histories.parquet"
    users = pd.read_parquet(path)
    extra = pd.DataFrame({"user_id": ["cold"], "history": [["NOT-AN-ITEM"]],
                          "event_types": [["view"]]})
    pd.concat([users, extra], ignore_index=True).to_parquet(path, index=False)
    out = tmp_path / "recs.parquet"
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"cold\n{users['user_id'][0]}\n")
    assert batch.main(["--model-dir", str(root), "--out", str(out), "--k", "4",
                       "--users", str(users_file), "--index", "bruteforce"]) == 0
    frame = read(out).set_index("user_id")
    with TestClient(create_app(root, index="bruteforce", poll_seconds=0)) as client:
        for user in ("cold", users["user_id"][0]):
            body = client.get(f"/recommendations/{user}", params={"k": 4}).json()
            assert body["fallback"] == (user == "cold")
            assert list(frame.loc[user, "item_ids"]) == [
                r["item_id"] for r in body["recommendations"]]
            assert list(frame.loc[user, "scores"]) == pytest.approx(
                [r["score"] for r in body["recommendations"]], abs=1e-4)
