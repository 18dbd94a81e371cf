"""Several machines on TensorFlow's own engines: TF_CONFIG read and checked, the
parameter-server strategy with the item tables sharded across the ps tasks, the server that
worker and ps tasks run, and which task writes the run directory.

`--distribute multiworker`: every worker runs the same `train.py` (MultiWorkerMirroredStrategy,
synchronous all-reduce); `--distribute parameter_server`: the chief runs `train.py` and drives
training through Keras `fit` (ParameterServerStrategy, asynchronous), worker and ps tasks run
`train.py` too, which starts their `tf.distribute.Server` and blocks.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from training.config import TrainConfig

log = logging.getLogger(__name__)

CLUSTER_MODES = ("multiworker", "parameter_server")
EXAMPLE = ('TF_CONFIG=\'{"cluster": {"chief": ["host0:2222"], "worker": ["host1:2222"], '
           '"ps": ["host2:2222"]}, "task": {"type": "chief", "index": 0}}\'')


@dataclass(frozen=True)
class ClusterTask:
    """This process's place in the cluster; mode "single" without one."""

    mode: str = "single"  # single | multiworker | parameter_server
    task_type: str = ""  # chief | worker | ps
    task_index: int = 0
    cluster: dict[str, list[str]] = field(default_factory=dict)

    @property
    def is_chief(self) -> bool:
        """The task that writes the run directory, scores and exports: the chief, or worker 0
        of a cluster without one."""
        if self.mode == "single":
            return True
        if "chief" in self.cluster:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def serves(self) -> bool:
        """A parameter-server cluster's worker or ps task: it only runs a server."""
        return self.mode == "parameter_server" and self.task_type in ("worker", "ps")

    @property
    def num_ps(self) -> int:
        return len(self.cluster.get("ps", []))

    @property
    def training_workers(self) -> int:
        """How many tasks train in a multiworker cluster: the chief, if any, and the workers."""
        return len(self.cluster.get("chief", [])) + len(self.cluster.get("worker", []))

    @property
    def training_rank(self) -> int:
        """This task's place among them, in MultiWorkerMirroredStrategy's own order (the chief
        first): the events shards it trains on are rank, rank + workers, ..."""
        if "chief" in self.cluster:
            return 0 if self.task_type == "chief" else self.task_index + 1
        return self.task_index


def cluster_task(config: TrainConfig, environ: dict[str, str] | None = None) -> ClusterTask:
    """The cluster of `--distribute multiworker|parameter_server` from TF_CONFIG, checked; a
    ValueError says what is missing. Other modes run on one machine and ignore TF_CONFIG."""
    if config.distribute not in CLUSTER_MODES:
        return ClusterTask()
    flag = f"--distribute {config.distribute}"
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not raw:
        raise ValueError(f"{flag} needs TF_CONFIG (the cluster's addresses and this task), "
                         f"e.g. {EXAMPLE}")
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from None
    if not isinstance(tf_config, dict):
        raise ValueError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster, task = tf_config.get("cluster"), tf_config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError(f"TF_CONFIG has no 'cluster' (job name -> list of host:port), e.g. "
                         f"{EXAMPLE}")
    if not isinstance(task, dict) or "type" not in task:
        raise ValueError("TF_CONFIG has no 'task' ({\"type\": ..., \"index\": ...}): which "
                         "task of the cluster this process is")
    task_type, index = str(task["type"]), task.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool):
        raise ValueError(f"TF_CONFIG task index must be an integer, got {index!r}")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise ValueError(f"TF_CONFIG cluster job {job!r}: expected a list of host:port")
    jobs = {job: [str(a) for a in addresses] for job, addresses in cluster.items()}
    if config.distribute == "multiworker":
        allowed, required = ("chief", "worker"), ("worker",)
    else:
        allowed, required = ("chief", "worker", "ps"), ("chief", "worker", "ps")
    missing = [job for job in required if job not in jobs]
    if missing:
        raise ValueError(f"{flag}: TF_CONFIG cluster has no {' and no '.join(missing)} task "
                         f"(it has {', '.join(sorted(jobs))}; needs {', '.join(required)})")
    unknown = sorted(set(jobs) - set(allowed))
    if unknown:
        raise ValueError(f"{flag}: TF_CONFIG cluster job(s) {', '.join(unknown)} not supported "
                         f"(expected {', '.join(allowed)})")
    if len(jobs.get("chief", [])) > 1:
        raise ValueError(f"TF_CONFIG cluster has {len(jobs['chief'])} chiefs; one at most")
    if task_type not in jobs or not 0 <= index < len(jobs[task_type]):
        raise ValueError(f"TF_CONFIG task {task_type}:{index} is not in the cluster "
                         f"({', '.join(f'{j}: {len(a)}' for j, a in sorted(jobs.items()))})")
    result = ClusterTask(config.distribute, task_type, index, jobs)
    if config.distribute == "parameter_server" and config.ps_shards > result.num_ps:
        raise ValueError(f"--ps-shards {config.ps_shards}: TF_CONFIG has only "
                         f"{result.num_ps} ps task(s), at most one shard per ps")
    return result


