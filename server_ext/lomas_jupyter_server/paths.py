"""Where a service keeps its store by default: light enough for the CLI to import without Jupyter Server."""

from __future__ import annotations

import os
from pathlib import Path


def default_storage_dir() -> str:
    from jupyter_core.paths import jupyter_data_dir

    return os.environ.get("LOMAS_STORAGE_DIR") or str(Path(jupyter_data_dir()) / "lomas")
