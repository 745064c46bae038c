"""kdistill.checkpoint directly: atomic writes, safetensors weights, training states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdistill.checkpoint import (
    KEEP,
    atomic_write_json,
    latest_training_state,
    load_training_state,
    load_weights,
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
