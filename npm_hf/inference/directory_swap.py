"""One writer at a time for an index directory, and swaps of a finished directory into place that a kill at any
moment leaves recoverable.

A writer (a build, an edit) holds an exclusive OS lock (`flock`) on `.{name}.lock` beside the directory for its
whole run. The lock file records the holder (pid, host, what it does, since when) so a second writer is told who
holds it. The OS releases the lock when its holder dies, so a lock file still present without a holder is stale:
its writer was killed; the next writer says so and takes over.

A finished directory replaces the old one with two renames (old -> `.{name}.old-ID`, new -> `name`). A kill between
them leaves no directory at the path; `recover` (run by the next writer, and by loading) then finishes the swap when
the new directory is complete (its manifest is written last, atomically) or rolls it back, and removes the staging
folders (`.{name}.tmp-ID`) and retired copies that killed writers left behind.
"""

import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from transformers.utils import logging


try:
    import fcntl
except ImportError:  # Windows: no flock; writers are then not serialised (said once, in the log)
    fcntl = None

logger = logging.get_logger(__name__)

LOCK_SUFFIX = ".lock"
RETIRED_INFIX = ".old-"
STAGING_INFIX = ".tmp-"
PARTIAL_SUFFIX = ".partial"  # a build's working folder (npm_hf.index.build); its finished index is in index/


class IndexLockedError(RuntimeError):
    """Another process is writing the index directory (building or editing it)."""


def lock_path(directory) -> Path:
    directory = Path(directory)
    return directory.parent / f".{directory.name}{LOCK_SUFFIX}"


def staging_path(directory) -> Path:
    """A fresh, unique staging folder name beside `directory` (hidden: it never loads as the index)."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}{STAGING_INFIX}{uuid.uuid4().hex[:12]}"


class DirectoryLock:
    """`with DirectoryLock(path, "build-index"):` holds the writer lock of `path` or raises IndexLockedError naming
    the holder. Re-entrant within one thread; another thread of the same process is refused like another process."""

    _held: dict = {}  # (lock file, thread) -> (handle, depth)

    def __init__(self, directory, purpose: str):
        self.directory = Path(directory)
        self.path = lock_path(directory)
        self.purpose = purpose

    def __enter__(self) -> "DirectoryLock":
        key = (str(self.path.absolute()), threading.get_ident())
        if key in self._held:
            handle, depth = self._held[key]
            self._held[key] = (handle, depth + 1)
            return self
        if fcntl is None:
            logger.warning_once("No file locking on this platform: run one index build or edit at a time.")
            self._held[key] = (None, 1)
            return self
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(self.path, "a+", encoding="utf-8")
            except OSError as error:
                raise type(error)(error.errno, f"Cannot write in {self.path.parent} ({error.strerror}); choose a "
                                  "folder you can write to, or fix its permissions.") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(handle)
                handle.close()
                raise IndexLockedError(
                    f"{self.directory} is being written by another process ({holder}); running a second writer "
                    "now would destroy its work. Wait for it to finish (or stop it), then run this again."
                ) from None
            # the previous holder may have removed the file between our open and flock: lock the file on disk
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        stale = _read_holder(handle)
        if stale:
            logger.warning(f"Found a stale writer lock on {self.directory} ({stale}): that writer was killed. "
                           "Taking over; its leftovers are cleaned up.")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        self._held[key] = (handle, 1)
        return self

    def __exit__(self, *exc) -> None:
        key = (str(self.path.absolute()), threading.get_ident())
        handle, depth = self._held[key]
        if depth > 1:
            self._held[key] = (handle, depth - 1)
            return
        del self._held[key]
        if handle is not None:
            self.path.unlink(missing_ok=True)  # a clean exit leaves no lock file: one left behind means a kill
            handle.close()


def _read_holder(handle) -> str:
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "null")
    except ValueError:
        return "an unreadable lock file"
    if not isinstance(info, dict):
        return ""
    return f"pid {info.get('pid')} on {info.get('host')}, {info.get('purpose')} since {info.get('since')}"


def swap_into_place(staging: Path, directory: Path) -> None:
    """Rename the finished `staging` to `directory`; an existing directory is retired only once the new one is
    complete, and removed after the swap."""
    retired = None
    if directory.exists():
        retired = directory.parent / f".{directory.name}{RETIRED_INFIX}{uuid.uuid4().hex[:12]}"
        os.replace(directory, retired)
    os.replace(staging, directory)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def link_or_copy(source, target) -> None:
    """Hard-link a file that is never written in place (index files), or copy it where links are not possible."""
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def interrupted_swap(directory) -> bool:
    """Whether `directory` is missing because a writer was killed between the two renames of a swap."""
    directory = Path(directory)
    return not directory.exists() and bool(_retired(directory))


def recover(directory, complete_marker: str) -> None:
    """Finish or roll back a swap interrupted by a kill, then remove what killed writers left beside `directory`.
    The caller holds the writer lock. A staging folder counts as finished when it holds `complete_marker` (the
    manifest, written last)."""
    directory = Path(directory)
    retired = _retired(directory)
    if not directory.exists() and retired:
        partial_index = directory.parent / f".{directory.name}{PARTIAL_SUFFIX}" / "index"
        finished = [s for s in [*_stagings(directory), partial_index] if (s / complete_marker).is_file()]
        if finished:
            newest = max(finished, key=lambda s: (s / complete_marker).stat().st_mtime_ns)
            os.replace(newest, directory)
            if newest == partial_index:  # the build's own state has served its purpose
                shutil.rmtree(partial_index.parent, ignore_errors=True)
            logger.warning(f"An edit or build of {directory} was killed between the two renames of its swap; "
                           f"finished it: the new index (from {newest.name}) is now in place.")
        else:
            newest = max(retired, key=lambda s: s.stat().st_mtime_ns)
            os.replace(newest, directory)
            logger.warning(f"An edit or build of {directory} was killed between the two renames of its swap, before "
                           f"the new index was complete; rolled back: the previous index (from {newest.name}) is in "
                           "place again.")
    leftovers = [*_retired(directory), *_stagings(directory)]
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    if leftovers:
        logger.warning(f"Removed {len(leftovers)} folder(s) that killed writers of {directory} left behind: "
                       f"{sorted(p.name for p in leftovers)}.")


def _retired(directory: Path) -> list[Path]:
    return [p for p in directory.parent.glob(f".{directory.name}{RETIRED_INFIX}*") if p.is_dir()]


def _stagings(directory: Path) -> list[Path]:
    return [p for p in directory.parent.glob(f".{directory.name}{STAGING_INFIX}*") if p.is_dir()]
