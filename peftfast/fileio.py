"""Atomic writes for everything peftfast puts on disk: single files, and whole directories.

A reader, or a run interrupted mid-write (Ctrl-C, SIGKILL, a full disk), sees the old content or the new
one, never half of either and never a mix:

* :func:`replace_atomically` writes one file beside its target, fsyncs it and renames it over the target
  (logs, plots, results).
* :func:`staged_directory` writes a whole directory (an adapter, a training checkpoint, a merged model)
  beside its target, fsyncs it and swaps it in with one rename. Entries of the old directory that the new
  one does not write (a training run's ``train_log.json`` and ``checkpoint-*`` beside its adapter, a file
  the user keeps in a model folder) are carried over into the new one, so overwriting replaces only what
  the writer writes. A save killed at any point leaves a ``.peftfast-save-*`` directory that the next
  save to the same target finishes or removes (:func:`recover_stale_saves`), losing nothing; the staging
  directories of older versions' killed saves are removed too once idle, unless they may hold a complete save.

New files and directories get the permissions of any other writer under the process's umask (``mkstemp``
and ``mkdtemp`` would make them 0600/0700, unreadable to the other users of a shared model store).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

STAGE_PREFIX = ".peftfast-save-"
# Present in a staging directory until it has been swapped in: a stale directory that still holds it is a
# half-written *new* version (junk); one without it is the *old* version, swapped out, whose carried-over
# entries may not all have moved yet.
STAGING_MARKER = ".peftfast-staging"


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (there is no other portable read).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_like_open(path: PathLike, directory: bool = False) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _fsync_dir(path: PathLike) -> None:
    # Directory fsync makes a rename durable; Windows cannot open a directory, and there a rename is
    # as durable as the filesystem makes it.
    if sys.platform == "win32":
        return
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        _chmod_like_open(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, giving each the umask's permissions (some writers,
    safetensors among them, create their files 0600)."""
    for dirpath, _, files in os.walk(root):
        _chmod_like_open(dirpath, directory=True)
        for name in files:
            _chmod_like_open(os.path.join(dirpath, name))
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or filesystem has no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # musl before 1.2.5, old glibc
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} into place: {os.strerror(err)}", str(b))


# Staging directories this process is writing now (another thread's save must not be "recovered").
_ACTIVE: set = set()


def _pid_alive(pid: int, stage: Path) -> bool:
    if pid == os.getpid():
        return stage in _ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def _carry_over(old: Path, new: Path, drop: Callable[[str], bool]) -> None:
    """Move the entries of ``old`` that ``new`` does not have (and ``drop`` does not claim) into ``new``."""
    for entry in sorted(os.listdir(old)):
        if drop(entry) or os.path.lexists(new / entry):
            continue
        os.rename(old / entry, new / entry)


def _never(_name: str) -> bool:
    return False


# Staging directories of peftfast versions before staged_directory: mkdtemp names (8 characters from
# [a-z0-9_]) with neither the target nor the writer's pid, so they cannot be tied to a save or a process.
_LEGACY_STAGE = re.compile(r"^\.(peftfast-save|peftfast-merge|checkpoint-\d+)-[a-z0-9_]{8}$")
# An older writer still at work touches its directory; one untouched this long was killed.
LEGACY_IDLE_SECONDS = 600


