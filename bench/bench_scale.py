"""The large-catalog path end to end on this machine, one table: prepare a synthetic catalog of
about a million items, train (SASRec, sampled softmax, id + metadata, LazyAdam) in a time
budget, export (ScaNN tuned to recall@10 >= 0.95, brute force, ranking), serve (the API under
wrk at 1 and 8 connections), with wall time and peak RSS of each stage.

    .venv/bin/python bench/bench_scale.py --work /tmp/scale
    .venv/bin/python bench/bench_scale.py --work /tmp/scale --skip-prepare --train-minutes 5

Each stage is the project's own command in a subprocess (prepare_data.py, train.py, uvicorn
main:app); peak RSS is that process's own (os.wait4; the server's VmHWM). The synthetic
generator keeps the items that have events, so --num-items is set above the catalog size wanted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_api import (  # noqa: E402
    LUA,
    free_port,
    run_wrk,
    start_server,
    stop_server,
    user_ids,
)

LATENCY = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import tfenv
import numpy as np, pandas as pd, tensorflow as tf
import scann  # registers the ScaNN ops
version = {version!r}
users = pd.read_parquet(version + "/user_histories.parquet")["history"].head(200)
out = {{}}
for name in ("retrieval", "retrieval_bruteforce"):
    serve = tf.saved_model.load(version + "/" + name).signatures["serving_default"]
    times = []
    for history in users:
        query = tf.constant([list(history)[-50:]])
        start = time.perf_counter()
        serve(history=query)["item_ids"].numpy()
        times.append(time.perf_counter() - start)
    out[name] = 1000 * float(np.median(times[10:]))
# The index alone: exact top-k of one query against every item vector, as the brute-force
# model does it, beside the ScaNN search time the export measured for its chosen setting.
vectors = np.stack(pd.read_parquet(version + "/item_embeddings.parquet")["embedding"]
                   .to_numpy()).astype(np.float32)
items = tf.constant(vectors)
spec = [tf.TensorSpec([1, vectors.shape[1]], tf.float32)]
top = tf.function(lambda q: tf.math.top_k(tf.matmul(q, items, transpose_b=True), 110),
                  input_signature=spec)
times = []
for i in range(110):
    start = time.perf_counter()
    top(tf.constant(vectors[i:i + 1]))[1].numpy()
    times.append(time.perf_counter() - start)
out["index_bruteforce"] = 1000 * float(np.median(times[10:]))
print("LATENCY " + json.dumps(out))
"""


