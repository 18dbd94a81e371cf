"""The live service on SQLite: items put and withdrawn while serving, events that move
histories, filters inside retrieval, durability across restarts."""

import sqlite3

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from fastapi.testclient import TestClient
from test_api import ADMIN, TOKEN, add_version
from test_item_tower import embed_catalog

from export import contract as c
from recdata.livedb import Database, DatabaseError, Tail
from serving.app import create_app
from serving.live import ItemFilter, LiveRetrieval, Snapshot


def served(root, index="bruteforce", **kwargs) -> TestClient:
    return TestClient(create_app(root, index, poll_seconds=0, admin_token=TOKEN,
                                 database_url=f"sqlite:///{root}.live.db", **kwargs))


@pytest.fixture()
def root(version1, tmp_path):
    add_version(version1, tmp_path, 1)
    return tmp_path


def recs(client, path="/recommendations", **body) -> list[tuple[str, float]]:
    answer = client.post(path, json=body)
    assert answer.status_code == 200, answer.text
    return [(r["item_id"], r["score"]) for r in answer.json()["recommendations"]]


HISTORY = ["SKU0003", "SKU0004", "SKU0005"]


def test_new_items_are_scored_exactly_and_merged_by_score(root, version1):
    """Every catalog item put again under a new id (its text and metadata): the answer is the
    exact top k over the exported vectors and those the item tower gives the new ids."""
    items = pd.read_parquet(version1 / c.ITEMS).sort_values("item_idx")
    new = items.assign(item_id="NEW-" + items["item_id"])
    with served(root) as client:
        body = {"put": [{"item_id": r.item_id, "text": r.text, "category": r.category,
                         "brand": r.brand, "price": r.price} for r in new.itertuples()]}
        assert client.post("/items/bulk", json=body).status_code == 401
        written = client.post("/items/bulk", json=body, headers=ADMIN)
        assert written.status_code == 200, written.text
        assert written.json()["placed_by"] == [1]
        got = recs(client, history=HISTORY, k=20)
    serve = tf.saved_model.load(str(version1 / c.RETRIEVAL_BRUTEFORCE)).signatures[
        c.SERVING_DEFAULT]
    query = serve(history=tf.constant([HISTORY]))[c.QUERY].numpy()[0]
    exported = pd.read_parquet(version1 / c.ITEM_EMBEDDINGS)
    vectors = np.concatenate([np.stack(exported["embedding"].to_numpy()),
                              embed_catalog(version1, new)[c.ITEM_VECTORS]])
    names = exported["item_id"].tolist() + new["item_id"].tolist()
    scores = vectors @ query
    order = [i for i in np.argsort(-scores, kind="stable") if names[i] not in HISTORY][:20]
    assert [item for item, _ in got] == [names[i] for i in order]
    np.testing.assert_allclose([s for _, s in got], scores[order], rtol=1e-4, atol=1e-4)
    assert any(item.startswith("NEW-") for item, _ in got)
    # Re-ranked: exported candidates by the ranking head, live ones (no ranking score) after.
    with served(root) as client:
        client.put("/items/SKU0010", headers=ADMIN, json={"text": "changed text"})
        reranked = [i for i, _ in recs(client, history=HISTORY, k=20, rerank=True)]
    assert len(reranked) == len(set(reranked)) == 20
    live = [i.startswith("NEW-") or i == "SKU0010" for i in reranked]
    assert live == sorted(live)  # no exported item after a live one


