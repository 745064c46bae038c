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

    int_images = np.zeros((4, 5, 5), dtype=np.int64)
    int_images = _npz(tmp_path / "b", {"x": int_images, "y": y}, {"x": 0, "y": y})
    assert "x.astype(np.uint8)" in _error(int_images, "npz")

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


# ------------------------------------------------------------------ npz float images


def _images(seed: int, shape: tuple[int, ...] = (6, 8, 8, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _labels(n: int) -> np.ndarray:
    return np.arange(n) % 2


def _same_tensors(a: object, b: object) -> None:
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x), split
        assert torch.equal(getattr(a, split).y, getattr(b, split).y), split
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    torch.testing.assert_close(a.std, b.std, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_npz_float_images_in_unit_range_read_as_their_uint8_version(
    tmp_path: Path, dtype: type
) -> None:
    train, test = _images(0), _images(1, (4, 8, 8, 3))
    as_uint8 = _npz(tmp_path / "u", {"x": train, "y": _labels(6)}, {"x": test, "y": _labels(4)})
    unit = {"x": (train / 255).astype(dtype), "y": _labels(6)}
    as_float = _npz(tmp_path / "f", unit, {"x": (test / 255).astype(dtype), "y": _labels(4)})
    expected = _build(as_uint8, "npz", val_fraction=0.5)
    got = _build(as_float, "npz", val_fraction=0.5)
    assert got.train.x.dtype == torch.uint8 and got.input_shape == (3, 8, 8)
    _same_tensors(got, expected)


def test_npz_float_images_in_pixel_range_are_rounded(tmp_path: Path) -> None:
    train, test = _images(2, (6, 5, 7)), _images(3, (4, 5, 7))
    as_uint8 = _npz(tmp_path / "u", {"x": train, "y": _labels(6)}, {"x": test, "y": _labels(4)})
    # off by up to 0.4 of a level, and clipped to [0, 255] so the range stays the same
    noise = np.random.default_rng(4).uniform(-0.4, 0.4, train.shape)
    noisy = np.clip(train + noise, 0, 255).astype(np.float32)
    as_float = _npz(
        tmp_path / "f", {"x": noisy, "y": _labels(6)}, {"x": test.astype(float), "y": _labels(4)}
    )
    _same_tensors(_build(as_float, "npz"), _build(as_uint8, "npz"))


def test_npz_float_image_range_is_decided_over_train_and_test(tmp_path: Path) -> None:
    """Dark test images (every value 0 or 1) are read as pixels 0-255, like the train
    file, instead of being scaled by 255 on their own."""
    train = _images(5, (6, 4, 4)).astype(np.float32)
    dark = (np.arange(4 * 4 * 4).reshape(4, 4, 4) % 2).astype(np.float32)
    folder = _npz(tmp_path, {"x": train, "y": _labels(6)}, {"x": dark, "y": _labels(4)})
    bundle = _build(folder, "npz")
    assert torch.equal(bundle.test.x[:, 0], torch.from_numpy(dark.astype(np.uint8)))
    unit = _npz(
        tmp_path / "unit", {"x": train / 255, "y": _labels(6)}, {"x": dark, "y": _labels(4)}
    )
    assert int(_build(unit, "npz").test.x.max()) == 255  # here both files are in [0, 1]


@pytest.mark.parametrize(
    ("part", "bad", "found"),
    [
        ("train", np.nan, ["1 NaN or infinite values", "min 0, max 1"]),
        ("test", np.inf, ["1 NaN or infinite values", "max inf"]),
        ("train", -0.5, ["from -0.5 to 1", "Undo any normalisation"]),
        ("test", 300.0, ["from 0 to 300", "[0, 255]"]),
    ],
)
def test_npz_float_images_out_of_range_are_refused(
    tmp_path: Path, part: str, bad: float, found: list[str]
) -> None:
    x = {name: np.linspace(0, 1, 4 * 3 * 3).reshape(4, 3, 3) for name in ("train", "test")}
    x[part][1, 2, 0] = bad
    folder = _npz(tmp_path, {"x": x["train"], "y": _labels(4)}, {"x": x["test"], "y": _labels(4)})
    message = _error(folder, "npz")
    assert str(folder / f"{part}.npz") in message and "float images" in message
    for fragment in found:
        assert fragment in message, (fragment, message)


def test_npz_two_dimensional_float_x_stays_features(tmp_path: Path) -> None:
    x = np.array([[-3.5, 300.25], [0.5, 1.0], [2.0, -1e6], [7.0, 0.0]])
    folder = _npz(tmp_path, {"x": x, "y": _labels(4)}, {"x": x, "y": _labels(4)})
    bundle = _build(folder, "npz")
    assert bundle.test.x.dtype == torch.float32 and bundle.input_shape == (2,)
    torch.testing.assert_close(bundle.test.x, torch.from_numpy(x).float())


# ------------------------------------------------------------------- explicit files


def _files(cfg_source: str, data_dir: Path | None = None, **settings) -> object:
    settings.setdefault("val_fraction", 0)
    return build(DataConfig(source=cfg_source, **settings), data_dir)


def test_npz_train_and_test_files_read_like_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    train = {"x": rng.normal(size=(12, 3)), "y": np.arange(12) % 3}
    test = {"x": rng.normal(size=(5, 3)), "y": np.arange(5) % 3}
    folder = _npz(tmp_path / "folder", train, test)
    root, here = tmp_path / "root", tmp_path / "here"
    (root / "arrays").mkdir(parents=True)
    here.mkdir()
    np.savez(root / "arrays" / "fit_me.npz", **train)  # found in the data folder
    np.savez(here / "held_out.npz", **test)  # found in the current directory
    monkeypatch.chdir(here)

    expected = _build(folder, "npz")
    got = _files("npz", root, train="arrays/fit_me.npz", test="held_out.npz")
    _same_tensors(got, expected)
    assert got.source_files == [root / "arrays" / "fit_me.npz", here / "held_out.npz"]
    assert got.fingerprint == expected.fingerprint  # content, not names or places
    absolute = _files(
        "npz", tmp_path, train=str(folder / "train.npz"), test=str(here / "held_out.npz")
    )
    assert absolute.fingerprint == expected.fingerprint
    swapped = _files("npz", root, train="held_out.npz", test="arrays/fit_me.npz")
    assert swapped.fingerprint != expected.fingerprint  # which file is which part counts


def test_csv_train_and_test_files_read_like_the_folder(tmp_path: Path) -> None:
    train, test = "a,kind\n1,x\n2,y\n3,x\n", "kind,a\ny,4\n"
    folder = _csv(tmp_path / "folder", train, test)
    (tmp_path / "train_rows.csv").write_text(train)
    (tmp_path / "test_rows.csv").write_text(test)
    settings = {"label_column": "kind", "val_fraction": 0}
    expected = _build(folder, "csv", **settings)
    got = _files(
        "csv",
        tmp_path / "nowhere",
        train=str(tmp_path / "train_rows.csv"),
        test=str(tmp_path / "test_rows.csv"),
        **settings,
    )
    _same_tensors(got, expected)
    assert got.class_names == ["x", "y"] and got.fingerprint == expected.fingerprint
    assert [p.name for p in got.source_files] == ["train_rows.csv", "test_rows.csv"]


def test_a_missing_train_or_test_file_names_the_field_and_what_was_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    (root / "arrays").mkdir(parents=True)
    np.savez(root / "arrays" / "train.npz", x=np.zeros((4, 2)), y=_labels(4))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        _files("npz", root, train="arrays/train.npz", test="arrays/tset.npz")
    message = str(info.value)
    assert message.startswith("data.test 'arrays/tset.npz' (source 'npz') is not a file")
    assert str(tmp_path / "arrays" / "tset.npz") in message
    assert str(root / "arrays" / "tset.npz") in message
    assert "Give an .npz file with arrays x" in message and "then the data folder" in message

    with pytest.raises(DataError) as info:  # a folder where a file belongs
        _files("csv", root, train="arrays", test="arrays/train.npz")
    message = str(info.value)
    assert message.startswith("data.train 'arrays' (source 'csv') is not a file")
    assert f"{root / 'arrays'} is a folder" in message and "as data.path" in message
    assert "a .csv file with a header row" in message


def test_a_folder_without_the_conventional_names_points_to_train_and_test(
    tmp_path: Path,
) -> None:
    _csv(tmp_path, "a,label\n1,0\n", "a,label\n1,0\n")
    (tmp_path / "train.csv").rename(tmp_path / "fit.csv")
    message = _error(tmp_path, "csv")
    assert "train.csv is missing" in message and "data.train and data.test" in message
    with pytest.raises(DataError, match=r"data\.path is required.*data\.train and data\.test"):
        build(DataConfig(source="npz"), tmp_path)


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
