"""kdistill.checkpoint directly: atomic writes, safetensors weights, training states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdistill.checkpoint import (
    CHECKSUMS,
    KEEP,
    atomic_write_json,
    file_sha256,
    latest_training_state,
    load_training_state,
    load_weights,
    restore_training_state,
    save_training_state,
    save_weights,
)
from kdistill.errors import CheckpointError


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_weights_round_trip_and_no_temporary_left(tmp_path: Path) -> None:
    a, b = _net(0), _net(1)
    save_weights(a, tmp_path / "w.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    load_weights(b, tmp_path / "w.safetensors")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])


def test_mismatched_weights_name_the_keys_and_shapes(tmp_path: Path) -> None:
    save_weights(_net(0), tmp_path / "w.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    with pytest.raises(CheckpointError, match=r"0.weight: checkpoint \(3, 4\) vs model \(5, 4\)"):
        load_weights(other, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"missing from checkpoint: 3\.bias"):
        load_weights(
            torch.nn.Sequential(*_net(0), torch.nn.Linear(2, 2)), tmp_path / "w.safetensors"
        )


def test_truncated_or_missing_weights_are_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(_net(0), path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        load_weights(_net(0), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(_net(0), tmp_path / "nothing.safetensors")


def test_training_states_keep_the_newest_two_and_round_trip(tmp_path: Path) -> None:
    net = _net(0)
    rng = torch.get_rng_state()
    for step in (3, 7, 12):
        save_training_state(tmp_path, step=step, model=net, state={"step": step, "rng": rng})
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert len(kept) == KEEP == 2 and kept == ["step-000000007", "step-000000012"]
    latest = latest_training_state(tmp_path)
    assert latest is not None and latest.name == "step-000000012"
    restored = _net(5)
    state = load_training_state(latest, restored)
    assert state["step"] == 12 and torch.equal(state["rng"], rng)
    assert torch.equal(restored[0].weight, net[0].weight)


def test_an_unfinished_temporary_folder_is_never_the_latest(tmp_path: Path) -> None:
    save_training_state(tmp_path, step=1, model=_net(0), state={})
    (tmp_path / "step-000000009.tmp").mkdir()  # a write killed half-way
    latest = latest_training_state(tmp_path)
    assert latest is not None and latest.name == "step-000000001"
    assert latest_training_state(tmp_path / "none") is None


def test_a_damaged_state_file_says_which_checkpoint_to_delete(tmp_path: Path) -> None:
    folder = save_training_state(tmp_path, step=2, model=_net(0), state={"a": 1})
    (folder / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=f"delete {folder}"):
        load_training_state(folder, _net(0))


def test_atomic_json_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert path.read_text() == '{\n  "x": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def _two_states(folder: Path) -> list[Path]:
    return [
        save_training_state(folder, step=step, model=_net(step), state={"step": step})
        for step in (10, 20)
    ]


def test_a_checkpoint_records_the_checksum_of_each_file(tmp_path: Path) -> None:
    folder = save_training_state(tmp_path, step=1, model=_net(0), state={"a": 1})
    sums = json.loads((folder / CHECKSUMS).read_text())
    assert sums == {name: file_sha256(folder / name) for name in ("model.safetensors", "state.pt")}


def test_resume_skips_a_truncated_newest_checkpoint_and_moves_it_aside(tmp_path: Path) -> None:
    older, newest = _two_states(tmp_path)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # a write cut short by a full disk
    model = _net(99)
    restored = restore_training_state(tmp_path, model)
    assert restored is not None and restored.path == older and restored.state == {"step": 10}
    assert torch.equal(model[0].weight, _net(10)[0].weight)
    assert len(restored.skipped) == 1
    assert "step-000000020 (model.safetensors does not match its checksum" in restored.skipped[0]
    assert "moved to step-000000020.damaged" in restored.skipped[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000000010",
        "step-000000020.damaged",
    ]
    assert latest_training_state(tmp_path) == older
    # the next checkpoint written prunes by step folders only: the damaged one stays
    save_training_state(tmp_path, step=30, model=model, state={})
    save_training_state(tmp_path, step=40, model=model, state={})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000000020.damaged",
        "step-000000030",
        "step-000000040",
    ]


def test_a_changed_state_file_or_a_missing_file_is_skipped_too(tmp_path: Path) -> None:
    older, newest = _two_states(tmp_path)
    (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes() + b"x")
    (older / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        restore_training_state(tmp_path, _net(0))
    message = str(info.value)
    assert f"no intact checkpoint in {tmp_path}" in message
    assert "step-000000020 (state.pt does not match its checksum" in message
    assert "step-000000010 (model.safetensors missing" in message
    assert f"Delete {tmp_path.parent} to train this stage afresh" in message


def test_a_checkpoint_without_checksums_is_judged_by_loading_it(tmp_path: Path) -> None:
    older, newest = _two_states(tmp_path)
    (older / CHECKSUMS).unlink()
    (newest / CHECKSUMS).unlink()
    (newest / "state.pt").write_bytes(b"not a torch file")
    restored = restore_training_state(tmp_path, _net(0))
    assert restored is not None and restored.path == older
    assert "cannot be loaded" in restored.skipped[0]


def test_no_checkpoint_at_all_is_not_an_error(tmp_path: Path) -> None:
    assert restore_training_state(tmp_path / "none", _net(0)) is None
    assert restore_training_state(tmp_path, _net(0)) is None
