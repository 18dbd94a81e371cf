"""Serve the newest exported model version over HTTP: `uvicorn main:app`.

Environment: MODEL_DIR (default saved_model/sample), INDEX (scann | bruteforce),
POLL_SECONDS (default 10; 0 turns the poll for new versions off).
"""

import logging
import sys

import tfenv  # noqa: F401  (TF settings before TensorFlow loads)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

try:
    from serving.app import app  # noqa: E402,F401
except ValueError as error:  # a setting in the environment is wrong: say which, no traceback
    sys.exit(f"towerrec: {error}")
