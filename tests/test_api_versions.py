"""Several loaded versions: ?version=N, the A/B split by a stable hash of the user id, answers
counted per version; and the JSON endpoints the browser page uses."""

from collections import Counter

import pytest
from fastapi.testclient import TestClient
from test_api import ADMIN, TOKEN, add_version, ids, shift_embeddings
from test_api_admin import _sample

from serving.app import create_app
from serving.split import TrafficSplit


@pytest.fixture(scope="module")
def two_versions(version1, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    add_version(version1, root, 1)
    add_version(version1, root, 2, edit=shift_embeddings)
    return root


def test_split_is_stable_and_shares_hold_over_10000_ids():
    split = TrafficSplit.parse("3:0.9,4:0.1")
    users = [f"user-{i}" for i in range(10_000)]
    first = [split.assign(u) for u in users]
    assert first == [split.assign(u) for u in users]  # same user, same version
    assert first == [TrafficSplit.parse(" 3:0.9, 4:0.1 ").assign(u) for u in users]
    shares = Counter(first)
    assert set(shares) == {3, 4}
    # binomial sd of the 0.1 share over 10,000 ids: 0.003; 4 sd either way
    assert abs(shares[4] / len(users) - 0.1) < 0.012
    even = Counter(TrafficSplit.parse("1:0.5,2:0.5").assign(u) for u in users)
    assert abs(even[1] / len(users) - 0.5) < 0.02


@pytest.mark.parametrize("text, message", [
    ("3:0.9,4:0.2", "add up to 1.1"), ("3", "VERSION:SHARE"), ("x:1", "VERSION:SHARE"),
    ("3:half,4:0.5", "not a number"), ("3:0.5,3:0.5", "named twice"), ("3:0,4:1", "in (0, 1]")])
def test_bad_split_names_the_problem(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrafficSplit.parse(text)


def test_version_parameter_answers_from_that_version(two_versions):
    with TestClient(create_app(two_versions, "bruteforce", poll_seconds=0)) as app:
        listed = app.get("/versions").json()
        assert listed["default_version"] == 2 and listed["loaded_versions"] == [2, 1]
        assert listed["ab_split"] is None
        default = app.get("/recommendations/u001")
        v1 = app.get("/recommendations/u001?version=1")
        v2 = app.get("/recommendations/u001?version=2")
        assert default.json()["model_version"] == 2 and v1.json()["model_version"] == 1
        assert v2.json()["model_version"] == 2 and ids(default) == ids(v2)
        posted = app.post("/recommendations?version=1", json={"history": ["SKU0009"]})
        assert posted.json()["model_version"] == 1
        # Version 2's item vectors are shifted (shift_embeddings): its similar items differ.
        similar = {v: app.get(f"/items/SKU0005/similar?version={v}").json() for v in (1, 2)}
        assert [similar[v]["model_version"] for v in (1, 2)] == [1, 2]
        assert similar[1]["similar"] != similar[2]["similar"]
        missing = app.get("/recommendations/u001?version=7")
        assert missing.status_code == 404 and "not loaded" in missing.json()["detail"]
        assert app.get("/recommendations/u001?version=zero").status_code == 422
        metrics = app.get("/metrics").text
        assert _sample(metrics, "towerrec_answers_total", version="1") == 2
        assert _sample(metrics, "towerrec_answers_total", version="2") == 2  # default, v2


def test_keep_one_version_loads_only_the_newest(two_versions):
    with TestClient(create_app(two_versions, "bruteforce", poll_seconds=0,
                               keep_versions=1)) as app:
        assert app.get("/versions").json()["loaded_versions"] == [2]
        assert app.get("/recommendations/u001?version=1").status_code == 404
    with pytest.raises(ValueError, match="KEEP_VERSIONS"):
        create_app(two_versions, "bruteforce", keep_versions=0)


def test_split_sends_each_user_to_one_version(version1, tmp_path):
    split = "1:0.5,2:0.5"
    add_version(version1, tmp_path, 1)  # its own directory: it adds a version below
    add_version(version1, tmp_path, 2, edit=shift_embeddings)
    with TestClient(create_app(tmp_path, "bruteforce", poll_seconds=0, keep_versions=1,
                               ab_split=split, admin_token=TOKEN)) as app:
        # The split's versions are loaded even when the policy alone would keep one.
        assert app.get("/versions").json()["loaded_versions"] == [2, 1]
        assert app.get("/versions").json()["ab_split"] == {"1": 0.5, "2": 0.5}
        users = [f"u{i:03d}" for i in range(20)]
        answers = {u: app.get(f"/recommendations/{u}").json()["model_version"] for u in users}
        assert answers == {u: TrafficSplit.parse(split).assign(u) for u in users}
        assert set(answers.values()) == {1, 2}
        again = {u: app.get(f"/recommendations/{u}").json()["model_version"] for u in users}
        assert again == answers
        # The history a user sees comes from the same version; ?version= overrides the split.
        user = users[0]
        assert app.get(f"/users/{user}/history").json()["model_version"] == answers[user]
        other = 3 - answers[user]
        assert app.get(f"/recommendations/{user}?version={other}").json()["model_version"] \
            == other
        # A newer version becomes the default; the split's users stay where they were.
        add_version(version1, tmp_path, 3)
        assert app.post("/admin/reload", headers=ADMIN).json()["loaded_versions"] == [3, 2, 1]
        assert {u: app.get(f"/recommendations/{u}").json()["model_version"]
                for u in users} == answers
        assert app.post("/recommendations", json={"history": ["SKU0009"]}).json()[
            "model_version"] == 3


def test_page_endpoints(two_versions):
    with TestClient(create_app(two_versions, "bruteforce", poll_seconds=0)) as app:
        page = app.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert '<script src="/static/page.js">' in page.text
        assert "fetch(" in app.get("/static/page.js").text
        assert app.get("/static/nothing.js").status_code == 404
        users = app.get("/users?prefix=u00&limit=5").json()["user_ids"]
        assert users == sorted(users) and len(users) == 5 and all(u.startswith("u00")
                                                                  for u in users)
        assert app.get("/users?prefix=zzz").json()["user_ids"] == []
        history = app.get("/users/u001/history").json()
        stored = app.get("/recommendations/u001?exclude_seen=true").json()
        assert history["history"] and stored["model_version"] == history["model_version"]
        recommended = set(ids(app.get("/recommendations/u001")))
        assert not recommended & {h["item_id"] for h in history["history"]}
        assert app.get("/users/nobody/history").status_code == 404
        found = app.get("/items?q=sku000&limit=5").json()["items"]
        assert 0 < len(found) <= 5 and all("sku000" in r["item_id"].lower() for r in found)
        assert [r["score"] for r in found] == sorted((r["score"] for r in found), reverse=True)
        assert app.get("/items?q=").status_code == 422
        assert app.get("/items?q=no-such-thing-anywhere").json()["items"] == []
