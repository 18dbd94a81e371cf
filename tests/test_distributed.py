"""Several processes on 127.0.0.1 as several machines: a parameter-server cluster (chief, 2
workers, 2 ps) trains with the item tables split across the ps tasks and exports; two
MultiWorkerMirroredStrategy workers train in step and only the chief writes the run directory;
in-batch candidates are gathered across replicas; bad TF_CONFIG exits with code 2. Every
process a test starts is stopped in `finally`."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from support import write_processed

from training.cluster import cluster_task
from training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "3", "--dim", "16", "--max-seq-len", "8", "--text-model", "none",
        "--negatives", "sampled", "--num-negatives", "8", "--batch-size", "16", "--lr", "0.01",
        "--patience", "10", "--export-k", "10"]
CLUSTER_TIMEOUT = 240  # seconds for a whole cluster run; 20-30 s on an idle 2-core machine


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _env(tf_config: dict | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TRANSFORMERS_VERBOSITY", "TF_CONFIG")}
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _start(args: list[str], tf_config: dict, cwd: Path, log: Path) -> subprocess.Popen:
    """train.py in its own process group (so that stopping it stops anything it started)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                                env=_env(tf_config), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _signal(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # already gone
        pass


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        _signal(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal(process, signal.SIGKILL)
            process.wait(timeout=10)


def _wait_listening(ports: list[int], processes: list[subprocess.Popen], logs: list[Path],
                    timeout: float = 120) -> None:
    """Until every port accepts connections; a server that died fails with its log. (The
    chief would wait for them itself, silently.)"""
    deadline = time.time() + timeout
    for port in ports:
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            for process, log in zip(processes, logs):
                assert process.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, f"nothing listening on port {port}"
            time.sleep(0.5)


def _wait(process: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit within {timeout}s:\n{log.read_text()[-3000:]}")
    output = log.read_text()
    assert process.returncode == 0, output[-3000:]
    return output


def ps_cluster(tmp_path: Path, args: list[str], tag: str, chief_args: list[str]):
    """ps x 2 and worker x 2 on 127.0.0.1 started and listening (logs TAG-ps0.log, ...), then
    the chief with `chief_args`: (servers, chief, chief log, chief TF_CONFIG). The caller
    stops them."""
    ports = _free_ports(5)
    cluster = {"chief": [f"127.0.0.1:{ports[0]}"],
               "worker": [f"127.0.0.1:{p}" for p in ports[1:3]],
               "ps": [f"127.0.0.1:{p}" for p in ports[3:5]]}
    processes, logs = [], []
    for job, count in (("ps", 2), ("worker", 2)):
        for index in range(count):
            logs.append(tmp_path / f"{tag}-{job}{index}.log")
            processes.append(_start(args, {"cluster": cluster, "task": {
                "type": job, "index": index}}, tmp_path, logs[-1]))
    _wait_listening(ports[1:], processes, logs)
    chief_config = {"cluster": cluster, "task": {"type": "chief", "index": 0}}
    chief_log = tmp_path / f"{tag}-chief.log"
    chief = _start(chief_args, chief_config, tmp_path, chief_log)
    return processes, chief, chief_log, chief_config


def _parameter_server_run(tmp_path: Path, data: Path) -> str:
    """Train TINY on `data` with a chief, 2 workers and 2 ps (logs run-chief.log,
    run-worker0.log, ...); the chief's output. Every process is stopped after."""
    args = ["--data", str(data), "--out", str(tmp_path / "models" / "tiny"),
            "--distribute", "parameter_server", *TINY]
    servers, chief = [], None
    try:
        servers, chief, chief_log, _ = ps_cluster(tmp_path, args, "run", args)
        output = _wait(chief, chief_log, CLUSTER_TIMEOUT)
        for process in servers:  # the servers are still serving
            assert process.poll() is None
    finally:
        _stop([*servers, *([chief] if chief else [])])
    return output


def test_parameter_server_cluster_shards_item_table_trains_and_exports(tmp_path):
    # 200 windows = 13 steps an epoch: asynchronous steps on independently shuffled workers
    # make a 4-step epoch's mean loss too noisy to compare
    data = write_processed(tmp_path / "data", num_users=200)
    started = time.time()
    output = _parameter_server_run(tmp_path, data)
    wall = time.time() - started
    run_dir = next((tmp_path / "runs").glob("tiny-*"))
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["strategy"].startswith("ParameterServerStrategy")
    assert metadata["cluster"] == {"chief": 1, "worker": 2, "ps": 2}
    shards = metadata["item_table_shards"]["item_tower/id_embedding"]
    assert sorted(device.split("/device")[0] for device in shards) == [
        "/job:ps/replica:0/task:0", "/job:ps/replica:0/task:1"]
    assert "item_tower/id_embedding: 2 shards" in output
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 3 and history["loss"].iloc[-1] < history["loss"].iloc[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["optimizer"] == "lazy_adam" and np.isfinite(metrics["test"]["ndcg@10"])
    # The exported exact model answers a request, in a process that never saw the cluster.
    probe = ("import sys, tensorflow as tf; m = tf.saved_model.load(sys.argv[1]); "
             "out = m.signatures['serving_default'](history=tf.constant([['SKU0003', "
             "'SKU0004']])); print(out['item_ids'].shape[1], "
             "bool(tf.reduce_all(tf.math.is_finite(out['scores']))))")
    model_dir = tmp_path / "models" / "tiny" / "1" / "retrieval_bruteforce"
    answer = subprocess.run([sys.executable, "-c", probe, str(model_dir)], env=_env(None),
                            capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert answer.stdout.split() == ["10", "True"]
    print(f"\nparameter_server cluster (chief + 2 workers + 2 ps): {wall:.1f}s wall, "
          f"{len(history)} epochs, {metadata['wall_seconds']}s in the chief's train()")


def _multiworker_run(tmp_path: Path, data: Path, jobs: tuple[str, ...],
                     succeed: bool = True) -> list[str]:
    """Train TINY for 2 epochs on `data` with one MultiWorkerMirroredStrategy task per entry of
    `jobs` ("chief" or "worker"), each in its own directory (tmp/TYPEINDEX); their outputs,
    each checked to exit 0 (`succeed`) or with code 2. Every process is stopped after."""
    ports = _free_ports(len(jobs))
    cluster: dict[str, list[str]] = {}
    for job, port in zip(jobs, ports):
        cluster.setdefault(job, []).append(f"127.0.0.1:{port}")
    args = ["--data", str(data), "--out", str(tmp_path / "models" / "tiny"),
            "--distribute", "multiworker", *TINY, "--epochs", "2"]
    processes, logs = [], []
    try:
        for job in jobs:
            index = sum(j == job for j in jobs[:len(processes)])
            workdir = tmp_path / f"{job}{index}"
            workdir.mkdir()
            logs.append(tmp_path / f"{job}{index}.log")
            processes.append(_start(args, {"cluster": cluster, "task": {
                "type": job, "index": index}}, workdir, logs[-1]))
        if succeed:
            return [_wait(process, log, CLUSTER_TIMEOUT) for process, log in zip(processes, logs)]
        for process, log in zip(processes, logs):
            process.wait(timeout=CLUSTER_TIMEOUT)
            assert process.returncode == 2, log.read_text()[-3000:]
        return [log.read_text() for log in logs]
    finally:
        _stop(processes)


def test_multiworker_two_workers_only_the_chief_writes_the_run(tmp_path):
    started = time.time()
    outputs = _multiworker_run(tmp_path, write_processed(tmp_path / "data"), ("worker", "worker"))
    wall = time.time() - started
    runs = list((tmp_path / "worker0" / "runs").glob("tiny-*"))
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists()
    assert not (tmp_path / "worker1" / "runs").exists()
    assert (tmp_path / "models" / "tiny" / "1" / "retrieval_bruteforce").is_dir()  # chief's
    assert "worker 1 done" in outputs[1] and "run directory:" in outputs[0]
    metadata = json.loads((runs[0] / "metadata.json").read_text())
    # MultiWorkerMirroredStrategy's class is CollectiveAllReduceStrategy
    assert metadata["strategy"] == "CollectiveAllReduceStrategy" and metadata["replicas"] == 2
    assert len(pd.read_csv(runs[0] / "history.csv")) == 2
    print(f"\nmultiworker (2 workers): {wall:.1f}s wall, {metadata['wall_seconds']}s in the "
          "chief's train()")


def test_multiworker_tasks_train_on_their_own_shards_and_follow_the_chief(tmp_path):
    data = write_processed(tmp_path / "data", num_users=200, shards=4)
    chief, worker = _multiworker_run(tmp_path, data, ("chief", "worker"))
    pattern = r"training input: ([\d,]+) of ([\d,]+) windows \(worker (\d) of 2: (.*)\)"
    seen = {}
    for output in (chief, worker):
        count, total, rank, shards = re.search(pattern, output).groups()
        seen[int(rank)] = (int(count.replace(",", "")), int(total.replace(",", "")), shards)
    # the chief is rank 0 with shards 0 and 2; the worker reads 1 and 3, and only them
    assert seen[0][2] == "events/part-00000.parquet, events/part-00002.parquet"
    assert seen[1][2] == "events/part-00001.parquet, events/part-00003.parquet"
    assert seen[0][0] + seen[1][0] == seen[0][1] == seen[1][1]  # together: every window
    assert "validation: on the chief" in worker and "validation: on the chief" not in chief
    # the worker logs the chief's validation results, epoch by epoch
    ndcg = [re.findall(r"valid NDCG@10 (\S+)", output) for output in (chief, worker)]
    assert len(ndcg[0]) == 2 and ndcg[0] == ndcg[1]
    assert "worker 0 done" in worker and "run directory:" in chief
    runs = list((tmp_path / "chief0" / "runs").glob("tiny-*"))
    assert len(runs) == 1 and len(pd.read_csv(runs[0] / "history.csv")) == 2
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["ndcg@10"])
    model_dir = tmp_path / "models" / "tiny" / "1" / "retrieval_bruteforce"
    assert (model_dir / "saved_model.pb").is_file()


def test_multiworker_a_task_that_cannot_load_its_data_stops_every_task(tmp_path):
    # Shard 0 is read by the chief only (it loads all; the worker reads 1 and 3): without a
    # shared verdict the worker would wait for the chief in an all-reduce.
    data = write_processed(tmp_path / "data", num_users=100, shards=4)
    with open(data / "events" / "part-00000.parquet", "ab") as shard:
        shard.write(b"changed")
    started = time.time()
    chief, worker = _multiworker_run(tmp_path, data, ("chief", "worker"), succeed=False)
    assert "error: " in chief and "part-00000.parquet: not a readable Parquet" in chief
    assert "error: 1 other task(s) of the cluster could not load its data" in worker
    assert "Traceback" not in chief + worker
    assert not (tmp_path / "chief0" / "runs").exists() or not list(
        (tmp_path / "chief0" / "runs").glob("*/metrics.json"))
    print(f"\nmultiworker: both tasks refused in {time.time() - started:.1f}s")


CANDIDATES = r"""
import sys
sys.path.insert(0, {root!r})
import tfenv
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from towers.tasks import NextItemRetrieval

task = NextItemRetrieval(num_items=50, mode="sampled", num_negatives=0)
task.build(None)
targets = tf.constant([[1, 2, 2, 3], [3, 4, 5, 6]])  # replica 0, replica 1

def pool_size(ids):
    pool, index, draws = task.candidate_pool(ids)
    # the label column of each target holds that target
    assert_ok = tf.reduce_all(tf.gather(pool, index) == ids)
    return tf.shape(pool)[0] - task.num_negatives, draws, assert_ok

for devices in (["/cpu:0"], ["/cpu:0", "/cpu:1"]):
    strategy = tf.distribute.MirroredStrategy(devices)
    rows = targets[:len(devices)]
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(rows).batch(len(devices)))
    batch = next(iter(data))
    sizes, draws, ok = strategy.run(tf.function(lambda b: pool_size(tf.reshape(b, [-1]))),
                                    args=(batch,))
    local = lambda v: [int(x) for x in strategy.experimental_local_results(v)]
    print("REPLICAS", len(devices), local(sizes), local(draws),
          all(bool(x) for x in strategy.experimental_local_results(ok)))
"""


def test_candidate_pool_grows_with_the_replica_count():
    result = subprocess.run([sys.executable, "-c", CANDIDATES.format(root=str(ROOT))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split(" ", 2)[1:] for line in result.stdout.splitlines()
             if line.startswith("REPLICAS")]
    # One replica: its 3 distinct targets from 4 draws. Two: each replica's pool holds the 6
    # distinct targets of both (8 draws), its own labels still pointing at its own targets.
    assert lines == [["1", "[3] [4] True"], ["2", "[6, 6] [8, 8] True"]]


LAZY_ADAM_ON_SHARDS = r"""
import sys
sys.path.insert(0, {root!r})
import tfenv
import numpy as np
import tensorflow as tf
from towers.item_tower import ItemTower
from training.cluster import item_table_partitioner
from training.optimizers import LazyAdam

cluster = tf.train.ClusterSpec({{"worker": ["127.0.0.1:{ports[0]}"],
                                "ps": ["127.0.0.1:{ports[1]}", "127.0.0.1:{ports[2]}"]}})
threads = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=4)  # in-process: no starving
servers = [tf.distribute.Server(cluster, job_name=job, task_index=i, config=threads)
           for job, i in (("worker", 0), ("ps", 0), ("ps", 1))]
strategy = tf.distribute.ParameterServerStrategy(
    tf.distribute.cluster_resolver.SimpleClusterResolver(cluster, rpc_layer="grpc"),
    variable_partitioner=item_table_partitioner(25, 2))
coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
with strategy.scope():
    tower = ItemTower(num_items=24, dim=4, num_categories=3)
    tower.build(None)
    optimizer = LazyAdam(0.1)
    optimizer.build(tower.trainable_variables)
tower.set_item_features(np.ones(25, np.float32), meta={{"category": np.arange(25) % 4}})
before = tf.convert_to_tensor(tower.id_embedding).numpy()
ids = tf.constant([20, 1, 14, 2])

@tf.function
def step():
    def replica_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((tower(ids) - 1.0) ** 2)
        grads = tape.gradient(loss, tower.trainable_variables)
        optimizer.apply_gradients(zip(grads, tower.trainable_variables))
    strategy.run(replica_step)

for _ in range(3):
    coordinator.schedule(step)
coordinator.join()
after = tf.convert_to_tensor(tower.id_embedding).numpy()
print("SHARDS", *sorted(v.device.split("/device")[0] for v in tower.id_embedding.variables))
print("CHANGED", np.flatnonzero(np.abs(after - before).sum(axis=1) > 0).tolist())
"""


def test_lazy_adam_on_sharded_item_table_touches_only_the_batch_rows():
    """An in-process cluster (1 worker, 2 ps) in a subprocess: the id table is split across the
    ps tasks and LazyAdam's scatter updates work per shard, on the looked-up rows only."""
    script = LAZY_ADAM_ON_SHARDS.format(root=str(ROOT), ports=_free_ports(3))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=_env(None))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines["SHARDS"] == "/job:ps/replica:0/task:0 /job:ps/replica:0/task:1"
    assert lines["CHANGED"] == "[1, 2, 14, 20]"  # rows of both shards, no other


def test_sharded_table_rows_come_back_in_order():
    """Why the item tower reads tables with tf.nn.embedding_lookup: TensorFlow 2.20's tf.gather
    on a ShardedVariable returns the rows grouped by shard."""
    from towers.item_tower import rows

    table = np.arange(25, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    sharded = tf.__internal__.distribute.ShardedVariable(
        [tf.Variable(table[:13]), tf.Variable(table[13:])])
    ids = tf.constant([20, 1, 14, 2])
    assert rows(sharded, ids).numpy()[:, 0].tolist() == [20, 1, 14, 2]
    in_graph = tf.function(lambda ids: rows(sharded, ids))  # a layer's table: captured
    assert in_graph(ids).numpy()[:, 0].tolist() == [20, 1, 14, 2]
    assert tf.gather(sharded, ids).numpy()[:, 0].tolist() == [1, 2, 20, 14]  # if this fails,
    # TensorFlow fixed it: rows() may go back to tf.gather


def test_sharded_checkpoint_restores_into_an_unsharded_table(tmp_path):
    from towers.item_tower import ItemTower

    values = np.random.default_rng(0).normal(size=(25, 4)).astype(np.float32)
    parts = [tf.Variable(values[:13]), tf.Variable(values[13:])]
    sharded = tf.__internal__.distribute.ShardedVariable(parts)
    path = tf.train.Checkpoint(id_embedding=sharded).save(str(tmp_path / "ckpt"))
    tower = ItemTower(num_items=24, dim=4)
    tower.build(None)
    tf.train.Checkpoint(id_embedding=tower.id_embedding).restore(path).assert_consumed()
    assert np.array_equal(tower.id_embedding.numpy(), values)


def _train_exit(args: list[str], tf_config: dict | None, cwd: Path):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          env=_env(tf_config), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("distribute, tf_config, message", [
    ("parameter_server", None, "--distribute parameter_server needs TF_CONFIG"),
    ("multiworker", None, "--distribute multiworker needs TF_CONFIG"),
    ("parameter_server", {"cluster": {"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]},
                          "task": {"type": "worker", "index": 0}}, "has no chief task"),
    ("parameter_server", {"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]},
                          "task": {"type": "chief", "index": 0}}, "has no ps task"),
])
def test_bad_cluster_exits_with_code_2(tmp_path, distribute, tf_config, message):
    data = write_processed(tmp_path / "data")
    result = _train_exit(["--data", str(data), "--out", str(tmp_path / "o"),
                          "--distribute", distribute, "--text-model", "none"], tf_config,
                         tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("tf_config, message", [
    ("{not json", "not valid JSON"),
    ('{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 3}}',
     "worker:3 is not in the cluster"),
    ('{"cluster": {"worker": ["h:1"], "ps": ["h:2"]}, "task": {"type": "worker"}}',
     "ps not supported"),
    ('{"task": {"type": "worker", "index": 0}}', "has no 'cluster'"),
])
def test_tf_config_checks(tf_config, message):
    with pytest.raises(ValueError, match=message):
        cluster_task(TrainConfig(distribute="multiworker"), {"TF_CONFIG": tf_config})


def test_more_shards_than_ps_is_an_error():
    tf_config = json.dumps({"cluster": {"chief": ["h:0"], "worker": ["h:1"],
                                        "ps": ["h:2", "h:3"]},
                            "task": {"type": "chief", "index": 0}})
    config = TrainConfig(distribute="parameter_server", ps_shards=3)
    with pytest.raises(ValueError, match="--ps-shards 3: TF_CONFIG has only 2 ps"):
        cluster_task(config, {"TF_CONFIG": tf_config})
    task = cluster_task(TrainConfig(distribute="parameter_server"), {"TF_CONFIG": tf_config})
    assert task.is_chief and not task.serves and task.num_ps == 2


def test_parameter_server_refuses_a_fine_tuned_encoder():
    with pytest.raises(ValueError, match="needs text_mode=frozen"):
        TrainConfig(distribute="parameter_server", text_mode="finetune",
                    negatives="sampled").validate()


# --- Sharded input: workers read their own files ----------------------------------------------

SMALL_GRAPH = "20000"  # bytes: a graph-constant cap the test data's windows exceed


def test_windows_over_the_graph_limit_are_refused_without_shards(tmp_path, monkeypatch):
    monkeypatch.setenv("TOWERREC_GRAPH_CONSTANT_LIMIT", SMALL_GRAPH)
    data = write_processed(tmp_path / "data", num_users=400)
    ports = _free_ports(3)  # nothing listens: the chief refuses before connecting
    cluster = {"chief": [f"127.0.0.1:{ports[0]}"], "worker": [f"127.0.0.1:{ports[1]}"],
               "ps": [f"127.0.0.1:{ports[2]}"]}
    result = _train_exit(["--data", str(data), "--out", str(tmp_path / "o"),
                          "--distribute", "parameter_server", *TINY],
                         {"cluster": cluster, "task": {"type": "chief", "index": 0}}, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "do not fit in the dataset function's graph" in result.stderr
    assert "--shards N" in result.stderr and "Traceback" not in result.stderr


def test_parameter_server_workers_read_their_own_shards(tmp_path, monkeypatch):
    # The graph cap lowered below these windows: the unsharded path would refuse (test above);
    # the sharded one never puts windows in a graph.
    monkeypatch.setenv("TOWERREC_GRAPH_CONSTANT_LIMIT", SMALL_GRAPH)
    data = write_processed(tmp_path / "data", num_users=400, shards=4)
    output = _parameter_server_run(tmp_path, data)
    assert "training input: 4 window files" in output
    assert not (next((tmp_path / "runs").glob("tiny-*")) / "input").exists()  # removed after
    # Each worker built its dataset from its own files only: 0 and 2, or 1 and 3.
    for index, own in ((0, ("part-00000", "part-00002")), (1, ("part-00001", "part-00003"))):
        reads = [line for line in (tmp_path / f"run-worker{index}.log").read_text().splitlines()
                 if "towerrec input: worker" in line]
        assert reads, f"worker {index} built no dataset"
        for line in reads:
            named = sorted(re.findall(r"part-\d{5}", line))
            assert named == list(own), line
    run_dir = next((tmp_path / "runs").glob("tiny-*"))
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 3 and np.isfinite(history["loss"]).all()
    model_dir = tmp_path / "models" / "tiny" / "1" / "retrieval_bruteforce"
    assert (model_dir / "saved_model.pb").is_file()