def _complete_safetensors(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # checks the header against the file's length
            f.keys()
        return True
    except Exception:  # noqa: BLE001 - any unreadable file counts as a partial write
        return False


def _remove_legacy_stages(parent: Path) -> None:
    """Remove what older versions' killed saves left in ``parent`` when it holds only a partial write.

    One that holds a complete safetensors file may be the only copy of the last save an older version
    was making when it was killed; it is kept, and named in a warning for the user to load or delete.
    """
    now = time.time()
    for entry in sorted(os.listdir(parent)):
        stale = parent / entry
        if not _LEGACY_STAGE.match(entry) or stale.is_symlink() or not stale.is_dir():
            continue
        files = [p for p in stale.rglob("*") if p.is_file()]
        if now - max([stale.stat().st_mtime] + [p.stat().st_mtime for p in files]) < LEGACY_IDLE_SECONDS:
            continue
        if any(p.suffix == ".safetensors" and _complete_safetensors(p) for p in files):
            warnings.warn(f"{stale} was left by an older peftfast whose save was killed and may hold the only "
                          "copy of what it was saving; load what you need from it, then delete it", stacklevel=3)
            continue
        shutil.rmtree(stale, ignore_errors=True)


def recover_stale_saves(target: PathLike, drop: Optional[Callable[[str], bool]] = None) -> None:
    """Finish or remove what a killed :func:`staged_directory` left beside ``target``.

    A half-written new version (its staging marker still inside) is deleted; an old version swapped out
    before its other entries were carried over gives them to ``target`` first. Staging directories of a
    live process (a concurrent save) are left alone.

    Args:
        target: the directory a save was writing.
        drop: names the writer replaces even where the new version lacks them (not carried over).

    Example:
        >>> recover_stale_saves("out/adapter")  # doctest: +SKIP
    """
    target = Path(os.path.abspath(os.fspath(target)))
    parent = target.parent
    if not parent.is_dir():
        return
    _remove_legacy_stages(parent)
    prefix = f"{STAGE_PREFIX}{target.name}-"
    for entry in sorted(os.listdir(parent)):
        if not entry.startswith(prefix):
            continue
        stale = parent / entry
        pid = entry[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid), stale) or not stale.is_dir():
            continue
        if not (stale / STAGING_MARKER).exists():
            if not target.exists():
                os.rename(stale, target)  # killed between the two renames where no exchange exists
                continue
            _carry_over(stale, target, drop or _never)
        shutil.rmtree(stale, ignore_errors=True)
    if target not in _ACTIVE:  # (a save into another save's staging directory keeps that one's marker)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target / STAGING_MARKER)  # killed right after the exchange


@contextlib.contextmanager
def staged_directory(target: PathLike, *, drop: Optional[Callable[[str], bool]] = None) -> Iterator[Path]:
    """A fresh directory that atomically becomes ``target`` when the ``with`` block ends without an error.

    The block writes the new content into the yielded folder (beside ``target``, so the rename stays on one
    filesystem). On success every file is fsynced, and the folder replaces ``target`` in one rename (the old
    version stays whole until then); entries of the old ``target`` the block did not write are moved into
    the new one unless ``drop`` claims them, and the old version is then removed. On an exception the
    folder is deleted and ``target`` is untouched. Leftovers of an earlier killed save to the same target
    are recovered first (:func:`recover_stale_saves`).

    Args:
        target: the directory to write (created, or replaced); its parent is created if missing.
        drop: ``drop(name) -> bool`` for entries of the old directory the writer replaces even when the new
            one lacks them (e.g. the weight shards of an older merged model).

    Yields:
        The staging directory (a :class:`pathlib.Path`).

    Raises:
        FileExistsError: ``target`` exists and is not a directory.

    Example:
        >>> with staged_directory("out/adapter") as tmp:  # doctest: +SKIP
        ...     (tmp / "adapter_config.json").write_text("{}")
    """
    target = Path(os.path.abspath(os.fspath(target)))
    drop = drop or _never
    if os.path.lexists(target) and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another path or remove it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_stale_saves(target, drop)
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{target.name}-{os.getpid()}-", dir=str(target.parent)))
    except PermissionError as e:
        # The error would name the staging folder, a path the caller never asked for.
        raise PermissionError(e.errno, f"cannot write {target}: no permission to create files in "
                              f"{target.parent} ({e.strerror})", str(target)) from None
    _ACTIVE.add(stage)
    swapped = False
    try:
        (stage / STAGING_MARKER).touch()
        _chmod_like_open(stage, directory=True)
        yield stage
        _fsync_tree(stage)
        if not target.exists():
            os.unlink(stage / STAGING_MARKER)
            os.rename(stage, target)
            _fsync_dir(target.parent)
            return
        if not _exchange(stage, target):
            # No atomic exchange here: move the old version aside first; a kill between the renames
            # leaves it under the staging prefix without a marker, which recovery renames back.
            aside = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{target.name}-{os.getpid()}-",
                                          dir=str(target.parent)))
            os.rmdir(aside)
            _ACTIVE.add(aside)
            os.rename(target, aside)
            os.rename(stage, target)
            _ACTIVE.discard(stage)
            stage = aside
        swapped = True
        os.unlink(target / STAGING_MARKER)
        _fsync_dir(target.parent)
        _carry_over(stage, target, drop)
        _fsync_dir(target)
        shutil.rmtree(stage, ignore_errors=True)
    finally:
        # After the swap, an error while carrying entries over leaves the old version (and what it still
        # holds) for recover_stale_saves instead of deleting it.
        if not swapped:
            shutil.rmtree(stage, ignore_errors=True)
        _ACTIVE.discard(stage)
