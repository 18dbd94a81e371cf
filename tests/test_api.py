"""The HTTP API over the tiny exported model: endpoints, bad input, parity, hot reload,
concurrency. Every app here serves a private copy of the fixture export, so versions added by
one test never leak into another (or into the export tests)."""

import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from fastapi.testclient import TestClient

from serving.app import create_app

TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def add_version(source: Path, root: Path, version: int, edit=None) -> Path:
    """Copy an exported version under root/VERSION the way export does: temp dir, then rename."""
    tmp = root / f".tmp-{version}-test"
    shutil.copytree(source, tmp)
    if edit is not None:
        edit(tmp)
    os.rename(tmp, root / str(version))
    return root / str(version)


def shift_embeddings(version_dir: Path) -> None:
    """A different model: every item gets the next item's vector; metadata says version 2."""
    path = version_dir / "item_embeddings.parquet"
    frame = pd.read_parquet(path)
    frame["embedding"] = list(np.roll(np.stack(frame["embedding"].to_numpy()), 1, axis=0))
    frame.to_parquet(path, index=False)
    meta = json.loads((version_dir / "metadata.json").read_text())
    meta["model_version"] = 2
    (version_dir / "metadata.json").write_text(json.dumps(meta))


def expected_similar(version_dir: Path, item_id: str, k: int) -> list[str]:
    frame = pd.read_parquet(version_dir / "item_embeddings.parquet")
    vectors = np.stack(frame["embedding"].to_numpy())
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    row = frame.index[frame["item_id"] == item_id][0]
    sims = vectors @ vectors[row]
    sims[row] = -np.inf
    return frame["item_id"].to_numpy()[np.argsort(-sims, kind="stable")[:k]].tolist()


@pytest.fixture(scope="module")
def tables(version1):
    items = pd.read_parquet(version1 / "items.parquet")
    users = pd.read_parquet(version1 / "user_histories.parquet")
    return items, {u: (list(h), list(e)) for u, h, e in zip(
        users["user_id"], users["history"], users["event_types"], strict=True)}


