"""Where the project keeps generated files. Nothing here is absolute: paths are relative to the project or
come from the environment ($XDG_CACHE_HOME)."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "config"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Cache for the demo data and preprocessed volumes: `override`, else $XDG_CACHE_HOME/medlsdm,
    else `<project>/.cache`."""
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "medlsdm" if xdg else PROJECT_ROOT / ".cache"
