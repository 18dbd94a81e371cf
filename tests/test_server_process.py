"""The real entry point: `uvicorn main:app` in a subprocess, queried over HTTP."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tiny_export, tmp_path):
    port = free_port()
    env = {**os.environ, "MODEL_DIR": str(tiny_export[1]), "INDEX": "scann",
           "POLL_SECONDS": "1"}
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port",
         str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "server not ready after 180 s"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        yield url, process, tmp_path / "server.log"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def test_uvicorn_serves_the_export_over_http(server, tiny_export):
    url, process, log = server
    with httpx.Client(base_url=url, timeout=30) as http:
        ready = http.get("/ready").json()
        assert ready["ready"] and ready["index"] == "scann"
        version = ready["model_version"]
        assert version >= 1
        user = http.get("/recommendations/u010", params={"k": 5})
        assert user.status_code == 200
        body = user.json()
        assert body["model_version"] == version and len(body["recommendations"]) == 5
        session = http.post("/recommendations", json={"history": ["SKU0002", "NOPE"], "k": 5})
        assert session.status_code == 200 and session.json()["unknown_items"] == ["NOPE"]
        assert "SKU0002" not in [r["item_id"] for r in session.json()["recommendations"]]
        assert http.get("/recommendations/nobody").status_code == 404
        bad = http.post("/recommendations", content=b"{", headers={
            "content-type": "application/json"})
        assert bad.status_code == 422
        assert http.get("/items/SKU0002/similar", params={"k": 3}).status_code == 200
        assert http.get("/health").json() == {"status": "ok"}
    process.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal after a graceful shutdown (lifespan ran, poll thread joined)
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in log.read_text()
