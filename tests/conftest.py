"""Shared test setup: TF settings first, repo root importable."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

import tfenv  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """One tiny trained-and-exported model shared by the export and API tests:
    (run_dir, export_dir, metrics). Version 1 lives at export_dir / "1". The content term is
    on, so every parity test of the exported models covers it."""
    from support import train_tiny

    return train_tiny(tmp_path_factory.mktemp("tiny"), content_term="on")


@pytest.fixture(scope="session")
def version1(tiny_export):
    """The tiny export's version directory (copy it before changing anything in it)."""
    return tiny_export[1] / "1"