_REDUCERS: dict[int, object] = {}  # one all-reduce function per strategy (no retracing)


def sum_over_workers(strategy, values: np.ndarray) -> np.ndarray:
    """`values` summed over the workers of a MultiWorkerMirroredStrategy cluster (one all-reduce;
    each worker's counted once, however many local devices it has). Every worker must call it,
    in the same order; a worker passing zeros receives what the others sent."""
    import tensorflow as tf

    if id(strategy) not in _REDUCERS:
        local = len(strategy.extended.worker_devices)

        def reduce(tensor):
            context = tf.distribute.get_replica_context()
            first = tf.equal(context.replica_id_in_sync_group % local, 0)
            return context.all_reduce(tf.distribute.ReduceOp.SUM,
                                      tf.where(first, tensor, tf.zeros_like(tensor)))

        _REDUCERS[id(strategy)] = tf.function(
            lambda tensor: strategy.run(reduce, args=(tensor,)), reduce_retracing=True)
    summed = _REDUCERS[id(strategy)](tf.constant(values))
    return strategy.experimental_local_results(summed)[0].numpy()


def from_chief(strategy, is_chief: bool, payload: dict | None = None,
               array: np.ndarray | None = None, rows: int = 0) -> tuple[dict, np.ndarray]:
    """The chief's JSON-able `payload` and float64 `array` on every worker of a multiworker
    cluster (the others pass neither, but the array's length, `rows`, which they must know)."""
    text = json.dumps(payload).encode() if is_chief else b""
    size = int(sum_over_workers(strategy, np.array([len(text)], np.int64))[0])
    raw = np.zeros(size, np.float64)  # bytes as float64: a collective every device runs
    if is_chief:
        raw[:] = np.frombuffer(text, np.uint8)
    shared = sum_over_workers(strategy, raw).astype(np.uint8).tobytes()
    values = array.astype(np.float64) if is_chief else np.zeros(rows, np.float64)
    return json.loads(shared.decode()), sum_over_workers(strategy, values)


def serve(task: ClusterTask) -> None:
    """Run this worker or ps task's server until the process is stopped (the chief does not
    stop it: stop the process when training is over)."""
    import tensorflow as tf

    # Steps and variable reads from several peers wait on each other: an in-process cluster
    # on a 2-core machine hung with the default pool (one thread per core); TensorFlow's own
    # test clusters raise it the same way.
    config = tf.compat.v1.ConfigProto(
        inter_op_parallelism_threads=max(os.cpu_count() or 1, len(task.cluster["worker"]) + 2))
    server = tf.distribute.Server(tf.train.ClusterSpec(task.cluster), job_name=task.task_type,
                                  task_index=task.task_index, protocol="grpc", config=config,
                                  start=True)
    log.info("%s %d serving at %s (stop the process to end it)", task.task_type,
             task.task_index, task.cluster[task.task_type][task.task_index])
    server.join()


def item_table_partitioner(catalog_rows: int, shards: int):
    """Splits the item tables (rank-2 variables with one row per item, num_items + 1) into
    `shards` contiguous row ranges ("div" sharding; the strategy places variables round-robin,
    so no two shards of a table share a ps). Every other variable stays whole, on one ps; so do
    the per-item scalars (seen flags, metadata codes, popularity: 4 bytes an item)."""
    import tensorflow as tf

    fixed = tf.distribute.experimental.partitioners.FixedShardsPartitioner(shards)

    def partition(shape, dtype, axis=0):
        if shards > 1 and shape.rank == 2 and shape[0] == catalog_rows:
            return fixed(shape, dtype, axis)
        return [1] * shape.rank

    return partition


def parameter_server_strategy(task: ClusterTask, ps_shards: int, catalog_rows: int):
    """ParameterServerStrategy over TF_CONFIG's cluster (it waits for the worker and ps tasks
    to serve), item tables in `ps_shards` shards (0 = one per ps)."""
    import tensorflow as tf

    # A worker that goes away fails its steps fast; the coordinator re-runs them elsewhere.
    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    shards = ps_shards or task.num_ps
    log.info("connecting to %d worker(s) and %d ps task(s) (waits until they serve); item "
             "tables in %d shard(s)", len(task.cluster["worker"]), task.num_ps, shards)
    return tf.distribute.ParameterServerStrategy(
        resolver, variable_partitioner=item_table_partitioner(catalog_rows, shards))


def sharded_tables(layer) -> dict[str, list[str]]:
    """Each sharded table of a layer -> the device of each of its shards, in row order."""
    import tensorflow as tf

    return {f"{layer.name}/{name}": [v.device for v in value.variables]
            for name, value in vars(layer).items()
            if isinstance(value, tf.__internal__.distribute.ShardedVariable)}
