"""The live service on a real PostgreSQL (Debian's server binaries, started here on
127.0.0.1): two API processes sharing one database see each other's writes."""

import time

import httpx
import pytest
from support import postgres_bin, postgres_server, uvicorn_server

from recdata.livedb import Database, DatabaseError

pytestmark = pytest.mark.skipif(postgres_bin() is None,
                                reason="PostgreSQL server binaries (Debian's postgresql "
                                       "package) are not installed; .ci/run installs them")
TOKEN = "pg-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def database():
    with postgres_server() as url:
        yield url


def until(check, seconds: float = 5.0):
    """Poll `check` until it returns a true value; returns (value, seconds waited)."""
    started = time.perf_counter()
    while True:
        value = check()
        if value or time.perf_counter() - started > seconds:
            return value, time.perf_counter() - started
        time.sleep(0.02)


def test_schema_and_atomic_writes_on_postgresql(database):
    db = Database(database)
    assert db.stored_schema_version() == 1
    Database(database).stored_schema_version()  # a second connection migrates nothing
    before = len(db.item_changes(0))
    with pytest.raises(DatabaseError):  # the second row is refused: nothing written
        db.change_items([("pg-a", "text", "", "", 1.0), ("pg-b", None, "", "", 1.0),
                         ("pg-c", "text", "", "", "not a price")])
    assert len(db.item_changes(0)) == before
    db.change_items([("pg-a", "text", "", "", 1.0)], ["pg-z"])
    assert [(c.item_id, c.op) for c in db.item_changes(0)][-2:] == [("pg-a", "put"),
                                                                    ("pg-z", "delete")]
    db.close()


def test_two_api_processes_share_one_postgresql(database, version1, tmp_path):
    import shutil

    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(version1, root / "1")
    env = {"DATABASE_URL": database, "ADMIN_TOKEN": TOKEN, "INDEX": "bruteforce"}
    with uvicorn_server(root, tmp_path / "a.log", **env) as (a, _), \
            uvicorn_server(root, tmp_path / "b.log", **env) as (b, _):
        put = httpx.put(f"{a}/items/PG-NEW", headers=ADMIN, timeout=30,
                        json={"text": "red mug item 3", "category": "cat3"})
        assert put.status_code == 200, put.text
        assert httpx.get(f"{a}/items/PG-NEW/similar").status_code == 200  # at once, here
        seen, waited = until(lambda: httpx.get(f"{b}/items/PG-NEW/similar").status_code == 200)
        assert seen, "process B never saw process A's new item"
        assert waited < 2.0
        events = httpx.post(f"{b}/events", headers=ADMIN, json={
            "user_id": "pg-user", "item_id": "PG-NEW"})
        assert events.status_code == 200, events.text
        shown, _ = until(lambda: httpx.get(f"{a}/users/pg-user/history").status_code == 200)
        assert shown
        assert httpx.get(f"{a}/users/pg-user/history").json()["history"][0]["item_id"] == (
            "PG-NEW")
        assert httpx.delete(f"{b}/items/SKU0002", headers=ADMIN).status_code == 200
        gone, _ = until(lambda: httpx.get(f"{a}/items/SKU0002/similar").status_code == 404)
        assert gone
        # A restart of A: the state comes back from PostgreSQL.
    with uvicorn_server(root, tmp_path / "c.log", **env) as (c, _):
        assert httpx.get(f"{c}/items/PG-NEW/similar").status_code == 200
        assert httpx.get(f"{c}/items/SKU0002/similar").status_code == 404
        assert httpx.get(f"{c}/live").json()["database"].startswith("postgresql://towerrec")
