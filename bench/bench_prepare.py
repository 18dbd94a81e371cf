"""Time `prepare_data.py --source synthetic` at scale and report wall time and peak memory.

    python bench/bench_prepare.py                      # 10M events, 500K items, 300K users
    python bench/bench_prepare.py --num-events 1000000 # smaller

Runs the real CLI as a subprocess; peak RSS is the child's maximum resident set size
(getrusage), cross-checked by sampling the child with psutil.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _sample_peak_rss(proc: psutil.Process, peak: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], proc.memory_info().rss)
        except psutil.Error:
            return
        stop.wait(0.05)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-users", type=int, default=300_000)
    p.add_argument("--num-items", type=int, default=500_000)
    p.add_argument("--num-events", type=int, default=10_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="keep the output here (default: a temp dir)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "synthetic"
        cmd = [
            sys.executable, str(ROOT / "prepare_data.py"), "--source", "synthetic",
            "--num-users", str(args.num_users), "--num-items", str(args.num_items),
            "--num-events", str(args.num_events), "--seed", str(args.seed), "--out", str(out),
        ]  # fmt: skip
        print("$", " ".join(cmd[1:]))
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
        if code != 0:
            print(f"prepare_data.py failed with exit code {code}", file=sys.stderr)
            return code
        counts = json.loads((out / "manifest.json").read_text())["counts"]
        sizes = {f: (out / f).stat().st_size for f in ("items.parquet", "events.parquet")}

    print(f"events generated   {args.num_events:,}")
    print(f"events kept        {counts['num_events']:,} ({counts['num_users']:,} users, "
          f"{counts['num_items']:,} items)")  # fmt: skip
    print(f"wall time          {wall:.1f} s")
    print(f"peak RSS           {max(max_rss, peak[0]) / 2**30:.2f} GiB")
    print(f"output             events.parquet {sizes['events.parquet'] / 2**20:.0f} MiB, "
          f"items.parquet {sizes['items.parquet'] / 2**20:.0f} MiB")  # fmt: skip
    print(
        f"cpus               {psutil.cpu_count()} (shared; load avg {psutil.getloadavg()[0]:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
