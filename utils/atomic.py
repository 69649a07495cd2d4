"""Write files under a temporary name in the destination folder and rename them into place, so a crash never
leaves a half-written output and an existing output is only replaced when the caller asks for it. Cache entries
(folders of several files) are written the same way by `atomic_folder`."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from utils.errors import UserError


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass overwrite=true to replace it")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary path next to `path` (same suffixes); on success rename it to `path`."""
    path = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the output the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, complete_marker: str = "meta.json"):
    """Yield a fresh temporary folder next to `folder` to fill; on success rename it to `folder`. If another
    process renamed its own copy into place first (a folder holding `complete_marker`), that one is kept."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        try:
            tmp.rename(folder)
        except OSError:  # another process wrote the same entry first: keep theirs
            if not (folder / complete_marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