def run_stage(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run a command to completion; (wall seconds, peak RSS GB of that process)."""
    started = time.time()
    with log.open("w") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed; see {log}:\n" + log.read_text()[-3000:])
    return time.time() - started, usage.ru_maxrss / 1024 ** 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/towerrec-scale"))
    parser.add_argument("--num-items", type=int, default=1_300_000,
                        help="generated; about 1.0M of them get events")
    parser.add_argument("--num-users", type=int, default=300_000)
    parser.add_argument("--num-events", type=int, default=10_000_000)
    parser.add_argument("--train-minutes", type=float, default=6.0)
    parser.add_argument("--eval-users", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk row")
    parser.add_argument("--skip-prepare", action="store_true")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found (Debian: apt-get install wrk)")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data, models, runs = work / "data", work / "models", work / "runs"
    py = sys.executable
    rows = {}

    if not args.skip_prepare:
        rows["prepare"] = run_stage(
            [py, "prepare_data.py", "--source", "synthetic", "--num-users", str(args.num_users),
             "--num-items", str(args.num_items), "--num-events", str(args.num_events),
             "--out", str(data)], work / "prepare.log")
    manifest = json.loads((data / "manifest.json").read_text())
    counts = manifest.get("counts", manifest)
    print(f"data: {counts.get('num_items'):,} items, {counts.get('num_users'):,} users, "
          f"{counts.get('num_events'):,} events", flush=True)

    shutil.rmtree(models, ignore_errors=True)
    shutil.rmtree(runs, ignore_errors=True)
    rows["train + export"] = run_stage(
        [py, "train.py", "--data", str(data), "--out", str(models), "--runs-dir", str(runs),
         "--text-model", "none", "--negatives", "sampled", "--optimizer", "lazy_adam",
         "--dim", "64", "--max-seq-len", "50", "--batch-size", "128",
         "--num-negatives", "1024", "--time-budget-minutes", str(args.train_minutes),
         "--valid-users", str(args.eval_users), "--test-users", str(args.eval_users)],
        work / "train.log")
    run_dir = next(runs.iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run_meta = json.loads((run_dir / "metadata.json").read_text())
    version = models / "1"
    scann = json.loads((version / "metadata.json").read_text())["scann"]
    export_seconds = None
    for line in (work / "train.log").read_text().splitlines():
        if line.startswith("exported version"):
            export_seconds = float(line.rsplit("(", 1)[1].rstrip("s)"))

    latency_log = work / "latency.log"
    run_stage([py, "-c", LATENCY.format(root=str(ROOT), version=str(version))], latency_log)
    latency = json.loads(next(line for line in latency_log.read_text().splitlines()
                              if line.startswith("LATENCY "))[8:])

    script = work / "users.lua"
    users = user_ids(models, 20000)
    script.write_text(LUA % {"users": ",".join(json.dumps(u) for u in users), "k": 10,
                             "extra": ""})
    port = free_port()
    started = time.time()
    server = start_server(models, "scann", port, work / "serve.log")
    try:
        ready_seconds = time.time() - started
        load = {}
        for connections in (1, 8):
            run_wrk(f"http://127.0.0.1:{port}", script, connections, 3)
            load[connections] = run_wrk(f"http://127.0.0.1:{port}", script, connections,
                                        args.duration)
        peak_kb = next(int(line.split()[1]) for line in
                       Path(f"/proc/{server.pid}/status").read_text().splitlines()
                       if line.startswith("VmHWM:"))
    finally:
        stop_server(server)
    rows["serve"] = (ready_seconds, peak_kb / 1024 ** 2)

    test = metrics["test"]
    print(f"\nsynthetic {counts.get('num_items'):,} items, {counts.get('num_users'):,} users, "
          f"{counts.get('num_events'):,} events; SASRec dim 64, length 50, batch 128, 1,024 "
          f"sampled negatives + in-batch, LazyAdam, {args.train_minutes:g}-minute budget")
    print("| stage | wall s | peak RSS GB | figures |")
    print("|---|---|---|---|")
    if "prepare" in rows:
        print(f"| prepare | {rows['prepare'][0]:.0f} | {rows['prepare'][1]:.2f} | |")
    wall, rss = rows["train + export"]
    print(f"| train + export | {wall:.0f} | {rss:.2f} | {metrics['epochs']} epoch(s), "
          f"{metrics['positions_per_second']:,.0f} positions/s, test NDCG@10 "
          f"{test['ndcg@10']:.4f} / HR@10 {test['hr@10']:.4f} ({test['users']:,} users), "
          f"training wall {run_meta['wall_seconds']:.0f} s; export {export_seconds} s |")
    print(f"| ScaNN index | | | {scann['num_leaves']} leaves, {scann['leaves_to_search']} "
          f"searched, {scann['reorder']} re-scored; built in {scann['build_seconds']} s; "
          f"recall@10 {scann['recall@10_vs_bruteforce']:.3f} vs brute force |")
    print(f"| one query, SavedModel | | | ScaNN {latency['retrieval']:.2f} ms, brute force "
          f"{latency['retrieval_bruteforce']:.2f} ms "
          f"({latency['retrieval_bruteforce'] / latency['retrieval']:.1f}x) |")
    chosen = next(e for e in scann["tuning_curve"]
                  if e["leaves_to_search"] == scann["leaves_to_search"]
                  and e["reorder"] == scann["reorder"])
    print(f"| one query, index only | | | ScaNN {chosen['ms_per_query']:.3f} ms, brute-force "
          f"top-k {latency['index_bruteforce']:.2f} ms "
          f"({latency['index_bruteforce'] / chosen['ms_per_query']:.1f}x) |")
    wall, rss = rows["serve"]
    print(f"| serve (ready in) | {wall:.0f} | {rss:.2f} | " + "; ".join(
        f"{c} conn: {r['rps']:,.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
        f"{r['errors']} errors" for c, r in load.items()) + " |")
    print(f"\npeak RSS of the whole pipeline: {max(r[1] for r in rows.values()):.2f} GB "
          "(largest stage; stages run one after another)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
