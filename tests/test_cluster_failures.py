"""Clusters that lose a process (loopback, every process started, killed and stopped here):
a parameter-server worker (its steps run on the other worker), the chief (restarted with
--resume), a ps (the chief stops with a message; a new cluster resumes), a multiworker worker
(the other stops with a message; both resume)."""

import json
import signal
import subprocess
import time

import pandas as pd
import pytest
from support import write_processed
from test_distributed import (
    CLUSTER_TIMEOUT,
    TINY,
    _free_ports,
    _signal,
    _start,
    _stop,
    _wait,
    ps_cluster,
)

EPOCHS = 8


def _args(data, tmp_path, distribute: str, epochs: int = EPOCHS) -> list[str]:
    tiny = list(TINY)
    tiny[tiny.index("--epochs") + 1] = str(epochs)
    return ["--data", str(data), "--out", str(tmp_path / "models" / "tiny"),
            "--distribute", distribute, *tiny]


def _epochs_saved(workdir) -> int:
    """The epoch of the newest resume state of the run under workdir/runs (0: none yet)."""
    for state in (workdir / "runs").glob("tiny-*/resume/state.json"):
        try:
            return json.loads(state.read_text())["epoch"]
        except (OSError, ValueError):  # replaced while read
            return 0
    return 0


def _until_saved(workdir, epochs: int, chief, log) -> None:
    """Until the chief has written the resume state of `epochs` epochs (training under way)."""
    deadline = time.time() + CLUSTER_TIMEOUT
    while _epochs_saved(workdir) < epochs:
        assert chief.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _stops_with_message(chief, log, again: str) -> float:
    """The chief exits 1 with the one-line message (not a hang): seconds it took."""
    started = time.time()
    try:
        chief.wait(timeout=CLUSTER_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the chief hangs after a task died:\n{log.read_text()[-3000:]}")
    output = log.read_text()
    assert chief.returncode == 1, output[-3000:]
    assert "error: a cluster task stopped answering during training" in output
    assert again in output
    return time.time() - started


def test_parameter_server_run_survives_a_killed_worker(tmp_path):
    data = write_processed(tmp_path / "data", num_users=200)
    args = _args(data, tmp_path, "parameter_server")
    processes = []
    try:
        servers, chief, chief_log, _ = ps_cluster(tmp_path, args, "first", args)
        processes += [*servers, chief]
        _until_saved(tmp_path, 2, chief, chief_log)
        _signal(servers[3], signal.SIGKILL)  # worker 1
        killed_at = time.time()
        output = _wait(chief, chief_log, CLUSTER_TIMEOUT)
        recovered = time.time() - killed_at
    finally:
        _stop(processes)
    # The coordinator saw the worker go and ran its steps elsewhere.
    assert "Worker /job:worker/replica:0/task:1 failed" in output
    run_dir = next((tmp_path / "runs").glob("tiny-*"))
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == EPOCHS, output[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == EPOCHS
    assert (tmp_path / "models" / "tiny" / "1" / "retrieval_bruteforce").is_dir()
    print(f"\nworker 1 killed after epoch 2 of {EPOCHS}; the chief finished (train, test, "
          f"export) {recovered:.1f}s later")


def test_parameter_server_chief_killed_and_restarted_resumes(tmp_path):
    """The chief dies (SIGKILL) during training; the same command with --resume RUN_DIR starts
    a new chief against the same workers and ps tasks, which restores the last epoch's
    checkpoint from its files and finishes the run."""
    data = write_processed(tmp_path / "data", num_users=200)
    args = _args(data, tmp_path, "parameter_server")
    processes = []
    try:
        servers, first, first_log, chief_config = ps_cluster(tmp_path, args, "first", args)
        processes += [*servers, first]
        _until_saved(tmp_path, 3, first, first_log)
        _signal(first, signal.SIGKILL)
        killed_at = time.time()
        first.wait(timeout=10)
        run_dir = next((tmp_path / "runs").glob("tiny-*"))
        saved = _epochs_saved(tmp_path)
        assert 3 <= saved < EPOCHS
        second_log = tmp_path / "chief-resumed.log"
        second = _start([*args, "--resume", str(run_dir)], chief_config, tmp_path, second_log)
        processes.append(second)
        output = _wait(second, second_log, CLUSTER_TIMEOUT)
        recovered = time.time() - killed_at
    finally:
        _stop(processes)
    assert f"resuming {run_dir} after epoch {saved}" in output
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == list(range(EPOCHS)), output[-3000:]
    # Restored, not started afresh: the first resumed epoch's loss is far below epoch 1's.
    assert history["loss"].iloc[saved] < history["loss"].iloc[0] - 0.1
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == EPOCHS
    assert (tmp_path / "models" / "tiny" / "1" / "retrieval_bruteforce").is_dir()
    print(f"\nchief killed after epoch {saved} of {EPOCHS}, restarted with --resume: the run "
          f"finished (train, test, export) {recovered:.1f}s after the kill")


def test_parameter_server_killed_ps_stops_the_chief_and_the_restarted_cluster_resumes(tmp_path):
    data = write_processed(tmp_path / "data", num_users=200)
    args = _args(data, tmp_path, "parameter_server")
    processes = []
    try:
        servers, chief, chief_log, _ = ps_cluster(tmp_path, args, "first", args)
        processes += [*servers, chief]
        _until_saved(tmp_path, 2, chief, chief_log)
        _signal(servers[1], signal.SIGKILL)  # ps 1
        detected = _stops_with_message(chief, chief_log,
                                       "restart the stopped tasks, then this chief with --resume")
        _stop(processes)
        processes = []
        run_dir = next((tmp_path / "runs").glob("tiny-*"))
        saved = _epochs_saved(tmp_path)
        # The whole cluster again (new processes, new ports), the chief resuming the run.
        servers, resumed, resumed_log, _ = ps_cluster(tmp_path, args, "second",
                                                    [*args, "--resume", str(run_dir)])
        processes += [*servers, resumed]
        output = _wait(resumed, resumed_log, CLUSTER_TIMEOUT)
    finally:
        _stop(processes)
    assert f"resuming {run_dir} after epoch {saved}" in output
    assert len(pd.read_csv(run_dir / "history.csv")) == EPOCHS
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == EPOCHS
    print(f"\nps 1 killed after epoch {saved}: the chief stopped with the message "
          f"{detected:.1f}s later; a new cluster resumed and finished")


def test_multiworker_lost_worker_stops_the_other_and_all_resume(tmp_path):
    """A multiworker run loses worker 1 (SIGKILL): worker 0 (the chief) stops with a message
    instead of waiting forever in its next all-reduce (TensorFlow's peer health check aborts
    the collectives); both restarted with --resume continue from the chief's last state."""
    data = write_processed(tmp_path / "data")
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = _args(data, tmp_path, "multiworker", epochs=30)
    processes = []

    def start(index: int, extra: list[str], tag: str):
        workdir = tmp_path / f"w{index}"
        workdir.mkdir(exist_ok=True)
        log = tmp_path / f"{tag}-worker{index}.log"
        processes.append(_start([*args, *extra], {"cluster": cluster, "task": {
            "type": "worker", "index": index}}, workdir, log))
        return processes[-1], log

    try:
        (chief, chief_log), (other, _) = start(0, [], "first"), start(1, [], "first")
        _until_saved(tmp_path / "w0", 2, chief, chief_log)
        _signal(other, signal.SIGKILL)
        detected = _stops_with_message(chief, chief_log, "restart every worker with --resume")
        run_dir = next((tmp_path / "w0" / "runs").glob("tiny-*")).resolve()
        saved = _epochs_saved(tmp_path / "w0")
        _stop(processes)
        processes = []
        (chief, chief_log), (other, other_log) = (start(0, ["--resume", str(run_dir)], "again"),
                                                  start(1, ["--resume", str(run_dir)], "again"))
        output = _wait(chief, chief_log, CLUSTER_TIMEOUT)
        _wait(other, other_log, CLUSTER_TIMEOUT)
    finally:
        _stop(processes)
    assert f"resuming {run_dir} after epoch {saved}" in output
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == list(range(len(history))) and len(history) > saved
    assert (run_dir / "metrics.json").exists()
    assert not (tmp_path / "w1" / "runs").exists()  # still only the chief writes a run
    print(f"\nmultiworker: worker 1 killed after epoch {saved}; worker 0 stopped with the "
          f"message {detected:.1f}s later; both resumed and finished")


def test_the_stop_message_names_the_task():
    from training.trainer import unavailable_task

    collective = ("{{function_node __wrapped__CollectiveReduceV2_device_/job:worker/replica:0/"
                  "task:0/device:CPU:0}} Collective ops is aborted by: Error reported from "
                  "/job:worker/task:1: The following tasks are unhealthy")
    assert unavailable_task(Exception(collective)) == "error reported from /job:worker/task:1"
    refused = ("Graph execution error:\n\nfailed to connect to all addresses; last error: "
               "UNKNOWN: ipv4:127.0.0.1:39325: Failed to connect to remote host")
    assert unavailable_task(Exception(refused)) == "127.0.0.1:39325 refuses connections"
    down = "cluster check alive failed, /job:worker/replica:0/task:1 is down"
    assert unavailable_task(Exception(down)) == "/job:worker/replica:0/task:1 is down"
    assert unavailable_task(Exception("\nsomething else\n")) == "something else"
