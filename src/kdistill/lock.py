"""One process at a time in a run folder.

`run` and `cache` hold `<run>/run.lock` for as long as they write into the folder: an
OS-level lock (`fcntl.flock`) on that file, which also records who holds it (pid,
host, command, start time). A second process is refused at once, with the holder
named. The operating system drops the lock when its process dies however it dies, so
a lock file left by a killed run holds no lock: the next run takes it over and says
so. Where `flock` does not exist (Windows), the recorded pid is checked instead. A
folder that was empty and got nothing but the lock (the command failed before writing)
is left as it was found.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from kdistill.errors import RunDirError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK = "run.lock"


@contextmanager
def hold_folder(run_dir: Path, *, note: Any = None) -> Iterator[dict[str, Any] | None]:
    """Hold `run_dir`'s lock for the block (creating the folder). Yields the record of a
    stale lock taken over (a holder that is gone), else None; `note(text)` is told of
    it. A live holder is a RunDirError naming it."""
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    was_empty = not any(run_dir.iterdir())
    handle = open(run_dir / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held for the block)
    try:
        previous = _read(handle)
        if not _lock(handle, previous):
            raise _busy(run_dir, previous)
        stale = previous if previous and not previous.get("released") else None
        if stale is not None and note is not None:
            note(
                f"{run_dir}: took over the lock of a kdistill process that is gone "
                f"({_describe(stale)})"
            )
        record = _record()
        _write(handle, record)
        try:
            yield stale
        finally:
            # the OS lock is what counts; a note that cannot be written (full disk) is skipped
            with contextlib.suppress(OSError):
                _write(handle, {**record, "released": _now()})
            if was_empty and [p.name for p in run_dir.iterdir()] == [LOCK]:
                # nothing was written (a recipe or data error): leave no trace
                (run_dir / LOCK).unlink()
                if made:
                    run_dir.rmdir()
    finally:
        handle.close()  # drops the OS lock


def check_free(run_dir: Path) -> None:
    """Refuse now when another process holds `run_dir` (as `hold_folder` would, later):
    the command line calls this before it imports torch, so a second command into a
    busy folder ends in well under a second. Holds nothing."""
    path = run_dir / LOCK
    if not path.is_file():
        return
    with open(path, "a+", encoding="utf-8") as handle:
        previous = _read(handle)
        if not _lock(handle, previous):
            raise _busy(run_dir, previous)


def _lock(handle: TextIO, previous: dict[str, Any] | None) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    # no flock: a recorded holder on this host whose process is alive holds the folder
    return not (
        previous
        and not previous.get("released")
        and previous.get("host") == socket.gethostname()
        and _alive(int(previous.get("pid", -1)))
    )


def _busy(run_dir: Path, holder: dict[str, Any] | None) -> RunDirError:
    return RunDirError(
        f"output folder {run_dir} is in use by another kdistill process "
        f"({_describe(holder)}); wait for it to finish, or choose another --output-dir"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv[:3]),
        "since": _now(),
    }


def _read(handle: TextIO) -> dict[str, Any] | None:
    handle.seek(0)
    try:
        record = json.loads(handle.read() or "null")
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _write(handle: TextIO, record: dict[str, Any]) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(record) + "\n")
    handle.flush()


def _describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "holder unknown"
    return (
        f"pid {record.get('pid', '?')} on {record.get('host', '?')}, "
        f"`{record.get('command', '?')}` since {record.get('since', '?')}"
    )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