@pytest.fixture(scope="module")
def client(version1, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    add_version(version1, root, 1)
    with TestClient(create_app(root, "scann", poll_seconds=0)) as test_client:
        yield test_client


def ids(response) -> list[str]:
    return ids_of(response.json())


def ids_of(body: dict) -> list[str]:
    return [r["item_id"] for r in body["recommendations"]]


def test_health_ready_and_metadata(client, tiny_export):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert ready.json()["model_version"] == 1 and ready.json()["index"] == "scann"
    meta = client.get("/metadata").json()
    assert meta["model_version"] == 1 and meta["index"] == "scann"
    assert meta["data_source"] == "test-fixture"
    assert meta["data_manifest"]["num_items"] == 24
    assert meta["test_metrics"]["test"]["ndcg@10"] == pytest.approx(
        tiny_export[2]["test"]["ndcg@10"])
    assert meta["k"] == 20 and meta["scann"]["recall@10_vs_bruteforce"] >= 0.95


def test_openapi_documents_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/recommendations/{user_id}", "/recommendations", "/items/{item_id}/similar",
            "/rank", "/health", "/ready", "/metadata", "/admin/reload"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_user_recommendations_exclude_history(client, tables):
    items, users = tables
    titles = dict(zip(items["item_id"], items["text"], strict=True))
    for user in ("u000", "u007", "u031"):
        history = set(users[user][0])
        body = client.get(f"/recommendations/{user}", params={"k": 100}).json()
        recs = body["recommendations"]
        assert body["user_id"] == user and body["model_version"] == 1
        assert not body["fallback"] and body["event_types_used"]
        assert not history & {r["item_id"] for r in recs}
        # the index over-fetches, so k stays full after exclusion (model k = 20, 24 items)
        assert len(recs) == min(20, 24 - len(history))
        assert all(r["title"] == titles[r["item_id"]] for r in recs)
        scores = [r["score"] for r in recs]
        assert scores == sorted(scores, reverse=True)
        top5 = client.get(f"/recommendations/{user}", params={"k": 5})
        assert ids(top5) == [r["item_id"] for r in recs[:5]]


def test_include_seen_can_return_history_items(client, tables):
    _, users = tables
    user = next(u for u, (h, _) in users.items() if len(set(h)) >= 5)
    history = set(users[user][0])
    body = client.get(f"/recommendations/{user}",
                      params={"k": 100, "exclude_seen": False}).json()
    # 20 of 24 items returned and >= 5 history items: some must be among them
    assert len(body["recommendations"]) == 20
    assert history & set(ids_of(body))
    assert body["event_types_used"] is True  # the stored history's event types


def test_posted_history_is_excluded_unless_asked(client):
    history = ["SKU0003", "SKU0004", "SKU0005", "SKU0006", "SKU0007"]
    for events in (None, ["view", "purchase", "view", "view", "purchase"]):
        body = client.post("/recommendations", json={
            "history": history, "event_types": events, "k": 100}).json()
        assert not set(history) & set(ids_of(body))
        assert len(body["recommendations"]) == min(20, 24 - len(history))
        assert body["event_types_used"] is (events is not None)
        seen = client.post("/recommendations", json={
            "history": history, "event_types": events, "k": 100,
            "exclude_seen": False}).json()
        assert len(seen["recommendations"]) == 20 and set(history) & set(ids_of(seen))


def test_unknown_user_404_unless_popular_fallback(client, tables):
    items, _ = tables
    missing = client.get("/recommendations/nobody")
    assert missing.status_code == 404
    assert "nobody" in missing.json()["detail"] and "fallback=popular" in missing.json()["detail"]
    body = client.get("/recommendations/nobody", params={"fallback": "popular", "k": 5}).json()
    popular = items.sort_values(["count", "item_id"], ascending=[False, True])
    assert body["fallback"] is True and body["user_id"] == "nobody"
    assert ids_of(body) == popular["item_id"].head(5).tolist()
    assert [r["score"] for r in body["recommendations"]] == popular["count"].head(5).tolist()
    assert client.get("/recommendations/nobody", params={"fallback": "x"}).status_code == 422


def test_unknown_history_items_are_ignored_and_listed(client):
    mixed = client.post("/recommendations", json={
        "history": ["NOPE-1", "SKU0003", "", "NOPE-2", "SKU0004", "NOPE-1"], "k": 5}).json()
    clean = client.post("/recommendations", json={"history": ["SKU0003", "SKU0004"],
                                                   "k": 5}).json()
    assert mixed["unknown_items"] == ["NOPE-1", "NOPE-2"]
    assert not mixed["fallback"]
    assert mixed["recommendations"] == clean["recommendations"]


@pytest.mark.parametrize("history", [[], ["NOPE-1", "NOPE-2"], [""]])
def test_empty_or_unknown_history_gets_popular_items(client, tables, history):
    items, _ = tables
    body = client.post("/recommendations", json={"history": history, "k": 3}).json()
    assert body["fallback"] is True
    assert body["unknown_items"] == [h for h in history if h]
    top = items.sort_values(["count", "item_id"], ascending=[False, True])["item_id"]
    assert ids_of(body) == top.head(3).tolist()


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("method,url,kwargs,loc", [
    ("get", "/recommendations/u000?k=0", {}, ["query", "k"]),
    ("get", "/recommendations/u000?k=101", {}, ["query", "k"]),
    ("get", "/recommendations/u000?k=ten", {}, ["query", "k"]),
    ("get", "/items/SKU0001/similar?k=101", {}, ["query", "k"]),
    ("post", "/recommendations", {"json": {"history": ["SKU0001"], "k": 0}}, ["body", "k"]),
    ("post", "/recommendations", {"json": {"history": ["SKU0001"], "k": 101}}, ["body", "k"]),
    ("post", "/recommendations", {"json": {"history": ["SKU0001"] * 1001}}, ["body", "history"]),
    ("post", "/recommendations", {"json": {"k": 3}}, ["body", "history"]),
    ("post", "/recommendations", {"json": {"history": "SKU0001"}}, ["body", "history"]),
    ("post", "/recommendations", {"json": {"history": ["SKU0001"], "k": True}}, ["body", "k"]),
    ("post", "/recommendations", {"json": {"history": ["SKU0001"], "exclude_sen": False}},
     ["body", "exclude_sen"]),
    ("post", "/recommendations", {"json": {"history": ["SKU0001"], "event_types": []}},
     ["body", "event_types"]),
    ("post", "/recommendations", {"content": b'{"history": ["SKU0001",', "headers": JSON},
     ["body"]),
    # a lone surrogate is valid JSON but not text: 422, not a 500 while echoing it back
    ("post", "/recommendations", {"content": b'{"history": ["\\ud800"]}', "headers": JSON},
     ["body", "history", 0]),
    ("post", "/rank", {"json": {"history": ["SKU0001"], "candidates": []}},
     ["body", "candidates"]),
    ("post", "/rank", {"json": {"history": ["SKU0001"], "candidates": ["x"] * 1001}},
     ["body", "candidates"]),
])
def test_bad_input_is_422_naming_the_field(client, method, url, kwargs, loc):
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:len(loc)] == loc