def test_put_item_is_found_similar_and_recommendable_then_withdrawn(root, version1):
    twin = pd.read_parquet(version1 / c.ITEMS).iloc[5]
    item = {"text": twin["text"], "category": twin["category"], "brand": twin["brand"],
            "price": float(twin["price"])}
    with served(root) as client:
        assert client.put("/items/FRESH-1", json=item).status_code == 401
        answer = client.put("/items/FRESH-1", json=item, headers=ADMIN)
        assert answer.status_code == 200, answer.text
        found = client.get("/items", params={"q": "fresh-1"}).json()["items"]
        assert [f["item_id"] for f in found] == ["FRESH-1"]
        assert found[0]["title"] == twin["text"]
        similar = client.get("/items/FRESH-1/similar", params={"k": 5}).json()["similar"]
        assert len(similar) == 5 and all(s["item_id"] != "FRESH-1" for s in similar)
        near = client.get(f"/items/{twin['item_id']}/similar", params={"k": 23}).json()
        assert "FRESH-1" in [s["item_id"] for s in near["similar"]]
        only = recs(client, history=HISTORY, k=5, filter={"include_items": ["FRESH-1"]})
        assert [i for i, _ in only] == ["FRESH-1"]
        assert "towerrec_live_items 1.0" in client.get("/metrics").text
        assert client.get("/live").json()["recent"][0] == {
            "item_id": "FRESH-1", "title": twin["text"], "category": twin["category"],
            "brand": twin["brand"], "price": float(twin["price"]), "status": "new"}

        # Withdraw it and an exported item: never returned again, k stays full.
        gone = twin["item_id"]
        for item_id in ("FRESH-1", gone):
            assert client.delete(f"/items/{item_id}", headers=ADMIN).status_code == 200
        assert client.delete("/items/NO-SUCH", headers=ADMIN).status_code == 404
        for answer in (recs(client, history=HISTORY, k=20),
                       recs(client, history=HISTORY, k=20, filter={"include_items": [gone]})):
            assert not {gone, "FRESH-1"} & {i for i, _ in answer}
        assert len(recs(client, history=HISTORY, k=20)) == 20  # 24 - 3 seen - 1 withdrawn
        assert client.get(f"/items/{gone}/similar").status_code == 404
        assert client.get("/items/FRESH-1/similar").status_code == 404
        assert gone not in [i["item_id"] for i in client.get(
            "/items", params={"q": "sku", "limit": 100}).json()["items"]]
        assert client.get("/live").json()["recent"][0]["status"] == "withdrawn"
        assert client.post("/events", json={"user_id": "u000", "item_id": gone},
                           headers=ADMIN).status_code == 422


def test_changes_survive_a_restart_and_a_new_version_places_them(root, version1):
    twin = pd.read_parquet(version1 / c.ITEMS).iloc[2]
    with served(root) as client:
        client.put("/items/FRESH-2", headers=ADMIN, json={"text": twin["text"]})
        client.delete("/items/SKU0001", headers=ADMIN)
    add_version(version1, root, 2)
    with served(root) as client:  # a new server: the changes come from the database
        assert client.get("/ready").json()["model_version"] == 2
        for version in (1, 2):
            similar = client.get("/items/FRESH-2/similar", params={"version": version, "k": 3})
            assert similar.status_code == 200, similar.text
            assert client.get("/items/SKU0001/similar",
                              params={"version": version}).status_code == 404
        live = client.get("/live").json()
        assert live["live_items"] == 1 and live["withdrawn"] == 1 and live["schema_version"] == 1
    with sqlite3.connect(f"{root}.live.db") as db:
        assert db.execute("SELECT version FROM towerrec_schema").fetchall() == [(1,)]


def test_events_move_histories_and_make_users_known(root, version1):
    users = pd.read_parquet(version1 / c.USER_HISTORIES)
    user, history = users["user_id"].iloc[0], list(users["history"].iloc[0])
    with served(root) as client:
        before = [r["item_id"] for r in client.get(f"/recommendations/{user}",
                                                   params={"k": 20}).json()["recommendations"]]
        bought = before[0]
        answer = client.post("/events", headers=ADMIN, json={
            "events": [{"user_id": user, "item_id": bought, "event_type": "purchase"},
                       {"user_id": "newcomer", "item_id": "SKU0007", "event_type": "view"}]})
        assert answer.status_code == 200 and answer.json() == {"events": 2}
        after = client.get(f"/recommendations/{user}", params={"k": 20}).json()
        assert bought not in [r["item_id"] for r in after["recommendations"]]
        assert after["recommendations"] and after["user_id"] == user
        shown = client.get(f"/users/{user}/history").json()["history"]
        assert shown[0]["item_id"] == bought and len(shown) == len(history) + 1
        assert "newcomer" in client.get("/users", params={"prefix": "newc"}).json()["user_ids"]
        metrics = client.get("/metrics").text
        assert 'towerrec_live_writes_total{kind="event"} 2.0' in metrics
        assert "towerrec_live_database_ok 1.0" in metrics
        newcomer = client.get("/recommendations/newcomer").json()
        assert not newcomer["fallback"] and "SKU0007" not in [
            r["item_id"] for r in newcomer["recommendations"]]
        # Bad events: unknown item (422 naming it, nothing written), no token, malformed.
        bad = client.post("/events", headers=ADMIN, json={"events": [
            {"user_id": "x", "item_id": "SKU0001"}, {"user_id": "x", "item_id": "NOPE"}]})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == [
            "body", "events", 1, "item_id"]
        assert client.get("/recommendations/x").status_code == 404
        assert client.post("/events", json={"user_id": "x", "item_id": "SKU0001"}
                           ).status_code == 401
        for body in ({"user_id": "", "item_id": "SKU0001"},
                     {"user_id": "x", "item_id": "SKU0001", "timestamp": -1},
                     {"events": []}, {"user_id": "x" * 300, "item_id": "SKU0001"}):
            assert client.post("/events", headers=ADMIN, json=body).status_code == 422


