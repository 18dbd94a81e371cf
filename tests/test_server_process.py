"""The real entry point: `uvicorn main:app` in a subprocess, queried over HTTP."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from support import uvicorn_server


@pytest.fixture
def server(tiny_export, tmp_path):
    log = tmp_path / "server.log"
    with uvicorn_server(tiny_export[1], log, POLL_SECONDS="1") as (url, process):
        yield url, process, log


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


@pytest.mark.parametrize("setting", [{"AB_SPLIT": "3:0.9,x"}, {"POLL_SECONDS": "often"},
                                     {"KEEP_VERSIONS": "two"}])
def test_bad_setting_stops_uvicorn_with_one_line_naming_it(setting, tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MODEL_DIR": str(tmp_path), **setting}
    result = subprocess.run([sys.executable, "-m", "uvicorn", "main:app", "--port", "0"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=120)
    name = next(iter(setting))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"towerrec: {name}=")
