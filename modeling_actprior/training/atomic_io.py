"""The one crash-safe writer: files, JSON and folders written all or nothing (temporary sibling, fsync, rename or
swap), used by the checkpoints, the dataset writer, the Hub helpers and the reports. A process killed at any moment
leaves the previous version (or none), never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from typing import Any


def fsync_path(path: str) -> None:
    """fsync one file (or a directory's entry list) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory's entries where the platform allows directory file descriptors (a no-op elsewhere)."""
    try:
        fsync_path(path)
    except OSError:  # pragma: no cover - platforms without directory fds
        pass


def fsync_tree(root: str) -> None:
    """fsync every file below ``root``, then every directory, deepest first (so each rename below is durable)."""
    dirs = []
    for dirpath, _, files in os.walk(root):
        dirs.append(dirpath)
        for name in files:
            fsync_path(os.path.join(dirpath, name))
    for d in reversed(dirs):
        fsync_dir(d)


def discard_folder(checkpoint: str) -> None:
    """Delete a checkpoint folder so that no half-deleted one is ever visible: rename it out of sight first
    (atomic), then remove it. A kill during the removal leaves only a ``.trash-*`` folder, swept later."""
    parent, name = os.path.split(checkpoint.rstrip(os.sep))
    trash = os.path.join(parent, f".trash-{name}-{os.getpid()}")
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def exchange_paths(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system can't."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_text(path: str, text: str) -> None:
    """Write ``text`` into ``path`` all or nothing: into a temporary sibling, fsynced, then renamed over ``path``. A
    run killed while writing leaves the previous file (or none), never half of one."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any, indent: int = 2) -> None:
    """``json.dump(obj)`` into ``path`` all or nothing (``write_text``), so a file whose presence means "this work is
    done" (a study's ``closed_loop.json``) is complete whenever it exists."""
    write_text(path, json.dumps(obj, indent=indent))


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Write a folder (e.g. ``final/``) all or nothing: the body writes into a temporary sibling that is fsynced
    and then swapped in. An existing folder at ``path`` is replaced only once the new one is complete; a run killed
    while writing leaves the old folder (or none) and a ``.tmp-<name>-*`` sibling that the next call sweeps.

        with atomic_folder(os.path.join(output_dir, "final")) as tmp:
            model.save_pretrained(tmp)
    """
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):  # left by a run killed while writing or swapping
        if stale.startswith((f".tmp-{name}-", f".trash-{name}-")):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    try:
        try:
            yield tmp
            fsync_tree(tmp)
        except Exception as e:
            # A full disk surfaces as OSError from our writers and as SafetensorError from safetensors'.
            if not (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"):
                raise
            try:
                free = f"{shutil.disk_usage(parent).free / 2**20:.0f} MiB free"
            except OSError:
                free = "free space unknown"
            previous = "the previous one is kept" if os.path.isdir(path) else "nothing was left in its place"
            raise OSError(getattr(e, "errno", None),
                          f"Could not write {path}: {getattr(e, 'strerror', None) or e} ({free} on the disk of "
                          f"{parent}); {previous}. Free space (or choose another --output_dir) and rerun: "
                          "the checkpoints under checkpoints/ are intact.") from e
        if not os.path.isdir(path):
            os.replace(tmp, path)
        elif exchange_paths(tmp, path):  # tmp now holds the old folder
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            discard_folder(path)
            os.replace(tmp, path)
        fsync_path(parent)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
