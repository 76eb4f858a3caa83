"""Directories written all or nothing: filled beside their destination, then swapped in whole."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yields a temporary directory beside `path` to fill; on success it replaces `path` whole, on
    any failure it is removed and `path` is left as it was."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".kiln-hf-", dir=parent)
    try:
        yield tmp
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: str, dst: str) -> None:
    """Moves the finished directory into place; an existing `dst` is swapped out, then removed."""
    if os.path.exists(dst):
        old = dst.rstrip("/") + ".old-kiln"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
