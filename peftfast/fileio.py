"""Atomic file replacement for everything peftfast writes outside checkpoints (logs, plots, results).

A reader, or a run interrupted mid-write, sees the old file or the new one, never half of either:
the content goes to a temporary file in the same folder (so the rename stays on one filesystem),
is flushed to disk, and is renamed over the target. (Adapters and training checkpoints are whole
folders and have their own staging: :mod:`peftfast.checkpoint`, :mod:`peftfast.resume`.)
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def replace_atomically(path: PathLike, *, text: bool = False) -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without an error.

    Args:
        path: the file to write; its folder must exist.
        text: open in text mode (UTF-8) instead of binary.

    Yields:
        The open temporary file. On an exception it is deleted and ``path`` is left as it was.

    Example:
        >>> with replace_atomically("out/train_log.json", text=True) as f:  # doctest: +SKIP
        ...     json.dump(log, f)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; outputs are meant to be read like any other file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
