"""The run-folder lock (kdistill.lock): one process at a time, stale locks taken over."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kdistill.errors import RunDirError
from kdistill.lock import LOCK, hold_folder
from kdistill.stages import claim_run_dir


def test_a_held_folder_is_refused_with_its_holder_named(tmp_path: Path) -> None:
    with hold_folder(tmp_path / "run"):
        (tmp_path / "run" / "run.json").write_text("{}")  # what a run writes
        record = json.loads((tmp_path / "run" / LOCK).read_text())
        assert record["pid"] == os.getpid() and "released" not in record
        holder = f"in use by another kdistill process .*pid {os.getpid()}"
        with pytest.raises(RunDirError, match=holder), hold_folder(tmp_path / "run"):
            pass  # pragma: no cover
    record = json.loads((tmp_path / "run" / LOCK).read_text())
    assert record["released"]
    with hold_folder(tmp_path / "run") as stale:  # released: free again, nothing taken over
        assert stale is None


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    left = {"pid": 2**22 + 7, "host": "elsewhere", "command": "kdistill run r.yaml", "since": "x"}
    (folder / LOCK).write_text(json.dumps(left))
    notes: list[str] = []
    with hold_folder(folder, note=notes.append) as stale:
        assert stale == left
        assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and "took over" in notes[0] and "kdistill run r.yaml" in notes[0]


def test_the_lock_file_alone_does_not_make_a_folder_a_foreign_one(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with hold_folder(folder):
        claim_run_dir(folder, resume=False, overwrite=False)  # empty but for run.lock
        (folder / "stray.txt").write_text("not a run")
        with pytest.raises(RunDirError, match="not empty and holds no kdistill run"):
            claim_run_dir(folder, resume=False, overwrite=False)
        claim_run_dir(folder, resume=False, overwrite=True)  # clears all but the lock
        assert [p.name for p in folder.iterdir()] == [LOCK]


def test_a_folder_that_got_nothing_but_the_lock_is_left_as_it_was(tmp_path: Path) -> None:
    """A command that fails before writing (a recipe or data error) leaves no trace."""
    new = tmp_path / "new"
    with pytest.raises(ValueError), hold_folder(new):
        raise ValueError("bad data")
    assert not new.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with hold_folder(empty):
        pass
    assert empty.is_dir() and not any(empty.iterdir())
