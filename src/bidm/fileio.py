"""Writing files safely: atomically, with normal permissions, and without leaving temp files behind.

Every file bidm writes goes through `atomic_write`: the data goes to a temp file in the target's directory, is
fsynced and renamed over the target, so a reader (or a later resume) sees either the old file or the new one,
never half of one. Temp files are named ``.<target>.<pid>-<random>.tmp``: a write killed with SIGKILL leaves one
behind, and the next write into that directory removes every such file whose writer process is gone. Files get the
permissions of any other file the user creates (``0666 & ~umask``, usually 0644), not mkstemp's private 0600. An
``OSError`` (a full disk, a read-only directory) becomes a one-line `WriteError` naming the file; the previous
file is kept.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bidm.errors import BidmError

TEMP_PATTERN = re.compile(r"^\..+\.(\d+)-[A-Za-z0-9_]+\.tmp$")
LEGACY_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$|^.+\.tmp\.npz$")  # temp names of bidm < issue 14
LEGACY_TEMP_AGE_S = 3600.0  # their writer's PID is unknown: only ones this old are taken as abandoned


class WriteError(BidmError, OSError):
    """A file could not be written (disk full, no permission, ...); the previous version of it is kept."""

    def __init__(self, message: str):
        BidmError.__init__(self, message)


def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists (ours, or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def remove_stale_temps(directory: Path, now: float | None = None) -> list[Path]:
    """Delete temp files of killed writes in ``directory``: ours whose PID is gone, legacy ones older than an hour."""
    removed = []
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_PATTERN.match(entry.name)
        if match:
            stale = int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1)))
        elif LEGACY_TEMP.match(entry.name):
            try:
                stale = now - entry.stat().st_mtime > LEGACY_TEMP_AGE_S
            except OSError:
                continue
        else:
            continue
        if stale and entry.is_file(follow_symlinks=False):
            try:
                os.remove(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(temp_path)`` and move the result onto ``path`` atomically (see the module docstring).

    ``write`` must write to exactly the path it is given (``np.savez`` appends ``.npz`` to a name without it: give
    it an open file instead).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or err} (the previous file, if any, is kept)") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())
