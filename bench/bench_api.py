"""HTTP load test of `GET /recommendations/{user_id}` against a real `uvicorn main:app`.

Starts the server on 127.0.0.1 for MODEL_DIR with each INDEX (scann, bruteforce), drives it with
wrk (a Lua script rotates over the stored user ids) at 1, 8 and 64 connections for a fixed time,
and prints p50/p95/p99 latency and requests/s. Without wrk it falls back to an asyncio + httpx
load generator (which itself needs CPU, so it under-reports on a small machine).

    .venv/bin/python bench/bench_api.py --model-dir saved_model/sample
    .venv/bin/python bench/bench_api.py --model-dir saved_model/sample --index bruteforce \
        --connections 8 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LUA = """
local users = {%(users)s}
local i = 0
local k = "%(k)d"
local extra = "%(extra)s"

setup = function(thread)
  thread:set("offset", math.random(#users))
end

request = function()
  i = i + 1
  local user = users[((offset or 0) + i) %% #users + 1]
  return wrk.format("GET", "/recommendations/" .. user .. "?k=" .. k .. extra)
end

done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
                 + summary.errors.status + summary.errors.timeout
  io.write(string.format('RESULT {"requests": %%d, "seconds": %%f, "errors": %%d, '
    .. '"p50_ms": %%f, "p95_ms": %%f, "p99_ms": %%f, "max_ms": %%f}\\n',
    summary.requests, summary.duration / 1e6, errors, latency:percentile(50) / 1e3,
    latency:percentile(95) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def user_ids(model_dir: Path, limit: int) -> list[str]:
    import pyarrow.parquet as pq

    versions = sorted((int(p.name), p) for p in model_dir.iterdir() if p.name.isdigit())
    if not versions:
        raise SystemExit(f"{model_dir}: no VERSION directory")
    table = pq.read_table(versions[-1][1] / "user_histories.parquet", columns=["user_id"])
    return [str(u) for u in table.column("user_id").to_pylist()[:limit]]


def start_server(model_dir: Path, index: str, port: int, log_path: Path,
                 **env: str) -> subprocess.Popen:
    env = {**os.environ, "MODEL_DIR": str(model_dir), "INDEX": index, **env}
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port),
         "--no-access-log", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited ({process.returncode}):\n"
                             + log_path.read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise SystemExit(f"server not ready after 600 s; log: {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_wrk(url: str, script: Path, connections: int, seconds: float) -> dict:
    threads = 1 if connections < 8 else 2
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections),
                          "-d", f"{seconds:g}s", "--timeout", "10s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["rps"] = result["requests"] / result["seconds"]
    return result


async def _httpx_load(url: str, users: list[str], k: int, connections: int,
                      seconds: float) -> dict:
    import httpx
    import numpy as np

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    response = await client.get(f"/recommendations/{users[i % len(users)]}",
                                                params={"k": k})
                    errors += response.status_code != 200
                except httpx.HTTPError:
                    errors += 1
                latencies.append(time.perf_counter() - t0)
                i += 1

        await asyncio.gather(*(worker(c * 997) for c in range(connections)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1e3
    return {"requests": len(ms), "seconds": elapsed, "errors": errors, "rps": len(ms) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "saved_model" / "sample")
    parser.add_argument("--index", nargs="+", default=["scann", "bruteforce"],
                        choices=["scann", "bruteforce"])
    parser.add_argument("--connections", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds, not reported")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--users", type=int, default=20000, help="user ids to rotate over")
    parser.add_argument("--tool", choices=["auto", "wrk", "httpx"], default="auto")
    args = parser.parse_args()

    model_dir = args.model_dir.resolve()
    users = user_ids(model_dir, args.users)
    tool = args.tool
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "httpx"
    if tool == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk not found (Debian: apt-get install wrk); or use --tool httpx")
    print(f"model dir {model_dir}, {len(users)} users rotated, k={args.k}, load generator "
          f"{tool}, {os.cpu_count()} CPUs (shared with the load generator)", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "users.lua"
        script.write_text(LUA % {"users": ",".join(json.dumps(u) for u in users), "k": args.k,
                                 "extra": ""})
        for index in args.index:
            port = free_port()
            started = time.time()
            server = start_server(model_dir, index, port, Path(tmp) / f"server-{index}.log")
            url = f"http://127.0.0.1:{port}"
            import httpx

            version = httpx.get(f"{url}/ready").json()["model_version"]
            print(f"{index}: version {version} ready in {time.time() - started:.1f}s",
                  flush=True)
            try:
                for connections in args.connections:
                    if tool == "wrk":
                        run_wrk(url, script, connections, args.warmup)
                        result = run_wrk(url, script, connections, args.duration)
                    else:
                        asyncio.run(_httpx_load(url, users, args.k, connections, args.warmup))
                        result = asyncio.run(_httpx_load(url, users, args.k, connections,
                                                         args.duration))
                    rows.append((index, connections, result))
                    print(f"  {connections:>3} connections: {result['rps']:8.1f} req/s  "
                          f"p50 {result['p50_ms']:.1f} ms  p99 {result['p99_ms']:.1f} ms",
                          flush=True)
            finally:
                stop_server(server)

    print(f"\nGET /recommendations/{{user_id}}?k={args.k}, {args.duration:g} s per row, "
          f"{tool}, 127.0.0.1")
    print("| index | connections | requests/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for index, connections, r in rows:
        print(f"| {index} | {connections} | {r['rps']:.0f} | {r['p50_ms']:.1f} | "
              f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")


if __name__ == "__main__":
    main()