def test_similar_items(client, version1):
    body = client.get("/items/SKU0005/similar", params={"k": 6}).json()
    similar = [r["item_id"] for r in body["similar"]]
    assert body["item_id"] == "SKU0005" and body["model_version"] == 1
    assert "SKU0005" not in similar
    assert similar == expected_similar(version1, "SKU0005", 6)
    scores = [r["score"] for r in body["similar"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    everything = client.get("/items/SKU0005/similar", params={"k": 100}).json()["similar"]
    assert len(everything) == 23
    missing = client.get("/items/NOPE/similar")
    assert missing.status_code == 404 and "NOPE" in missing.json()["detail"]


def test_rank_sorts_known_candidates_and_lists_unknown(client):
    candidates = ["SKU0010", "NOPE", "SKU0002", "SKU0017", "ALSO-NOPE"]
    body = client.post("/rank", json={"history": ["SKU0001", "x"], "candidates": candidates})
    assert body.status_code == 200
    body = body.json()
    ranked = [r["item_id"] for r in body["ranked"]]
    scores = [r["score"] for r in body["ranked"]]
    assert sorted(ranked) == ["SKU0002", "SKU0010", "SKU0017"]
    assert scores == sorted(scores, reverse=True)
    assert body["unknown_candidates"] == ["NOPE", "ALSO-NOPE"]
    assert body["unknown_items"] == ["x"]
    # a candidate's score does not depend on the other candidates or their order
    alone = client.post("/rank", json={"history": ["SKU0001"], "candidates": ["SKU0017"]})
    assert alone.json()["ranked"][0]["score"] == pytest.approx(
        dict(zip(ranked, scores, strict=True))["SKU0017"], abs=1e-5)


def test_rerank_reorders_retrieved_candidates_by_ranking_head(client, tables):
    _, users = tables
    history, events = users["u004"]
    retrieved = ids(client.get("/recommendations/u004", params={"k": 100}))
    reranked = client.get("/recommendations/u004", params={"k": 100, "rerank": True}).json()
    assert reranked["reranked"] is True
    assert sorted(ids_of(reranked)) == sorted(retrieved)
    ranked = client.post("/rank", json={"history": history, "event_types": events,
                                        "candidates": retrieved}).json()["ranked"]
    assert reranked["recommendations"] == ranked
    top3 = client.get("/recommendations/u004", params={"k": 3, "rerank": True})
    assert ids(top3) == ids_of(reranked)[:3]


def test_post_history_equals_get_for_stored_user(client, tables):
    _, users = tables
    for user in ("u001", "u012", "u050"):
        history, events = users[user]
        for params in ({"k": 10}, {"k": 7, "rerank": True}, {"k": 10, "exclude_seen": False}):
            got = client.get(f"/recommendations/{user}", params=params).json()
            posted = client.post("/recommendations", json={
                "history": history, "event_types": events, **params}).json()
            assert posted["recommendations"] == got["recommendations"], (user, params)
            assert posted["user_id"] is None and got["user_id"] == user


def test_bruteforce_index_agrees_with_scann(client, version1, tmp_path):
    add_version(version1, tmp_path, 1)
    with TestClient(create_app(tmp_path, "bruteforce", poll_seconds=0)) as brute:
        assert brute.get("/ready").json()["index"] == "bruteforce"
        for user in ("u002", "u020", "u044"):
            exact = brute.get(f"/recommendations/{user}").json()["recommendations"]
            approx = client.get(f"/recommendations/{user}").json()["recommendations"]
            # the tiny index searches every leaf, so ScaNN is exact here
            assert [r["item_id"] for r in approx] == [r["item_id"] for r in exact]
            assert [r["score"] for r in approx] == pytest.approx(
                [r["score"] for r in exact], abs=1e-4)


def test_model_error_is_503_and_server_keeps_serving(client, monkeypatch):
    def broken(**inputs):
        raise tf.errors.InternalError(None, None, "index exploded")

    model = client.app.state.store.current
    monkeypatch.setitem(model.retrieval, "serving_default", broken)
    response = client.post("/recommendations", json={"history": ["SKU0001"]})
    assert response.status_code == 503
    assert "index exploded" in response.json()["detail"]
    monkeypatch.undo()
    assert client.post("/recommendations", json={"history": ["SKU0001"]}).status_code == 200


def test_concurrent_requests_match_sequential(client):
    requests = [("get", f"/recommendations/u{u:03d}", None) for u in range(0, 60, 3)] + [
        ("post", "/recommendations", {"history": [f"SKU{i:04d}", f"SKU{i + 1:04d}"], "k": 8})
        for i in range(1, 23)] + [
        ("get", f"/items/SKU{i:04d}/similar", None) for i in range(1, 23)]
    assert len(requests) == 64

    def call(request):
        method, url, body = request
        response = client.post(url, json=body) if method == "post" else client.get(url)
        return response.status_code, response.json()

    sequential = [call(r) for r in requests]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(call, requests))
    assert all(status == 200 for status, _ in concurrent)
    # Concurrent requests share model batches: the same answers, scores up to float rounding.
    for (_, alone), (_, together) in zip(sequential, concurrent, strict=True):
        key = "recommendations" if "recommendations" in alone else "similar"
        assert [r["item_id"] for r in alone[key]] == [r["item_id"] for r in together[key]]
        assert np.allclose([r["score"] for r in alone[key]],
                           [r["score"] for r in together[key]], atol=1e-4)


def test_no_model_yet_then_admin_reload(version1, tmp_path):
    with TestClient(create_app(tmp_path, "scann", poll_seconds=0, admin_token=TOKEN)) as empty:
        assert empty.get("/health").status_code == 200
        ready = empty.get("/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        missing = empty.get("/recommendations/u000")
        assert missing.status_code == 503 and "no model" in missing.json()["detail"]
        add_version(version1, tmp_path, 1)
        reload = empty.post("/admin/reload", headers=ADMIN).json()
        assert reload == {"model_version": 1, "changed": True, "failed_versions": {},
                          "loaded_versions": [1]}
        assert empty.get("/ready").json()["model_version"] == 1
        assert empty.get("/recommendations/u000").status_code == 200


def test_hot_reload_under_load_and_broken_version_refused(version1, tmp_path, caplog):
    add_version(version1, tmp_path, 1)
    app = create_app(tmp_path, "scann", poll_seconds=0, admin_token=TOKEN)
    with TestClient(app) as live:
        before = live.get("/items/SKU0005/similar").json()["similar"]
        stop, seen, errors = threading.Event(), [], []

        def hammer():
            while not stop.is_set():
                for response in (live.get("/recommendations/u003"),
                                 live.post("/recommendations", json={"history": ["SKU0009"]}),
                                 live.get("/items/SKU0005/similar")):
                    if response.status_code != 200:
                        errors.append((response.status_code, response.text))
                    else:
                        seen.append(response.json()["model_version"])

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        add_version(version1, tmp_path, 2, edit=shift_embeddings)
        reload = live.post("/admin/reload", headers=ADMIN).json()
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert reload["model_version"] == 2 and reload["changed"] is True
        assert not errors
        assert set(seen) == {1, 2} and seen[-1] == 2
        after = live.get("/items/SKU0005/similar").json()
        assert after["model_version"] == 2
        assert [r["item_id"] for r in after["similar"]] == expected_similar(
            tmp_path / "2", "SKU0005", 10) != [r["item_id"] for r in before]

        broken = tmp_path / ".tmp-3"
        (broken / "retrieval").mkdir(parents=True)
        (broken / "metadata.json").write_text("{not json")
        os.rename(broken, tmp_path / "3")
        with caplog.at_level(logging.ERROR, logger="serving.model_store"):
            refused = live.post("/admin/reload", headers=ADMIN).json()
            again = live.post("/admin/reload", headers=ADMIN).json()
        assert refused["model_version"] == 2 and refused["changed"] is False
        assert "3" in refused["failed_versions"] and again["failed_versions"] == \
            refused["failed_versions"]
        refusals = [r for r in caplog.records if "refusing model version 3" in r.getMessage()]
        assert len(refusals) == 1  # remembered, not retried on every reload
        assert live.get("/ready").json()["model_version"] == 2
        assert live.get("/recommendations/u003").json()["model_version"] == 2


def test_background_poll_picks_up_new_version_and_never_rolls_back(version1, tmp_path, caplog):
    add_version(version1, tmp_path, 1)
    with TestClient(create_app(tmp_path, "scann", poll_seconds=0.2)) as polled:

        def wait_for(version: int) -> bool:
            deadline = time.time() + 60
            while time.time() < deadline:
                if polled.get("/ready").json()["model_version"] == version:
                    return True
                time.sleep(0.1)
            return False

        assert polled.get("/ready").json()["model_version"] == 1
        add_version(version1, tmp_path, 2, edit=shift_embeddings)
        assert wait_for(2)
        assert polled.get("/recommendations/u000").json()["model_version"] == 2
        with caplog.at_level(logging.WARNING, logger="serving.model_store"):
            shutil.rmtree(tmp_path / "2")  # withdrawn: keeps serving from memory, says so
            time.sleep(1.0)  # five polls
        assert polled.get("/recommendations/u000").json()["model_version"] == 2
        gone = [r for r in caplog.records if "version 2 is gone" in r.getMessage()]
        assert len(gone) == 1 and gone[0].levelno == logging.WARNING


def test_app_module_builds_nothing_on_import_and_checks_index(tmp_path):
    import serving.app

    assert "app" not in vars(serving.app)
    with pytest.raises(ValueError, match="INDEX"):
        create_app(tmp_path, "annoy")
