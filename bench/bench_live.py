"""The live service under load: freshness, reads with live items and filters, writes while
serving, and cold items placed through the API against the offline evaluation.

Starts `uvicorn main:app` on 127.0.0.1 for MODEL_DIR with a fresh SQLite database in a
temporary directory (or DATABASE_URL), and measures:

- freshness: a second server process on the same database; time from a `PUT /items` answer on
  the first to the item appearing in the second's recommendation that asks for it (a filter on
  its id); p50 / p99 over `--puts` items;
- reads: requests/s and p99 at `--connections` (wrk) for `GET /recommendations/{user}` with
  0, 1,000 and 10,000 live items (copies of catalog items' text under new ids), and with a
  category filter (`--category`, e.g. one that passes 1% of the catalog);
- writes while reading: items/s (bulk PUT of 100) and events/s (batches of 100) sustained
  while wrk reads at the same connections;
- cold parity (`--cold-parity`, a run trained with --cold-items): every never-trained item PUT
  into the running server under its own id (the live vector replaces the exported one); each
  cold-target test user's history POSTed; NDCG@10 against metrics.json's cold_test.

    .venv/bin/python bench/bench_live.py --model-dir /tmp/models/ml1m --category Mystery
    .venv/bin/python bench/bench_live.py --model-dir /tmp/models/retail --cold-parity \
        --skip-load
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_api import LUA, free_port, run_wrk, start_server, stop_server, user_ids  # noqa: E402

TOKEN = "bench-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def newest_version(model_dir: Path) -> Path:
    return max((p for p in model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def live_items(items: pd.DataFrame, count: int, prefix: str, seed: int) -> list[dict]:
    """`count` new items: catalog items' text and metadata under new ids."""
    rows = items.sample(count, replace=count > len(items), random_state=seed)
    return [{"item_id": f"{prefix}{i}", "text": f"{r.text} (new {i})",
             "category": str(r.category or ""), "brand": str(r.brand or ""),
             "price": None if pd.isna(r.price) else float(r.price)}
            for i, r in enumerate(rows.itertuples())]


def put_bulk(client, items: list[dict], chunk: int = 500) -> float:
    started = time.perf_counter()
    for start in range(0, len(items), chunk):
        answer = client.post("/items/bulk", json={"put": items[start:start + chunk]},
                             headers=ADMIN, timeout=600)
        answer.raise_for_status()
    return time.perf_counter() - started


