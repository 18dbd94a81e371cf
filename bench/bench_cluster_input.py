"""Positions/s of loopback clusters reading sharded data against one process on the same data.

    python bench/bench_cluster_input.py                    # 20K users, 4 shards, 4 epochs

Prepares a synthetic data set once (cache/bench-cluster-input/, `--shards 4`), then trains it
three times with the same flags: one `train.py` process; a parameter-server chief + 2 workers
+ 2 ps on 127.0.0.1 (workers reading their own window files); two multiworker workers (each
training on the windows of its own two shards). Prints the median positions/s of the epochs
after the first (the first holds tracing and, on a cluster, connecting) from each run's
history.csv.
Every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--dim", "32", "--max-seq-len", "20", "--text-model", "none", "--negatives", "sampled",
         "--num-negatives", "64", "--batch-size", "256", "--patience", "100",
         "--valid-users", "500", "--export-k", "10"]  # fmt: skip


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start(args: list[str], tf_config: dict | None, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    if tf_config:
        env["TF_CONFIG"] = json.dumps(tf_config)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in processes:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def speed(work: Path, name: str) -> tuple[float, int]:
    run = next((work / "runs").glob(f"{name}-*"))
    history = pd.read_csv(run / "history.csv")
    later = history["positions_per_second"].iloc[1:]
    return float(later.median()), len(history)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-users", type=int, default=20_000)
    p.add_argument("--num-items", type=int, default=5_000)
    p.add_argument("--num-events", type=int, default=400_000)
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()
    data = ROOT / "cache" / "bench-cluster-input" / f"u{args.num_users}-e{args.num_events}"
    if not (data / "manifest.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--source", "synthetic",
                        "--num-users", str(args.num_users), "--num-items", str(args.num_items),
                        "--num-events", str(args.num_events), "--shards", "4", "--out",
                        str(data)], check=True)  # fmt: skip
    flags = ["--data", str(data), "--epochs", str(args.epochs), *FLAGS]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chdir(work)
        started = time.perf_counter()
        one = start([*flags, "--out", str(work / "models" / "one")], None, work / "one.log")
        if one.wait(timeout=3600) != 0:
            raise SystemExit((work / "one.log").read_text()[-3000:])
        one_wall = time.perf_counter() - started

        ports = free_ports(5)
        cluster = {"chief": [f"127.0.0.1:{ports[0]}"],
                   "worker": [f"127.0.0.1:{q}" for q in ports[1:3]],
                   "ps": [f"127.0.0.1:{q}" for q in ports[3:5]]}
        cargs = [*flags, "--out", str(work / "models" / "cluster"), "--distribute",
                 "parameter_server"]
        processes = []
        try:
            for job, count in (("ps", 2), ("worker", 2)):
                for i in range(count):
                    processes.append(start(cargs, {"cluster": cluster, "task": {
                        "type": job, "index": i}}, work / f"{job}{i}.log"))
            started = time.perf_counter()
            chief = start(cargs, {"cluster": cluster, "task": {"type": "chief", "index": 0}},
                          work / "chief.log")
            processes.append(chief)
            if chief.wait(timeout=3600) != 0:
                raise SystemExit((work / "chief.log").read_text()[-3000:])
            cluster_wall = time.perf_counter() - started
        finally:
            stop(processes)
        ports = free_ports(2)
        mw_cluster = {"worker": [f"127.0.0.1:{q}" for q in ports]}
        margs = [*flags, "--out", str(work / "models" / "multiworker"), "--distribute",
                 "multiworker"]
        processes = []
        try:
            started = time.perf_counter()
            for i in range(2):
                processes.append(start(margs, {"cluster": mw_cluster, "task": {
                    "type": "worker", "index": i}}, work / f"multiworker{i}.log"))
            for i, process in enumerate(processes):
                if process.wait(timeout=3600) != 0:
                    raise SystemExit((work / f"multiworker{i}.log").read_text()[-3000:])
            mw_wall = time.perf_counter() - started
        finally:
            stop(processes)
        one_speed, epochs = speed(work, "one")
        cluster_speed, _ = speed(work, "cluster")
        mw_speed, _ = speed(work, "multiworker")
    manifest = json.loads((data / "manifest.json").read_text())
    print(f"data               {manifest['counts']['num_events']:,} events, "
          f"{manifest['counts']['num_users']:,} users, {len(manifest['shards'])} shards")
    print(f"one process        {one_speed:,.0f} positions/s   ({epochs} epochs, "
          f"{one_wall:.0f} s wall)")
    print(f"chief+2w+2ps       {cluster_speed:,.0f} positions/s   ({cluster_wall:.0f} s wall "
          "for the chief)")
    print(f"2 multiworker      {mw_speed:,.0f} positions/s   ({mw_wall:.0f} s wall)")
    print(f"ps cluster / one   {cluster_speed / one_speed:.2f}x   on {os.cpu_count()} cores")
    print(f"multiworker / one  {mw_speed / one_speed:.2f}x   on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
