"""A seeded schema fuzz of the live service's endpoints (and `?version=N` everywhere): random
and wrong-typed inputs never answer 5xx, and every status answered is in the operation's
OpenAPI description."""

import random

import pytest
from fastapi.testclient import TestClient
from test_api import ADMIN, TOKEN, add_version

from serving.app import create_app

ATOMS = [None, True, 0, -1, 1.5, 1e308, -1e308, "", "x", "SKU0001", "ü" * 300, "a" * 20_000,
         [], {}, ["SKU0001"], [1, 2], {"a": 1}]


def value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth > 2 or roll < 0.6:
        return rng.choice(ATOMS)
    if roll < 0.8:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(FIELDS): value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


FIELDS = ["text", "category", "brand", "price", "item_id", "user_id", "event_type",
          "timestamp", "events", "put", "delete", "history", "k", "filter", "include_items",
          "exclude_categories", "event_types", "extra"]


def body(rng: random.Random, shape: dict):
    """Mostly the right keys with random values, sometimes anything at all."""
    if rng.random() < 0.15:
        return value(rng)
    out = {key: (make(rng) if rng.random() < 0.5 else value(rng)) for key, make in shape.items()
           if rng.random() < 0.8}
    if rng.random() < 0.1:
        out[rng.choice(FIELDS)] = value(rng)
    return out


def item(rng):
    return {"text": rng.choice(["a red mug", "", "x" * 10_001, 3]),
            "price": rng.choice([1.0, -1, None, "1"])}


SHAPES = {
    ("PUT", "/items/{item_id}"): {"text": lambda r: r.choice(["lamp", ""]),
                                  "category": lambda r: r.choice(["cat1", "c" * 300]),
                                  "brand": lambda r: "brand1",
                                  "price": lambda r: r.choice([1.0, -2.0, "nan"])},
    ("POST", "/items/bulk"): {"put": lambda r: [dict(item(r), item_id=r.choice(["N1", ""]))],
                              "delete": lambda r: [r.choice(["SKU0001", "NOPE", ""])]},
    ("POST", "/events"): {"events": lambda r: [{"user_id": r.choice(["u1", ""]),
                                                "item_id": r.choice(["SKU0001", "NOPE"])}],
                          "user_id": lambda r: "u1", "item_id": lambda r: "SKU0002",
                          "timestamp": lambda r: r.choice([1.0, -1.0])},
    ("POST", "/recommendations"): {"history": lambda r: ["SKU0001", "NEW"],
                                   "k": lambda r: r.choice([1, 0, 101]),
                                   "filter": lambda r: {"include_items": ["SKU0002"],
                                                        "colour": r.choice([None, "red"])}},
    ("DELETE", "/items/{item_id}"): {},
    ("GET", "/live"): {},
    ("GET", "/recommendations/{user_id}"): {},
    ("GET", "/items/{item_id}/similar"): {},
    ("GET", "/users/{user_id}/history"): {},
}
# A valid request per write endpoint goes first, so the fuzz starts from a working call.
VALID = {("PUT", "/items/{item_id}"): {"text": "a red lamp", "price": 2.5},
         ("POST", "/items/bulk"): {"put": [{"item_id": "N9", "text": "a mug"}]},
         ("POST", "/events"): {"user_id": "u1", "item_id": "SKU0002"}}
PATH_IDS = ["SKU0001", "NOPE", "u000", "x" * 300, "%F0%9F%98%80", "a b"]
QUERIES = [{}, {"version": 999}, {"version": 0}, {"k": 0}, {"include_categories": "cat1"},
           {"include_items": ["SKU0001"] * 3, "exclude_brands": "b" * 300},
           {"fallback": "popular"}]


@pytest.fixture(scope="module")
def client(version1, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    add_version(version1, root, 1)
    app = create_app(root, "bruteforce", poll_seconds=0, admin_token=TOKEN,
                     database_url=f"sqlite:///{root}.live.db")
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_fuzzed_live_endpoints_answer_documented_statuses_and_never_5xx(client):
    spec = client.get("/openapi.json").json()["paths"]
    rng = random.Random(7)
    seen = set()
    for (method, template), shape in SHAPES.items():
        documented = {int(code) for code in spec[template][method.lower()]["responses"]}
        for attempt in range(60):
            path = template.replace("{item_id}", rng.choice(PATH_IDS)).replace(
                "{user_id}", rng.choice(PATH_IDS))
            kwargs = {"params": rng.choice(QUERIES)}
            if rng.random() < 0.9:
                kwargs["headers"] = ADMIN
            if method in ("PUT", "POST"):
                kwargs["json"] = body(rng, shape)
            if attempt == 0 and (method, template) in VALID:
                kwargs = {"headers": ADMIN, "json": VALID[method, template]}
            answer = client.request(method, path, **kwargs)
            seen.add((method, template, answer.status_code))
            assert answer.status_code < 500, (method, path, kwargs, answer.text[:300])
            assert answer.status_code in documented | {422}, (method, template,
                                                               answer.status_code, documented)
    # The fuzz reached success, refusal and validation on the write endpoints.
    for template in ("/items/{item_id}", "/items/bulk", "/events"):
        codes = {code for _, t, code in seen if t == template}
        assert 200 in codes and 422 in codes, (template, codes)


def test_every_operation_taking_a_version_documents_its_404(client):
    paths = client.get("/openapi.json").json()["paths"]
    taking = [(path, method) for path, operations in paths.items()
              for method, operation in operations.items()
              if any(p["name"] == "version" for p in operation.get("parameters", []))]
    assert len(taking) >= 8
    for path, method in taking:
        assert "404" in paths[path][method]["responses"], (method, path)
        answer = client.request(method.upper(), path.replace("{user_id}", "u000").replace(
            "{item_id}", "SKU0001"), params={"version": 99, "q": "x"},
            json={"history": ["SKU0001"], "candidates": ["SKU0002"]})
        assert answer.status_code == 404, (method, path, answer.text)