def test_filters_inside_retrieval(root, version1):
    items = pd.read_parquet(version1 / c.ITEMS)
    category = dict(zip(items["item_id"], items["category"]))
    brand = dict(zip(items["item_id"], items["brand"]))
    with served(root, index="scann") as client:
        kitchen = recs(client, history=HISTORY, k=20, filter={"include_categories": ["cat1"]})
        passing = {i for i in items["item_id"] if category[i] == "cat1"} - set(HISTORY)
        assert {i for i, _ in kitchen} == passing  # all that pass, though k is larger
        no_brand = recs(client, history=HISTORY, k=10, filter={"exclude_brands": ["brand1"]})
        assert len(no_brand) == 10 and all(brand[i] != "brand1" for i, _ in no_brand)
        assert recs(client, history=HISTORY, k=10,
                    filter={"include_categories": ["no-such"]}) == []
        got = client.get("/recommendations/u000", params=[
            ("include_categories", "cat2"), ("include_categories", "cat3"), ("k", 20)]).json()
        assert {category[r["item_id"]] for r in got["recommendations"]} <= {"cat2", "cat3"}
        similar = client.get("/items/SKU0002/similar",
                             params={"k": 20, "include_brands": "brand2"}).json()["similar"]
        assert similar and all(brand[s["item_id"]] == "brand2" for s in similar)
        assert client.post("/recommendations", json={"history": HISTORY, "filter": {
            "include_colours": ["red"]}}).status_code == 422


class FakeModel:
    """A 2,000-item exported catalog in memory, for LiveRetrieval alone."""

    def __init__(self, n=2000, dim=8, k=10):
        rng = np.random.default_rng(0)
        self.item_matrix = rng.normal(size=(n, dim)).astype(np.float32)
        self.embedding_ids = np.array([f"i{j}" for j in range(n)])
        self.embedding_row = {item: j for j, item in enumerate(self.embedding_ids)}
        self.category_codes = (np.arange(n) % 100).astype(np.int32)  # 100 categories: 1% each
        self.categories = [f"c{j}" for j in range(100)]
        self.brand_codes = np.zeros(n, np.int32)
        self.brands = [""]
        self.k, self.max_fetch, self.searches = k, n, []

    def filter_mask(self, flt):
        names = np.array(self.categories)[self.category_codes]
        mask = np.ones(len(names), bool)
        if flt.include_categories:
            mask &= np.isin(names, list(flt.include_categories))
        if flt.exclude_categories:
            mask &= ~np.isin(names, list(flt.exclude_categories))
        return mask

    def index_search(self, query, fetch):
        self.searches.append(fetch)
        scores = self.item_matrix @ query
        top = np.argsort(-scores)[:fetch]
        return [(self.embedding_ids[i], float(scores[i])) for i in top]


def test_filters_keep_k_full_with_wider_search_and_exact_fallback(monkeypatch):
    import serving.live as live

    model = FakeModel()
    view = type("View", (), {})()
    view.snapshot = Snapshot.empty(2000, 8)
    retrieval = LiveRetrieval(model, view)
    query = np.random.default_rng(1).normal(size=8).astype(np.float32)
    first = model.index_search(query, model.k)
    scores = model.item_matrix @ query

    def exact(allowed):
        rows = [j for j in np.argsort(-scores) if allowed[j]][:10]
        return [model.embedding_ids[j] for j in rows]

    # 1% of the catalog passes: scored exactly over the 20 allowed items.
    one = ItemFilter.of(include_categories=["c7"])
    got = retrieval.finish(first, query, 10, one, set())
    assert [i for i, _ in got] == exact(model.filter_mask(one))
    # None pass: an empty answer, not an error.
    assert retrieval.finish(first, query, 10, ItemFilter.of(include_categories=["x"]),
                            set()) == []
    # 30% pass and exact scoring is not cheap (EXACT_MAX lowered): the index is asked again
    # for more, grown by the share that passes.
    monkeypatch.setattr(live, "EXACT_MAX", 100)
    model.searches.clear()
    wide = ItemFilter.of(include_categories=[f"c{j}" for j in range(30)])
    got = retrieval.finish(first, query, 10, wide, set())
    assert [i for i, _ in got] == exact(model.filter_mask(wide))
    assert model.searches and model.searches[0] == int(np.ceil(10 / 0.3 * 2))


