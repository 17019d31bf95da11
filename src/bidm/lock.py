"""An exclusive lock on a run directory, so two trainings never write one run.

`RunLock(dir)` creates ``dir/run.lock`` holding the owner's PID and host and takes an exclusive, non-blocking
``flock`` on it. A second `bidm train`/`binarize` (or `--resume`) into the same directory fails at once with a
`RunLocked` error naming the holder's PID. The kernel drops a flock when its process dies (even by SIGKILL), so the
lock file of a dead run is stale by construction: the next run takes it over. On systems without ``fcntl`` the
file alone is the lock and a stale one is taken over when its PID is no longer running.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from bidm.errors import BidmError
from bidm.fileio import file_mode, pid_alive

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = "run.lock"


class RunLocked(BidmError):
    """Another live process holds the run directory."""


def read_holder(path: Path) -> tuple[int | None, str]:
    """(PID, host) written in a lock file; (None, "") when it is unreadable."""
    try:
        fields = path.read_text().split()
        return int(fields[0]), (fields[1] if len(fields) > 1 else "")
    except (OSError, ValueError, IndexError):
        return None, ""


class RunLock:
    """Context manager holding ``directory/run.lock`` exclusively; see the module docstring."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def _refuse(self) -> None:
        pid, host = read_holder(self.path)
        who = f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "") if pid else "a process"
        raise RunLocked(
            f"run directory {self.directory} is in use by {who} (lock {self.path}); wait for that run to finish "
            "or stop it, or use another --out"
        )

    def acquire(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # retried only when the file was replaced between open and lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        self._refuse()
                else:  # pragma: no cover - no flock: the PID in the file decides
                    pid, _ = read_holder(self.path)
                    if pid and pid != os.getpid() and pid_alive(pid):
                        self._refuse()
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # the previous holder removed it after we opened it: lock the new file instead
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                self._fd = fd
                return self
            except BaseException:
                if self._fd is None:
                    os.close(fd)
                raise
        raise RunLocked(f"could not lock {self.path}: it keeps being replaced by another process")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
