"""python -m serving.compare over the tiny exported model: a version against an identical copy,
its figures against training's test metrics, the paired bootstrap by hand, the pairing of users,
bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serving import compare as cv


def edit_metadata(version_dir: Path, **changes) -> None:
    path = version_dir / "metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def model_dir(tiny_export, tmp_path_factory):
    """Version 1 of the fixture and version 2, an identical copy (as test_api's add_version)."""
    root = tmp_path_factory.mktemp("compare")
    for version in (1, 2):
        shutil.copytree(tiny_export[1] / "1", root / str(version))
    return root


@pytest.fixture(scope="module")
def bad_dir(tiny_export, tmp_path_factory):
    """Version 1 beside broken ones: 3 temporal, 4 exported with k=5, 5 without its files,
    6 from other data (no user in common)."""
    root = tmp_path_factory.mktemp("compare-bad")
    source = tiny_export[1] / "1"
    for version in (1, 3, 4, 6):
        shutil.copytree(source, root / str(version))
    edit_metadata(root / "3", data_manifest={"split": "temporal"})
    edit_metadata(root / "4", k=5)
    (root / "5").mkdir()
    shutil.copy(source / "metadata.json", root / "5")
    users = pd.read_parquet(source / "user_histories.parquet")
    users["user_id"] = "other-" + users["user_id"]
    users.to_parquet(root / "6" / "user_histories.parquet", index=False)
    return root


def test_identical_copy_gives_zero_deltas_and_training_test_metrics(model_dir, tiny_export,
                                                                    tmp_path, capsys):
    """Version 1 against its copy: every delta and interval bound is exactly 0; and version 1's
    HR@10 / NDCG@10 / HR@20 are the test metrics training computed on the same leave-one-out
    split (full catalog, seen items excluded, ties against the target)."""
    test = tiny_export[2]["test"]
    out = tmp_path / "deep" / "compare.json"
    assert cv.main([str(model_dir), "1", "2", "--bootstrap", "200", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary file left

    assert report["users"]["compared"] == test["users"]
    assert set(report["users"]["dropped"].values()) == {0}
    assert report["exact"] and report["k"] == 20
    metrics = report["metrics"]
    assert list(metrics) == ["hr@10", "ndcg@10", "hr@20"]
    for name, figures in metrics.items():
        assert figures["a"] == figures["b"]
        assert figures["delta"] == figures["low"] == figures["high"] == 0.0
        assert figures["share_not_better"] == 1.0
        assert figures["a"] == pytest.approx(test[name], abs=1e-9), name
    assert f"users: {test['users']} compared" in printed
    assert "MRR is not reported" in printed and "exact full-catalog" in printed
    assert f"{metrics['ndcg@10']['a']:.4f}" in printed


def test_rank_in_list_counts_ties_against_the_target():
    items, scores = ["x", "y", "z", "w"], [3.0, 2.0, 2.0, 1.0]
    assert cv.rank_in_list(items, scores, "x", 4) == 0
    assert cv.rank_in_list(items, scores, "y", 4) == 2  # tied with z
    assert cv.rank_in_list(items, scores, "z", 4) == 2
    assert cv.rank_in_list(items, scores, "w", 4) == 3
    assert cv.rank_in_list(items, scores, "absent", 4) == 4


def test_paired_bootstrap_by_hand():
    # diff = b - a = [1, 1, 0, 0]: delta 0.5; a resample has delta <= 0 only when all four
    # draws hit the zeros, with probability (1/2)^4.
    result = cv.paired_bootstrap([0, 0, 1, 1], [1, 1, 1, 1], n=20000, seed=0)
    assert (result.a, result.b, result.delta) == (0.5, 1.0, 0.5)
    assert result.share_not_better == pytest.approx(1 / 16, abs=0.01)
    assert 0.0 <= result.low < 0.5 < result.high <= 1.0

    rng = np.random.default_rng(1)
    a = (rng.random(3000) < 0.3).astype(float)
    b = (rng.random(3000) < 0.4).astype(float)  # true delta 0.1
    first = cv.paired_bootstrap(a, b, n=1000, seed=7)
    assert first.low < 0.1 < first.high and first.high - first.low < 0.1
    assert first.share_not_better == 0.0
    assert cv.paired_bootstrap(a, b, n=1000, seed=7) == first
    assert cv.paired_bootstrap(a, b, n=1000, seed=8).low != first.low


def test_pair_users_counts_every_reason():
    a = {"same": (["i1", "i2", "t"], ["v", "v", "v"]),
         "moved": (["i1", "t"], ["v", "v"]),
         "one": (["t"], ["v"]),
         "repeat": (["t", "i1", "t"], ["v", "v", "v"]),
         "cold": (["new", "t"], ["v", "v"]),
         "a_only": (["i1", "t"], ["v", "v"])}
    b = {"same": (["i2", "t"], ["v", "v"]),  # B may know less of the input
         "moved": (["i1", "u"], ["v", "v"]),
         "one": (["t"], ["v"]),
         "repeat": (["t", "i1", "t"], ["v", "v", "v"]),
         "cold": (["new", "t"], ["v", "v"]),
         "b_only": (["i1", "t"], ["v", "v"])}
    pairing = cv.pair_users(a, b, {"i1", "i2", "t"}, {"i1", "i2", "t", "new"})
    assert pairing.users == ["same"]
    assert pairing.dropped == {"only_in_a": 1, "only_in_b": 1, "different_target": 1,
                               "no_input": 1, "target_in_input": 1, "no_input_in_catalog": 1}


@pytest.mark.parametrize("args, message", [
    (["MISSING", "1", "2"], "does not exist"),
    (["ROOT", "1", "9"], "no version 9"),
    (["ROOT", "1", "1"], "same version"),
    (["ROOT", "1", "v2"], "'v2' is not a version number"),
    (["ROOT", "1", "5"], "not a complete export: missing user_histories.parquet"),
    (["ROOT", "1", "3"], "temporal split"),
    (["ROOT", "4", "1"], "exported with k=5"),
    (["ROOT", "1", "6"], "no user in common"),
    (["ROOT", "1", "3", "--bootstrap", "0"], "--bootstrap must be >= 1"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(bad_dir, tmp_path, capsys, args,
                                                            message):
    root = {"ROOT": str(bad_dir), "MISSING": str(tmp_path / "missing")}
    out = tmp_path / "out.json"
    assert cv.main([root.get(x, x) for x in args] + ["--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == "" and not out.exists()
