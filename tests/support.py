"""Test fixtures built in-process: a tiny prepared data set with learnable structure and a tiny
random DistilBERT saved like a Hugging Face model directory."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

WORDS = ["red", "blue", "green", "mug", "lamp", "candle", "heart", "garden", "metal", "glass",
         "wooden", "box", "bag", "star", "paper", "light"]


def write_processed(out: Path, num_users: int = 60, num_items: int = 24, seq_len: int = 8,
                    event_types: tuple[str, ...] = ("purchase",), ratings: bool = False,
                    seed: int = 0, shards: int = 1) -> Path:
    """A prepared data set (items/events/manifest) where each user walks the catalog in a
    fixed cycle (next = current + 1 mod N), so next-item prediction is learnable. shards > 1:
    the events as events/part-NNNNN.parquet, users split as prepare_data.py --shards does."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for u in range(num_users):
        start = int(rng.integers(num_items))
        length = int(rng.integers(4, seq_len + 1))
        for t in range(length):
            split = "test" if t == length - 1 else "valid" if t == length - 2 else "train"
            kind = event_types[int(rng.integers(len(event_types)))]
            rows.append((f"u{u:03d}", (start + t) % num_items + 1, 1_000_000 + 60 * t, kind,
                         float(rng.integers(1, 6)) if ratings else 1.0, split))
    events = pd.DataFrame(rows, columns=["user_id", "item_idx", "timestamp", "event_type",
                                         "value", "split"])
    events = events.astype({"item_idx": "int32", "timestamp": "int64", "value": "float32"})
    counts = np.bincount(events.loc[events.split == "train", "item_idx"],
                         minlength=num_items + 1)[1:]
    items = pd.DataFrame({
        "item_id": [f"SKU{i:04d}" for i in range(1, num_items + 1)],
        "item_idx": np.arange(1, num_items + 1, dtype=np.int32),
        "text": [f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]} item {i}"
                 for i in range(1, num_items + 1)],
        "category": [f"cat{i % 4}" for i in range(1, num_items + 1)],
        "brand": [f"brand{i % 3}" if i % 5 else "" for i in range(1, num_items + 1)],
        "price": [float(1 + i % 7) for i in range(1, num_items + 1)],
        "count": counts.astype(np.int64)})
    items.to_parquet(out / "items.parquet", index=False)
    manifest = {"schema_version": 1, "source": "test-fixture",
                "num_users": num_users, "num_items": num_items, "num_events": len(events)}
    if shards == 1:
        events.to_parquet(out / "events.parquet", index=False)
    else:
        from recdata.io import file_sha256, shard_bounds, shard_name

        users = events["user_id"].unique()
        bounds = shard_bounds(len(users), shards)
        (out / "events").mkdir(exist_ok=True)
        manifest["shards"] = []
        for k in range(shards):
            part = events[events["user_id"].isin(users[bounds[k]:bounds[k + 1]])]
            part.to_parquet(out / shard_name(k), index=False)
            manifest["shards"].append({"file": shard_name(k), "rows": len(part),
                                       "sha256": file_sha256(out / shard_name(k))})
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def write_tiny_distilbert(out: Path) -> Path:
    """A random 2-layer, 32-wide DistilBERT + WordPiece tokenizer, saved with save_pretrained."""
    from transformers import DistilBertConfig, DistilBertTokenizerFast, TFDistilBertModel

    import tfenv  # noqa: F401

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "item"] + WORDS + [
        str(i) for i in range(100)]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    DistilBertTokenizerFast(vocab_file=str(out / "vocab.txt")).save_pretrained(out)
    config = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=2,
                              hidden_dim=64, max_position_embeddings=64)
    model = TFDistilBertModel(config)
    model(model.dummy_inputs)
    model.save_pretrained(out)
    return out


def train_tiny(workdir: Path, user_tower: str = "sasrec", epochs: int = 2,
               text_model: str | None = "tiny", export: bool = True, **overrides):
    """Prepare a fixture data set, train a tiny model for a few epochs and (by default) export
    it. Returns (run_dir, export_dir, metrics)."""
    from export.build import export_run
    from training.config import TrainConfig
    from training.trainer import train

    data = write_processed(workdir / "data", event_types=("view", "purchase"))
    if text_model == "tiny":
        text_model = str(write_tiny_distilbert(workdir / "tinybert"))
    config = TrainConfig(user_tower=user_tower, epochs=epochs, dim=16, max_seq_len=8,
                         text_model=text_model or "none", cache_dir=str(workdir / "cache"),
                         export_k=20, **overrides)
    run_dir, export_dir = workdir / "run", workdir / "export"
    metrics = train(config, data, run_dir, export_dir=export_dir if export else None)
    if export:
        export_run(run_dir, export_dir)
    return run_dir, export_dir, metrics


def op_types(saved_model_dir: Path) -> set[str]:
    """Every op a SavedModel's graph uses, its functions' included."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    graph = proto.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops |= {node.op for node in function.node_def}
    return ops


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def uvicorn_server(model_dir: Path, log_path: Path, ready: str = "/ready", **env: str):
    """`uvicorn main:app` on 127.0.0.1 serving model_dir, once `ready` answers 200: yields
    (url, process); stops it (SIGTERM, then kill) on the way out."""
    import httpx

    port = free_port()
    env = {**os.environ, "MODEL_DIR": str(model_dir), "INDEX": "scann", **env}
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port",
         str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "server not ready after 180 s"
            try:
                if httpx.get(url + ready, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL server binaries (initdb, pg_ctl), newest version, or None."""
    import glob
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                  key=lambda p: int(Path(p).parent.parent.name))
    return Path(dirs[-1]).parent if dirs else None


@contextlib.contextmanager
def postgres_server():
    """A throwaway PostgreSQL on 127.0.0.1 in a temporary directory (as the `postgres` user
    when the tests run as root: the server refuses root); yields its URL, stops and removes
    it on the way out."""
    import shutil
    import tempfile

    bin_dir = postgres_bin()
    assert bin_dir is not None
    home = Path(tempfile.mkdtemp(prefix="towerrec-pg-", dir="/tmp"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(home, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data, log = home / "data", home / "server.log"

    def run(*args: str) -> None:
        result = subprocess.run(prefix + list(args), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "towerrec",
            "--no-sync", "-E", "UTF8")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
            f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        yield f"postgresql://towerrec@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(prefix + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                     "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)