def freshness(a: str, b: str, items: pd.DataFrame, puts: int, history: list[str]) -> dict:
    import httpx

    waits = []
    rng = np.random.default_rng(5)
    with httpx.Client(timeout=30) as client:
        for item in live_items(items, puts, "FRESH-", 1):
            # A random pause: the next put must not start in step with the reader's poll.
            time.sleep(float(rng.uniform(0, 0.3)))
            answer = client.put(f"{a}/items/{item['item_id']}", headers=ADMIN,
                                json={k: v for k, v in item.items() if k != "item_id"})
            answer.raise_for_status()
            started = time.perf_counter()
            while True:
                got = client.post(f"{b}/recommendations", json={
                    "history": history, "k": 1,
                    "filter": {"include_items": [item["item_id"]]}}).json()
                if got["recommendations"]:
                    break
                if time.perf_counter() - started > 10:
                    raise SystemExit(f"{item['item_id']} not seen by the second process in 10 s")
                time.sleep(0.005)
            waits.append(time.perf_counter() - started)
    ms = np.array(waits) * 1e3
    return {"puts": puts, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def writes_under_load(url: str, script: Path, connections: int, seconds: float,
                      items: pd.DataFrame, users: list[str], catalog: list[str]) -> dict:
    """wrk reads while one writer thread puts items (bulks of 100), then another posts events
    (batches of 100)."""
    import httpx

    out = {}
    for kind in ("items", "events"):
        done, stop = [0], threading.Event()
        rng = np.random.default_rng(3)

        def writer(kind=kind, done=done, stop=stop, rng=rng):
            with httpx.Client(base_url=url, timeout=60) as client:
                n = 0
                while not stop.is_set():
                    if kind == "items":
                        batch = live_items(items, 100, f"W{n}-", n)
                        client.post("/items/bulk", json={"put": batch},
                                    headers=ADMIN).raise_for_status()
                    else:
                        batch = [{"user_id": str(users[int(rng.integers(len(users)))]),
                                  "item_id": str(catalog[int(rng.integers(len(catalog)))]),
                                  "event_type": "purchase"} for _ in range(100)]
                        client.post("/events", json={"events": batch},
                                    headers=ADMIN).raise_for_status()
                    n += 1
                    done[0] += 100

        thread = threading.Thread(target=writer)
        started = time.perf_counter()
        thread.start()
        reads = run_wrk(url, script, connections, seconds)
        stop.set()
        thread.join()
        elapsed = time.perf_counter() - started
        out[kind] = {"per_second": done[0] / elapsed, "reads_rps": reads["rps"],
                     "reads_p99_ms": reads["p99_ms"], "read_errors": reads["errors"]}
    return out


def cold_parity(url: str, version: Path) -> dict:
    """PUT every never-trained item (own id, text, metadata), then score the cold-target test
    users through the API: NDCG@10 of the held-out last item, history = all before it."""
    import httpx

    from training.sequences import held_out_items

    items = pd.read_parquet(version / "items.parquet")
    metadata = json.loads((version / "metadata.json").read_text())
    metrics, config = metadata["test_metrics"], metadata["config"]
    held_out = held_out_items(len(items), config["cold_items"], config["seed"])
    if not len(held_out):
        raise SystemExit(f"{version}: trained without --cold-items, nothing to put")
    cold = items[items["item_idx"].isin(held_out)]
    users = pd.read_parquet(version / "user_histories.parquet")
    targets = [(list(h[:-1]), list(e[:-1]), h[-1]) for h, e in zip(
        users["history"], users["event_types"]) if h[-1] in set(cold["item_id"])]
    with httpx.Client(base_url=url, timeout=600) as client:
        before = score_users(client, targets)
        put_seconds = put_bulk(client, [
            {"item_id": str(r.item_id), "text": str(r.text or "") or str(r.item_id),
             "category": str(r.category or ""), "brand": str(r.brand or ""),
             "price": None if pd.isna(r.price) else float(r.price)}
            for r in cold.itertuples()])
        after = score_users(client, targets)
    offline = (metrics or {}).get("cold_test", {})
    return {"cold_items_put": len(cold), "put_seconds": put_seconds, "users": len(targets),
            "api_ndcg@10_exported_vectors": before, "api_ndcg@10_put_vectors": after,
            "offline_cold_test_ndcg@10": offline.get("ndcg@10"),
            "offline_users": offline.get("users")}


def score_users(client, targets) -> float:
    gains = []
    for history, kinds, target in targets:
        got = client.post("/recommendations", json={"history": [str(x) for x in history],
                                                    "event_types": [str(x) for x in kinds],
                                                    "k": 10}).json()
        ids = [r["item_id"] for r in got["recommendations"]]
        gains.append(1 / math.log2(ids.index(str(target)) + 2) if str(target) in ids else 0.0)
    return float(np.mean(gains)) if gains else float("nan")


def load(args, url: str, model_dir: Path, version: Path, items: pd.DataFrame,
         users: list[str], work: Path, env: dict) -> dict:
    """Reads at each live-item count and under the filter, then freshness seen from a second
    process, then writes while reading."""
    import httpx

    out: dict = {}
    script = work / "users.lua"
    rows, have = [], 0

    def read(name: str, extra: str = "") -> None:
        script.write_text(LUA % {"users": ",".join(json.dumps(u) for u in users), "k": 10,
                                 "extra": extra})
        run_wrk(url, script, args.connections, args.warmup)
        result = run_wrk(url, script, args.connections, args.duration)
        rows.append({"level": name, **result})
        print(f"  {name}: {result['rps']:.1f} req/s, p99 {result['p99_ms']:.1f} ms, errors "
              f"{result['errors']}", flush=True)

    with httpx.Client(base_url=url, timeout=600) as client:
        for count in args.live:
            if count > have:
                seconds = put_bulk(client, live_items(items, count - have, f"L{count}-",
                                                      count))
                print(f"put {count - have} items in {seconds:.1f}s "
                      f"({(count - have) / seconds:.0f} items/s, bulks of 500, idle server)",
                      flush=True)
                have = count
            read(f"{count} live items")
    if args.category:
        share = float((items["category"] == args.category).mean())
        read(f"category filter {args.category} ({share:.2%} of the catalog), {have} live items",
             f"&include_categories={args.category}")
    out["reads"] = rows
    if args.reads_only:
        return out
    history = [str(x) for x in pd.read_parquet(
        version / "user_histories.parquet")["history"].iloc[0][-5:]]
    b_port = free_port()
    b = start_server(model_dir, args.index, b_port, work / "b.log", **env)
    try:
        out["freshness"] = freshness(url, f"http://127.0.0.1:{b_port}", items, args.puts,
                                     history)
    finally:
        stop_server(b)
    print("freshness (second process):", json.dumps(out["freshness"]), flush=True)
    script.write_text(LUA % {"users": ",".join(json.dumps(u) for u in users), "k": 10,
                             "extra": ""})
    out["writes"] = writes_under_load(url, script, args.connections, args.duration, items,
                                      users, items["item_id"].astype(str).tolist())
    print("writes under read load:", json.dumps(out["writes"]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--index", default="scann", choices=["scann", "bruteforce"])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--live", type=int, nargs="+", default=[0, 1000, 10000],
                        help="live item counts to read under (cumulative)")
    parser.add_argument("--category", help="a category for the filtered read level")
    parser.add_argument("--puts", type=int, default=100, help="items timed for freshness")
    parser.add_argument("--cold-parity", action="store_true")
    parser.add_argument("--skip-load", action="store_true", help="only --cold-parity")
    parser.add_argument("--reads-only", action="store_true",
                        help="no freshness and no writes under load")
    args = parser.parse_args()
    if not shutil.which("wrk") and not args.skip_load:
        raise SystemExit("wrk not found (Debian: apt-get install wrk)")

    model_dir = args.model_dir.resolve()
    version = newest_version(model_dir)
    items = pd.read_parquet(version / "items.parquet")
    users = user_ids(model_dir, 20000)
    print(f"model {version} ({len(items)} items), index {args.index}, "
          f"{os.cpu_count()} CPUs shared with the load generator", flush=True)
    results: dict = {"model": str(version), "index": args.index}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {"DATABASE_URL": os.environ.get("DATABASE_URL") or f"sqlite:///{work}/live.db",
               "ADMIN_TOKEN": TOKEN, "POLL_SECONDS": "0"}
        a_port = free_port()
        a = start_server(model_dir, args.index, a_port, work / "a.log", **env)
        url = f"http://127.0.0.1:{a_port}"
        try:
            if args.cold_parity:
                results["cold_parity"] = cold_parity(url, version)
                print("cold parity:", json.dumps(results["cold_parity"]), flush=True)
            if not args.skip_load:
                results.update(load(args, url, model_dir, version, items, users, work, env))
        finally:
            stop_server(a)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
