"""npz and csv sources: round trips, layouts, label encoding and the errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.data import build
from kdistill.errors import DataError
from kdistill.recipe import DataConfig


def _npz(folder: Path, train: dict, test: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", **train)
    np.savez(folder / "test.npz", **test)
    return folder


def _csv(folder: Path, train: str, test: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.csv").write_text(train)
    (folder / "test.csv").write_text(test)
    return folder


def _build(folder: Path, source: str, **settings) -> object:
    settings.setdefault("val_fraction", 0)
    return build(DataConfig(source=source, path=str(folder), **settings))


def _rows(x: torch.Tensor) -> list[list[float]]:
    return sorted(x.tolist())


def _error(folder: Path, source: str, **settings) -> str:
    with pytest.raises(DataError) as info:
        _build(folder, source, **settings)
    return str(info.value)


# ----------------------------------------------------------------------------- npz


def test_npz_features_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 4)), rng.integers(0, 3, 50)
    tx, ty = rng.normal(size=(10, 4)), np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    folder = _npz(tmp_path, {"x": x, "y": y}, {"x": tx, "y": ty.astype(np.uint8)})
    bundle = _build(folder, "npz")
    assert bundle.train.x.dtype == torch.float32 and bundle.train.y.dtype == torch.int64
    torch.testing.assert_close(bundle.test.x, torch.from_numpy(tx).float())
    assert bundle.test.y.tolist() == ty.tolist()
    assert _rows(bundle.train.x) == _rows(torch.from_numpy(x).float())  # shuffled by the split
    assert bundle.class_names == ["0", "1", "2", "3"]  # max label over train and test, + 1
    assert bundle.input_shape == (4,)
    torch.testing.assert_close(bundle.mean, torch.from_numpy(x.mean(0)).float())
    torch.testing.assert_close(bundle.std, torch.from_numpy(x.std(0)).float())
    z = bundle.to_input(bundle.train.x)
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    assert [p.name for p in bundle.source_files] == ["train.npz", "test.npz"]


def test_npz_grayscale_images_get_a_channel(tmp_path: Path) -> None:
    x = np.arange(6 * 5 * 7, dtype=np.uint8).reshape(6, 5, 7)
    folder = _npz(tmp_path, {"x": x, "y": np.arange(6) % 2}, {"x": x[:2], "y": np.array([0, 1])})
    bundle = _build(folder, "npz")
    assert bundle.train.x.shape == (6, 1, 5, 7) and bundle.train.x.dtype == torch.uint8
    assert torch.equal(bundle.test.x[:, 0], torch.from_numpy(x[:2]))
    assert bundle.input_shape == (1, 5, 7)


def test_npz_channels_last_images_become_channels_first(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    folder = _npz(tmp_path, {"x": x, "y": np.arange(4) % 2}, {"x": x, "y": np.arange(4) % 2})
    bundle = _build(folder, "npz")
    assert bundle.test.x.shape == (4, 3, 8, 8)
    assert torch.equal(bundle.test.x, torch.from_numpy(x).permute(0, 3, 1, 2))


def test_npz_errors(tmp_path: Path) -> None:
    y = np.arange(4) % 2
    wrong_names = _npz(tmp_path / "a", {"features": np.zeros((4, 2)), "y": y}, {"x": 0, "y": y})
    message = _error(wrong_names, "npz")
    assert "train.npz" in message and "'x' and 'y'" in message and "['features', 'y']" in message

    float_images = _npz(tmp_path / "b", {"x": np.zeros((4, 5, 5)), "y": y}, {"x": 0, "y": y})
    assert "uint8" in _error(float_images, "npz")

    float_labels = _npz(tmp_path / "c", {"x": np.zeros((4, 2)), "y": y + 0.5}, {"x": 0, "y": y})
    assert "integer class labels" in _error(float_labels, "npz")

    shapes = _npz(tmp_path / "d", {"x": np.zeros((4, 2)), "y": y}, {"x": np.zeros((4, 3)), "y": y})
    assert "(2,)" in _error(shapes, "npz") and "(3,)" in _error(shapes, "npz")

    (tmp_path / "e").mkdir()
    np.savez(tmp_path / "e" / "train.npz", x=np.zeros((4, 2)), y=y)
    message = _error(tmp_path / "e", "npz")
    assert "test.npz is missing" in message and "train.npz" in message


def test_npz_non_finite_features_are_rejected(tmp_path: Path) -> None:
    x = np.zeros((4, 3))
    x[2, 1] = np.nan
    folder = _npz(tmp_path, {"x": x, "y": np.arange(4) % 2}, {"x": np.zeros((2, 3)), "y": [0, 1]})
    message = _error(folder, "npz")
    assert "train.npz" in message and "sample 2, feature 1" in message


def test_constant_feature_gets_unit_std(tmp_path: Path) -> None:
    x = np.stack([np.full(8, 5.0), np.arange(8.0)], axis=1)
    folder = _npz(tmp_path, {"x": x, "y": np.arange(8) % 2}, {"x": x + 1, "y": np.arange(8) % 2})
    bundle = _build(folder, "npz")
    assert bundle.std[0] == 1
    assert torch.isfinite(bundle.to_input(bundle.test.x)).all()


# ----------------------------------------------------------------------------- csv


def test_csv_round_trip_with_integer_labels(tmp_path: Path) -> None:
    folder = _csv(
        tmp_path,
        "a,label,b\n1.5,0,2\n-3,2,4e2\n0,1,1\n",
        "b,a,label\n7,8,3\n 9 ,10,0\n",  # another column order; label 3 only in test
    )
    bundle = _build(folder, "csv")
    assert bundle.test.x.tolist() == [[8.0, 7.0], [10.0, 9.0]]  # train's column order
    assert bundle.test.y.tolist() == [3, 0]
    pairs = sorted(zip(bundle.train.x.tolist(), bundle.train.y.tolist()))  # split shuffles
    assert pairs == [([-3.0, 400.0], 2), ([0.0, 1.0], 1), ([1.5, 2.0], 0)]
    assert bundle.class_names == ["0", "1", "2", "3"]
    assert bundle.input_shape == (2,)


def test_csv_string_labels_map_to_sorted_names(tmp_path: Path) -> None:
    folder = _csv(
        tmp_path,
        "x,species\n5,virginica\n",
        "x,species\n1,versicolor\n2,setosa\n3,virginica\n4,setosa\n",
    )
    bundle = _build(folder, "csv", label_column="species")
    assert bundle.class_names == ["setosa", "versicolor", "virginica"]
    assert bundle.test.y.tolist() == [1, 0, 2, 0] and bundle.train.y.tolist() == [2]


def test_csv_label_column_is_part_of_the_fingerprint(tmp_path: Path) -> None:
    folder = _csv(tmp_path, "a,b\n1,0\n2,1\n3,0\n", "a,b\n4,1\n")
    by_b = _build(folder, "csv", label_column="b")
    by_a = _build(folder, "csv", label_column="a")
    assert by_a.fingerprint != by_b.fingerprint


def test_csv_missing_label_column_lists_the_columns(tmp_path: Path) -> None:
    folder = _csv(tmp_path, "f1,f2,target\n1,2,0\n", "f1,f2,target\n1,2,0\n")
    message = _error(folder, "csv")
    assert "train.csv" in message and "'label'" in message
    assert "['f1', 'f2', 'target']" in message and "data.label_column" in message


def test_csv_non_numeric_value_names_file_row_and_column(tmp_path: Path) -> None:
    folder = _csv(tmp_path, "a,b,label\n1,2,0\n", "a,b,label\n1,2,0\n3,oops,1\n")
    message = _error(folder, "csv")
    assert "test.csv" in message and "row 2" in message and "line 3" in message
    assert "column 'b'" in message and "'oops'" in message


def test_csv_empty_value_is_not_a_number(tmp_path: Path) -> None:
    folder = _csv(tmp_path, "a,b,label\n1,,0\n", "a,b,label\n1,2,0\n")
    message = _error(folder, "csv")
    assert "train.csv" in message and "row 1" in message and "column 'b'" in message


def test_csv_errors_for_ragged_rows_and_mismatched_columns(tmp_path: Path) -> None:
    ragged = _csv(tmp_path / "a", "a,label\n1,0\n2\n", "a,label\n1,0\n")
    assert "line 3" in _error(ragged, "csv")
    other = _csv(tmp_path / "b", "a,b,label\n1,2,0\n", "a,c,label\n1,2,0\n")
    message = _error(other, "csv")
    assert "['b']" in message and "['c']" in message
    header_only = _csv(tmp_path / "c", "a,label\n", "a,label\n1,0\n")
    assert "no rows" in _error(header_only, "csv")


def test_csv_negative_label_is_out_of_range(tmp_path: Path) -> None:
    folder = _csv(tmp_path, "a,label\n1,0\n2,-2\n3,1\n", "a,label\n1,0\n")
    message = _error(folder, "csv")
    assert "train.csv" in message and "label -2" in message and "2 classes" in message
