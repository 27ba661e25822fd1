"""A run folder belongs to its run: what counts as one, and the lock that gives it one writer.

:func:`foreign_entries` tells a run folder from any other folder: a folder is a run's when
it is empty, when its ``config.json`` is a run's settings (written by the trainer: ``out``,
``model``, ``method``, ``command``; older runs without one: ``last.pth``), or when it is a
per-depth sweep's (``depth<d>/`` run folders plus the combined ``results.md``/``results.png``).
``coopnets train`` refuses any other folder that holds files, naming them, so it never takes
over a user's folder.

:class:`RunLock` is an OS-level lock (``fcntl.flock``) on ``OUT/.coopnets-run.lock``, held
by the writing process for the whole run. A second writer (or a ``--resume``) of the same
folder is refused at once with the holder's pid; the kernel drops the lock when its
process dies, so a lock file left by a killed run does not block. The lock file is
removed when the run ends.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "run"
    >>> lock = RunLock.acquire(out)
    >>> RunLock.acquire(out)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    coopnets.train.folder.RunFolderError: --out ... is in use by another coopnets run (pid ...); wait for it to end or choose another --out.
    >>> lock.release(); RunLock.acquire(out).release()
    >>> (out / "config.json").write_text('{"mine": 1}') and foreign_entries(out)
    ['config.json']
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import List, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: msvcrt's OS-level lock instead
    fcntl = None  # type: ignore[assignment]

#: the lock file in a run folder (only while a run writes it, or left by a killed one)
LOCK_NAME = ".coopnets-run.lock"
#: what a run's ``config.json`` always holds (:meth:`Trainer.fit` writes it)
RUN_CONFIG_KEYS = ("out", "model", "method", "command")
_SWEEP_FILES = ("results.md", "results.png")
_DEPTH_DIR = re.compile(r"depth\d+")


class RunFolderError(ValueError):
    """``--out`` is not this run's to write: another folder's files, or another run holds its lock."""


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is a run's ``config.json`` (the trainer's settings record)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and all(k in config for k in RUN_CONFIG_KEYS) \
        and str(config["command"]).split()[:1] in (["coopnets"], ["torchrun"])


def foreign_entries(folder: Path) -> List[str]:
    """The entries of ``folder`` that are not a coopnets run's (``[]``: a run folder, an empty or missing one)."""
    if not folder.is_dir():
        return []
    names = sorted(e.name for e in folder.iterdir() if e.name != LOCK_NAME)
    if not names or is_run_config(folder / "config.json"):
        return []
    if "config.json" not in names and "last.pth" in names:  # a run of a coopnets that wrote no config.json
        return []
    runs = [n for n in names if _DEPTH_DIR.fullmatch(n) and (folder / n).is_dir() and not foreign_entries(folder / n)]
    if runs:  # a per-depth sweep: its runs and the combined table
        return [n for n in names if n not in runs and n not in _SWEEP_FILES]
    return names


def check_owned(out: Path) -> None:
    """Refuse (:class:`RunFolderError`, one line naming what is there) an ``out`` that is a file or another folder."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a run folder; choose another --out.")
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        why = " (not a run's settings)" if "config.json" in foreign else ""
        raise RunFolderError(f"--out {out} holds files that are not a coopnets run's: {shown}{why}; choose a new or "
                             f"empty folder, or a run folder of coopnets train.")


class RunLock:
    """The one-writer lock of a run folder (see the module docstring); :meth:`release` ends it."""

    def __init__(self, path: Path, fd: int, created: List[Path], stale: Optional[bytes]) -> None:
        self.path, self.fd, self.created, self.stale = path, fd, created, stale

    @staticmethod
    def check_free(out: Path) -> None:
        """Refuse (naming the holder) when another process holds ``out``'s lock; changes nothing on disk."""
        path = out / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # no lock file (or not readable: acquire() will tell)
        try:
            _lock(fd, out)
        finally:
            os.close(fd)

    @classmethod
    def acquire(cls, out: Path) -> "RunLock":
        """Lock ``out`` (created with its parents if missing) or raise :class:`RunFolderError` naming the holder."""
        created = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
        path = out / LOCK_NAME
        while True:
            stale = path.read_bytes() if path.is_file() else None  # left by a killed run: restored on a failed start
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _lock(fd, out)
            except BaseException:
                os.close(fd)
                raise
            try:  # the previous holder may have removed the file between our open and our lock: lock the new one
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode())
        return cls(path, fd, created, stale)

    def release(self, failed: bool = False) -> None:
        """Remove the lock file and unlock. ``failed`` (a run refused after locking) leaves the disk as it was:
        a stale lock file gets its old content back and the folders the lock created are removed if still empty."""
        if self.fd < 0:
            return
        try:
            if failed and self.stale is not None:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, self.stale, 0)
            else:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1
        if failed:
            for folder in self.created:
                try:
                    folder.rmdir()
                except OSError:
                    break

    def __del__(self) -> None:  # a Trainer dropped without fit(): the lock ends with it
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)


def _lock(fd: int, out: Path) -> None:
    """``flock`` without waiting; a held lock is a :class:`RunFolderError` naming the holder (the file's content)."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise RunFolderError(f"--out {out} is in use by another coopnets run ({_read_holder(fd)}); wait for it to end "
                             f"or choose another --out.") from None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except (OSError, AttributeError):
        text = ""
    return text or "its pid is not recorded yet"


def check_claimable(out: Path) -> None:
    """Refuse, changing nothing, an ``out`` that is not a run folder (:func:`check_owned`) or that another run holds."""
    check_owned(out)
    RunLock.check_free(out)
