"""The API as production sees it: version policy, single-flight reloads that never stall
traffic, the admin token, request limits, /metrics and the access log."""

import asyncio
import json
import logging
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from test_api import ADMIN, TOKEN, add_version, shift_embeddings

import serving.model_store as model_store
from serving.app import create_app


@pytest.fixture(scope="module")
def client(version1, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    add_version(version1, root, 1)
    with TestClient(create_app(root, "bruteforce", poll_seconds=0, admin_token=TOKEN)) as c:
        yield c


# ---- versions and the admin path ----

def test_reloads_are_single_flight_and_never_stall_requests(version1, tmp_path, monkeypatch):
    """60 concurrent POST /admin/reload while a slow version loads: every call shares the one
    load's result and a recommendation request still answers at once."""
    add_version(version1, tmp_path, 1)
    app = create_app(tmp_path, "bruteforce", poll_seconds=0, admin_token=TOKEN)
    real_load, loads = model_store.ServingModel.load, []

    def slow_load(path, version, index, batcher=None):
        loads.append(version)
        if version == 2:
            time.sleep(2.0)
        return real_load(path, version, index, batcher)

    monkeypatch.setattr(model_store.ServingModel, "load", staticmethod(slow_load))

    async def scenario():
        await asyncio.to_thread(app.state.store.start)
        add_version(version1, tmp_path, 2, edit=shift_embeddings)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            reloads = [asyncio.create_task(http.post("/admin/reload", headers=ADMIN))
                       for _ in range(60)]
            await asyncio.sleep(0.3)  # the load of version 2 is under way
            started = time.perf_counter()
            answer = await http.get("/recommendations/u000")
            waited = time.perf_counter() - started
            results = await asyncio.gather(*reloads)
        app.state.store.stop()
        return answer, waited, results

    answer, waited, results = asyncio.run(scenario())
    assert answer.status_code == 200 and answer.json()["model_version"] == 1
    assert waited < 1.0, f"a request waited {waited:.2f}s behind reloads"
    assert all(r.status_code == 200 and r.json()["model_version"] == 2 for r in results)
    assert loads == [1, 2]  # one load for all 60 calls


def test_non_ascii_digit_names_are_ignored_with_one_warning(version1, tmp_path, caplog):
    add_version(version1, tmp_path, 1)
    (tmp_path / "²").mkdir()  # str.isdigit() says yes, int() says no
    (tmp_path / "latest").mkdir()
    with caplog.at_level(logging.WARNING, logger="serving.model_store"):
        with TestClient(create_app(tmp_path, "bruteforce", poll_seconds=0,
                                   admin_token=TOKEN)) as app:
            assert app.get("/ready").json()["model_version"] == 1
            add_version(version1, tmp_path, 2)
            for _ in range(3):
                reload = app.post("/admin/reload", headers=ADMIN)
                assert reload.status_code == 200
            assert app.get("/ready").json()["model_version"] == 2
    warnings = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(warnings) == 2 and any("²" in w for w in warnings)


def test_pinned_version_policy(version1, tmp_path):
    add_version(version1, tmp_path, 1)
    add_version(version1, tmp_path, 2, edit=shift_embeddings)
    with TestClient(create_app(tmp_path, "bruteforce", poll_seconds=0, policy="1",
                               admin_token=TOKEN)) as app:
        assert app.get("/ready").json()["model_version"] == 1
        add_version(version1, tmp_path, 3)
        assert app.post("/admin/reload", headers=ADMIN).json()["model_version"] == 1
        meta = app.get("/metadata").json()
        assert meta["model_version"] == 1 and meta["version_policy"] == "1"
    with TestClient(create_app(tmp_path, "bruteforce", poll_seconds=0)) as app:
        assert app.get("/metadata").json()["version_policy"] == "latest"
        assert app.get("/ready").json()["model_version"] == 3
    with pytest.raises(ValueError, match="MODEL_VERSION"):
        create_app(tmp_path, "bruteforce", policy="newest")


def test_admin_needs_the_token(client, version1, tmp_path):
    assert client.post("/admin/reload").status_code == 401
    wrong = client.post("/admin/reload", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "ADMIN_TOKEN" in wrong.json()["detail"]
    assert client.post("/admin/reload", headers=ADMIN).status_code == 200
    add_version(version1, tmp_path, 1)
    app = create_app(tmp_path, "bruteforce", poll_seconds=0)  # no token configured
    with TestClient(app) as public:
        assert public.post("/admin/reload").status_code == 403
    with TestClient(app, base_url="http://127.0.0.1") as loopback:
        assert loopback.post("/admin/reload").status_code == 200


def test_error_bodies_show_no_server_paths(version1, tmp_path):
    add_version(version1, tmp_path, 1)
    broken = tmp_path / ".tmp-2"
    broken.mkdir()
    (broken / "metadata.json").write_text('{"k": 10}')  # the rest is missing
    broken.rename(tmp_path / "2")
    with TestClient(create_app(tmp_path, "bruteforce", poll_seconds=0,
                               admin_token=TOKEN)) as app:
        reload = app.post("/admin/reload", headers=ADMIN).text
        assert "failed_versions" in reload and '"2"' in reload
        assert str(tmp_path) not in reload and str(tmp_path.resolve()) not in reload
    with TestClient(create_app(tmp_path / "empty", "bruteforce", poll_seconds=0)) as empty:
        assert str(tmp_path) not in empty.get("/ready").text


# ---- request limits ----

def test_undecodable_bodies_are_422_naming_the_problem(client):
    headers = {"Content-Type": "application/json"}
    latin1 = client.post("/recommendations", content='{"history": ["caf\xe9"]}'.encode("latin-1"),
                         headers=headers)
    assert latin1.status_code == 422 and "UTF-8" in latin1.text
    deep = client.post("/recommendations", content=b"[" * 50_000 + b"]" * 50_000,
                       headers=headers)
    assert deep.status_code == 422 and "nested too deeply" in deep.text


@pytest.mark.parametrize("field, value", [("rerank", 0), ("rerank", "yes"),
                                          ("exclude_seen", 1), ("exclude_seen", "false")])
def test_booleans_are_strict(client, field, value):
    response = client.post("/recommendations", json={"history": ["SKU0001"], field: value})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][-1] == field


def test_body_size_cap_and_no_echo_of_large_inputs(client):
    huge = client.post("/recommendations", content=b'{"history": ["' + b"x" * 5_000_000 + b'"]}',
                       headers={"Content-Type": "application/json"})
    assert huge.status_code == 413
    long_history = client.post("/recommendations", json={"history": ["SKU0001"] * 1001})
    assert long_history.status_code == 422
    assert long_history.json()["detail"][0]["loc"] == ["body", "history"]
    assert len(long_history.content) < 2000  # the 1,001 ids are not echoed back


# ---- observability ----

def _sample(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample in text format, 0 if absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + wanted + "}" if wanted else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_counters_move(client):
    before = client.get("/metrics").text
    assert _sample(before, "towerrec_model_version") == 1.0
    assert _sample(before, "towerrec_index", index="bruteforce") == 1.0
    assert _sample(before, "towerrec_model_loads_total", outcome="loaded") >= 1
    for _ in range(3):
        assert client.get("/recommendations/u000").status_code == 200
    client.post("/recommendations", json={"history": ["NOPE-1", "NOPE-2"]})
    client.get("/recommendations/nobody")
    after = client.get("/metrics").text
    route = dict(method="GET", route="/recommendations/{user_id}")
    assert _sample(after, "towerrec_requests_total", **route, status="200") - \
        _sample(before, "towerrec_requests_total", **route, status="200") == 3
    assert _sample(after, "towerrec_requests_total", **route, status="404") - \
        _sample(before, "towerrec_requests_total", **route, status="404") == 1
    assert _sample(after, "towerrec_request_seconds_count", **route) - \
        _sample(before, "towerrec_request_seconds_count", **route) == 4
    assert _sample(after, "towerrec_popular_fallbacks_total") - \
        _sample(before, "towerrec_popular_fallbacks_total") == 1
    assert _sample(after, "towerrec_unknown_items_total") - \
        _sample(before, "towerrec_unknown_items_total") == 2


def test_access_log_is_one_json_line_per_request(version1, tmp_path, caplog):
    add_version(version1, tmp_path, 1)
    with TestClient(create_app(tmp_path, "bruteforce", poll_seconds=0,
                               access_log=True)) as app:
        with caplog.at_level(logging.INFO, logger="serving.access"):
            mine = app.get("/recommendations/u001", headers={"X-Request-ID": "abc-123"})
            theirs = app.get("/recommendations/u002")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "serving.access"]
    assert [line["request_id"] for line in lines] == ["abc-123",
                                                      theirs.headers["x-request-id"]]
    assert mine.headers["x-request-id"] == "abc-123"
    assert lines[0]["route"] == "/recommendations/{user_id}" and lines[0]["status"] == 200
