"""Environment defaults for the tools vaeft drives (Prefect, DVC), set before they are imported.

Only defaults: anything the user already exported wins. vaeft itself never imports Prefect;
``flows/`` and ``tasks/`` call :func:`configure` at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR_NAME = ".vaeft"


def defaults(project_root: Path = PROJECT_ROOT) -> dict[str, str]:
    return {
        # Prefect's temporary local server keeps its SQLite DB here (ignored by git).
        "PREFECT_HOME": str(project_root / STATE_DIR_NAME / "prefect"),
        # A fresh database takes 20-30 s to start on 2 cores; Prefect's default (20 s) is too short.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
    }


def configure(project_root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Apply :func:`defaults` where unset; returns what was set."""
    applied = {}
    for key, value in defaults(project_root).items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    # Prefect creates its home without parents and fails on a fresh checkout.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    return applied
