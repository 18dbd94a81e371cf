"""Shared test setup: TF settings first, repo root importable."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tfenv  # noqa: E402,F401
