"""Serve the newest exported model version over HTTP: `uvicorn main:app`.

Environment: MODEL_DIR (default saved_model/sample), INDEX (scann | bruteforce),
POLL_SECONDS (default 10; 0 turns the poll for new versions off).
"""

import logging
import os
import sys

# One BLAS thread: the server's numpy products (live items, similar items) are small and run
# per request, concurrently; OpenBLAS's own threads spin and take the cores from TensorFlow.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import tfenv  # noqa: E402,F401  (TF settings before TensorFlow loads)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

try:
    from serving.app import app  # noqa: E402,F401
except ValueError as error:  # a setting in the environment is wrong: say which, no traceback
    sys.exit(f"towerrec: {error}")