def test_database_writes_are_all_or_nothing_and_schema_is_versioned(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/x.db")
    db.change_items([("a", "text a", "", "", 1.0)])
    with pytest.raises(DatabaseError):  # the second row cannot be bound: nothing written
        db.change_items([("b", "text b", "", "", 2.0), ("c", "text c", "", "", object())])
    assert [change.item_id for change in db.item_changes(0)] == ["a"]
    assert db.stored_schema_version() == 1
    with pytest.raises(ValueError, match="DATABASE_URL"):
        Database("mysql://somewhere")
    # A reader that saw 3 before 2 (PostgreSQL commit order) asks for 2 again.
    tail = Tail()
    Row = type("Row", (), {"__init__": lambda self, seq: setattr(self, "seq", seq)})
    assert [r.seq for r in tail.fresh([Row(1), Row(3)])] == [1, 3]
    assert tail.ask() == (3, [2])
    assert [r.seq for r in tail.fresh([Row(2)])] == [2]
    assert tail.ask() == (3, [])


def test_database_down_writes_503_reads_keep_serving(root):
    app = create_app(root, "bruteforce", poll_seconds=0, admin_token=TOKEN,
                     database_url="postgresql://nobody@127.0.0.1:9/none")
    with TestClient(app) as client:
        assert client.post("/recommendations", json={"history": HISTORY}).status_code == 200
        answer = client.put("/items/N1", json={"text": "a new lamp"}, headers=ADMIN)
        assert answer.status_code == 503 and "database" in answer.json()["detail"]
        assert client.post("/events", json={"user_id": "u", "item_id": "SKU0001"},
                           headers=ADMIN).status_code == 503
        assert client.get("/live").json()["error"]


def test_bad_items_are_refused_naming_the_field(root):
    with served(root) as client:
        for body, field in (({"text": ""}, "text"), ({"text": "x", "price": -1}, "price"),
                            ({"text": "x" * 10_001}, "text"), ({"txt": "x"}, "txt"),
                            ({"text": "x", "category": "c" * 300}, "category")):
            answer = client.put("/items/N1", json=body, headers=ADMIN)
            assert answer.status_code == 422, body
            assert field in [d["loc"][-1] for d in answer.json()["detail"]]
        bad_delete = client.post("/items/bulk", headers=ADMIN, json={
            "put": [{"item_id": "N2", "text": "a lamp"}], "delete": ["NOPE"]})
        assert bad_delete.status_code == 422
        assert client.get("/items/N2/similar").status_code == 404  # nothing was written
        assert client.get("/live").json()["live_items"] == 0


def test_prepare_data_reads_the_live_database(tmp_path):
    """What the API recorded becomes training data: events alone, or added to a source, with
    the items put (text and metadata) in the catalog and the last event recorded."""
    import json

    from recdata.cli import main

    url = f"sqlite:///{tmp_path}/live.db"
    db = Database(url)
    db.change_items([("NEW1", "a blue glass lamp", "lamps", "acme", 12.5),
                     ("NEW2", "gone soon", "", "", None)], [])
    db.change_items([], ["NEW2"])
    rows = [(f"user{u}", item, "purchase", 1_700_000_000 + 60 * t)
            for u in range(5) for t, item in enumerate(["NEW1", "A", "B", "C"])]
    db.add_events(rows)
    assert main(["--source", "events", "--live-db", url, "--out", str(tmp_path / "alone")]) == 0
    items = pd.read_parquet(tmp_path / "alone" / "items.parquet")
    events = pd.read_parquet(tmp_path / "alone" / "events.parquet")
    assert len(events) == len(rows) and set(items["item_id"]) == {"NEW1", "A", "B", "C"}
    new = items.set_index("item_id").loc["NEW1"]
    assert (new["text"], new["category"], new["brand"], new["price"]) == (
        "a blue glass lamp", "lamps", "acme", 12.5)
    manifest = json.loads((tmp_path / "alone" / "manifest.json").read_text())
    assert manifest["options"]["events_through"] == len(rows)
    assert manifest["options"]["live_items"] == 1  # NEW2 was withdrawn
    assert main(["--source", "sample", "--live-db", url, "--out", str(tmp_path / "both")]) == 0
    both = pd.read_parquet(tmp_path / "both" / "items.parquet")
    assert "NEW1" in set(both["item_id"]) and len(both) > 100
    assert main(["--source", "events", "--live-db", f"sqlite:///{tmp_path}/empty.db", "--out",
                 str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()


def test_live_history_signature_reads_live_vectors_as_items(version1):
    """A history entry the catalog does not know, given with a vector, counts as an item with
    that vector: with an exported item's own vector under a new id, the query equals the
    query of the history that names the exported item."""
    exported = pd.read_parquet(version1 / c.ITEM_EMBEDDINGS)
    table = dict(zip(exported["item_id"], np.stack(exported["embedding"].to_numpy())))
    model = tf.saved_model.load(str(version1 / c.RETRIEVAL_BRUTEFORCE))
    plain = model.signatures[c.WITH_EVENT_TYPES]
    live = model.signatures[c.LIVE_HISTORY]
    history, kinds = ["SKU0003", "SKU0004", "SKU0005"], ["view", "purchase", "view"]
    vectors = np.zeros((1, 3, len(table["SKU0004"])), np.float32)
    vectors[0, 1] = table["SKU0004"]
    want = plain(history=tf.constant([history]), event_types=tf.constant([kinds]))
    got = live(history=tf.constant([["SKU0003", "NEW-4", "SKU0005"]]),
               event_types=tf.constant([kinds]), live_vectors=tf.constant(vectors))
    np.testing.assert_allclose(got[c.QUERY].numpy(), want[c.QUERY].numpy(), atol=1e-5)
    # Without the vector the new id is padding: another query.
    none = live(history=tf.constant([["SKU0003", "NEW-4", "SKU0005"]]),
                event_types=tf.constant([kinds]), live_vectors=tf.constant(vectors * 0))
    assert not np.allclose(none[c.QUERY].numpy(), want[c.QUERY].numpy(), atol=1e-3)


def test_a_user_who_bought_only_a_new_item_gets_recommendations_from_it(root, version1):
    twin = pd.read_parquet(version1 / c.ITEMS).iloc[7]
    with served(root) as client:
        client.put("/items/NEW-7", headers=ADMIN, json={
            "text": twin["text"], "category": twin["category"], "brand": twin["brand"],
            "price": float(twin["price"])})
        client.post("/events", headers=ADMIN, json={"user_id": "fresh-user",
                                                    "item_id": "NEW-7"})
        answer = client.get("/recommendations/fresh-user", params={"k": 10}).json()
        session = client.post("/recommendations", json={"history": ["NEW-7"], "k": 10,
                                                        "event_types": ["purchase"]}).json()
        popular = client.post("/recommendations", json={"history": [], "k": 10}).json()
    assert not answer["fallback"] and not answer["unknown_items"]
    assert [r["item_id"] for r in answer["recommendations"]] == [
        r["item_id"] for r in session["recommendations"]]
    assert "NEW-7" not in [r["item_id"] for r in answer["recommendations"]]
    assert [r["item_id"] for r in answer["recommendations"]] != [
        r["item_id"] for r in popular["recommendations"]]


def test_events_every_loaded_version_was_trained_on_are_forgotten(tmp_path):
    from serving.live import LiveState

    db = Database(f"sqlite:///{tmp_path}/live.db")
    db.add_events([("a", "SKU0001", "view", 1.0), ("a", "SKU0002", "view", 2.0),
                   ("b", "SKU0003", "view", 3.0)])
    live = LiveState(db, poll_seconds=0)
    live.sync()
    assert live.prune(0) == 0
    assert live.prune(2) == 2  # seq 1 and 2: user a's
    assert list(live.events) == ["b"] and live.user_events("b")[0].item_id == "SKU0003"
    live.stop()
