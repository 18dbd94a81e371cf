"""Time prepare_data.py on a large synthetic log and report wall time and peak memory.

    python bench/bench_prepare.py                                   # 10M events, both engines
    python bench/bench_prepare.py --num-events 100000000 --num-users 2000000 \\
        --num-items 1000000 --engine duckdb                         # 100M events

The log is what a user would bring: Parquet shards of raw events (user_id, item_id, timestamp,
event_type, value; repeats included) plus an items table with text, written once by the
synthetic generator in chunks of users (cache/bench-prepare/, reused by later runs; generation
is not timed). Each engine then runs the real CLI as a subprocess on it:

    prepare_data.py --source events --input LOG/events --items LOG/items.parquet ... --engine E

Peak RSS is the child's maximum resident set size (getrusage), cross-checked by sampling the
child with psutil. DuckDB's scratch space (spills) sits beside --out and is removed after.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recdata.synthetic import generate  # noqa: E402

CHUNK_EVENTS = 10_000_000
LOG_FLAGS = [
    "--event-col", "event_type", "--value-col", "value", "--text-cols", "text",
    "--category-col", "category", "--brand-col", "brand", "--price-col", "price",
]  # fmt: skip


def write_log(directory: Path, num_users: int, num_items: int, num_events: int, seed: int) -> None:
    """events/part-K.parquet (one chunk of users each) and items.parquet, atomically."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "events").mkdir(parents=True)
    chunks = max(1, -(-num_events // CHUNK_EVENTS))
    users = np.diff(np.linspace(0, num_users, chunks + 1).astype(np.int64))
    events = np.diff(np.linspace(0, num_events, chunks + 1).astype(np.int64))
    for k in range(chunks):
        start = time.perf_counter()
        raw = generate(int(users[k]), num_items, int(events[k]), seed=seed + k)
        frame = raw.events
        table = pa.table(
            {
                "user_id": pa.array(f"c{k:03d}-" + frame["user_id"].astype(str).to_numpy(object)),
                "item_id": pa.array(frame["item_id"].astype(str).to_numpy(object)),
                "timestamp": frame["timestamp"].to_numpy(),
                "event_type": pa.array(frame["event_type"].astype(str).to_numpy(object)),
                "value": frame["value"].to_numpy(),
            }
        )
        pq.write_table(table, tmp / "events" / f"part-{k:05d}.parquet", compression="zstd")
        if k == 0:
            pq.write_table(
                pa.Table.from_pandas(raw.items, preserve_index=False), tmp / "items.parquet"
            )
        took = time.perf_counter() - start
        print(f"  log chunk {k + 1}/{chunks}: {len(frame):,} events ({took:.0f} s)")
        del raw, frame, table
    tmp.rename(directory)


def _sample_peak_rss(proc: psutil.Process, peak: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(True))
            peak[0] = max(peak[0], rss)
        except psutil.Error:
            return
        stop.wait(0.05)


def run_engine(engine: str, log: Path, out: Path, memory_limit: str | None) -> dict:
    cmd = [
        sys.executable, str(ROOT / "prepare_data.py"), "--source", "events",
        "--input", str(log / "events"), "--items", str(log / "items.parquet"), *LOG_FLAGS,
        "--engine", engine, "--out", str(out),
    ]  # fmt: skip
    if memory_limit and engine == "duckdb":
        cmd += ["--memory-limit", memory_limit]
    print("$", " ".join(cmd[1:]), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT)
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(
        target=_sample_peak_rss, args=(psutil.Process(child.pid), peak, stop)
    )
    sampler.start()
    code = child.wait()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    max_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    if max_rss <= before * 1024:  # an earlier child had the larger peak: use the sampler's
        max_rss = 0
    if code != 0:
        raise SystemExit(f"prepare_data.py --engine {engine} failed with exit code {code}")
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    return {"wall": wall, "rss": max(max_rss, peak[0]), "counts": counts}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-users", type=int, default=300_000)
    p.add_argument("--num-items", type=int, default=500_000)
    p.add_argument("--num-events", type=int, default=10_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("duckdb", "pandas", "both"), default="both")
    p.add_argument("--memory-limit", help="passed to --engine duckdb (default: its own)")
    p.add_argument("--cache", type=Path, default=ROOT / "cache" / "bench-prepare")
    p.add_argument("--work", type=Path, help="where outputs go (default: a temp dir)")
    args = p.parse_args()

    name = f"u{args.num_users}-i{args.num_items}-e{args.num_events}-s{args.seed}"
    log = args.cache / name
    if not (log / "items.parquet").is_file():
        print(f"writing the synthetic log to {log} (once)")
        write_log(log, args.num_users, args.num_items, args.num_events, args.seed)
    size = sum(f.stat().st_size for f in log.rglob("*.parquet"))
    engines = ("pandas", "duckdb") if args.engine == "both" else (args.engine,)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for engine in engines:
            results[engine] = run_engine(engine, log, Path(tmp) / engine, args.memory_limit)
        if len(engines) == 2:
            same = all(
                (Path(tmp) / "pandas" / f).read_bytes() == (Path(tmp) / "duckdb" / f).read_bytes()
                for f in ("events.parquet", "items.parquet", "manifest.json")
            )

    c = next(iter(results.values()))["counts"]
    shards = len(list((log / "events").iterdir()))
    print(f"input              {args.num_events:,} events in {shards} "
          f"Parquet shards ({size / 2**20:.0f} MiB), {args.num_items:,} items")  # fmt: skip
    print(f"kept               {c['num_events']:,} events, {c['num_users']:,} users, "
          f"{c['num_items']:,} items")  # fmt: skip
    for engine, r in results.items():
        print(f"{engine:<7} wall      {r['wall']:.1f} s    peak RSS {r['rss'] / 2**30:.2f} GiB")
    if len(engines) == 2:
        print(f"identical outputs  {'yes' if same else 'NO'}")
    print(f"cpus               {psutil.cpu_count()} (load avg {psutil.getloadavg()[0]:.1f}), "
          f"memory {psutil.virtual_memory().total / 2**30:.0f} GiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
