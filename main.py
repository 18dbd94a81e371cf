"""Serve the newest exported model version over HTTP: `uvicorn main:app`.

Environment: MODEL_DIR (default saved_model/sample), INDEX (scann | bruteforce),
POLL_SECONDS (default 10; 0 turns the poll for new versions off).
"""

import logging

import tfenv  # noqa: F401  (TF settings before TensorFlow loads)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

from serving.app import app  # noqa: E402,F401
