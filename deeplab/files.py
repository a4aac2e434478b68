"""Atomic file output (write to a temporary name beside the target, rename when complete) and file digests."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove what ``atomic_path(path)`` left behind in processes that no longer run (kill -9 lands mid-write).

    Beside a persistent DVC output such a file would otherwise be cached with it on every later run. Returns the
    removed paths; a temporary of a live process (a concurrent writer) is left alone."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and not _alive(int(pid)):  # this process is alive too: its own is kept
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_torch(obj: Any, path: str | Path) -> None:
    import torch

    # Through a file handle: given a path, torch.save names the zip's inner folder after the (temporary, per-pid)
    # file name, and the same weights would hash differently on every run.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def fingerprint(*parts: object) -> str:
    """A short stable digest of JSON-serialisable parts (configs, file digests): the key of resumable work."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: str | Path, algo: str = "md5") -> str:
    """Hex digest of a file, read in chunks (md5 matches what dvc.lock records)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algo).hexdigest()
