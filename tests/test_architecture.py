"""The folder layout's rules (ARCHITECTURE.md), checked by import-linter's contracts in
pyproject.toml: arrows down the flow, and Docker, git and the database each behind one folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    """Every import-linter contract is kept: a lower folder importing cli/ or service/, or a
    module outside hosts/ importing docker (outside sources/ GitPython, outside state/
    SQLAlchemy), fails the suite with the offending import chain."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
