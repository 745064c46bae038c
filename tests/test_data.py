"""data.build: MNIST from the idx files, the validation split, limits, statistics,
fingerprint, the data folder, and the errors for damaged or missing files."""

from __future__ import annotations

import gzip
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.data import SOURCES, Split, _split_validation, build, mnist, resolve_data_root
from kdistill.errors import DataError
from kdistill.recipe import DataConfig

MNIST_FILES = list(mnist.FILES)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network; a test that needs a download replaces this."""

    def refuse(url: str, timeout: float) -> bytes:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(mnist, "_fetch_url", refuse)


@pytest.fixture(scope="module")
def mnist_bundle(shared_data: Path):
    return build(DataConfig(source="mnist", val_fraction=0.1, split_seed=0), shared_data)


def _write_npz(folder: Path, train_y: np.ndarray, test_y: np.ndarray, features: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(folder / "train.npz", x=rng.normal(size=(len(train_y), features)), y=train_y)
    np.savez(folder / "test.npz", x=rng.normal(size=(len(test_y), features)), y=test_y)
    return folder


@pytest.fixture
def npz_folder(tmp_path: Path) -> Path:
    return _write_npz(tmp_path / "toy", np.arange(100) % 4, np.arange(20) % 4)


def _mnist_copy(shared_data: Path, root: Path, replace: dict[str, bytes] | None = None) -> Path:
    """A data folder whose mnist/ links to the real files, except those in `replace`."""
    folder = root / "mnist"
    folder.mkdir(parents=True)
    for name in MNIST_FILES:
        if replace and name in replace:
            (folder / name).write_bytes(replace[name])
        else:
            (folder / name).symlink_to(shared_data / "mnist" / name)
    return root


def _mnist_error(root: Path) -> str:
    with pytest.raises(DataError) as info:
        build(DataConfig(source="mnist"), root)
    return str(info.value)


# ----------------------------------------------------------------------- MNIST, real


def test_sources_table_matches_the_recipe_schema() -> None:
    from kdistill.data.text_task import TEXT_SOURCES

    allowed = DataConfig.model_fields["source"].annotation.__args__  # Literal[...]
    assert set(SOURCES) | set(TEXT_SOURCES) == set(allowed)
    assert not set(SOURCES) & set(TEXT_SOURCES)


def test_mnist_shapes_counts_and_labels(mnist_bundle) -> None:
    b = mnist_bundle
    assert (len(b.train), len(b.val), len(b.test)) == (54000, 6000, 10000)
    assert b.train.x.shape == (54000, 1, 28, 28) and b.train.x.dtype == torch.uint8
    assert b.test.x.shape == (10000, 1, 28, 28) and b.test.y.dtype == torch.int64
    assert b.input_shape == (1, 28, 28)
    assert b.num_classes == 10 and b.class_names == [str(d) for d in range(10)]
    for split in (b.train, b.val, b.test):
        assert int(split.y.min()) == 0 and int(split.y.max()) == 9
    # published facts about the original files (shared/data/mnist/README.md)
    assert b.test.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(b.test.y).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    train_counts = torch.bincount(torch.cat([b.train.y, b.val.y])).tolist()
    assert train_counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert [p.name for p in b.source_files] == MNIST_FILES


def test_mnist_statistics_and_model_input(mnist_bundle) -> None:
    b = mnist_bundle
    # the well-known full-train values are 0.1307 and 0.3081; 90% of train is close
    assert b.mean.shape == b.std.shape == (1,)
    assert abs(float(b.mean) - 0.1307) < 0.002 and abs(float(b.std) - 0.3081) < 0.002
    x = b.to_input(b.train.x[:5000])
    assert x.dtype == torch.float32 and x.shape == (5000, 1, 28, 28)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
    expected = (b.train.x[:5].float() / 255 - b.mean) / b.std
    torch.testing.assert_close(b.to_input(b.train.x[:5]), expected)


def test_mnist_split_is_seeded_and_disjoint(mnist_bundle, shared_data: Path) -> None:
    same = build(DataConfig(source="mnist", val_fraction=0.1, split_seed=0), shared_data)
    other = build(DataConfig(source="mnist", val_fraction=0.1, split_seed=1), shared_data)
    assert torch.equal(same.val.x, mnist_bundle.val.x) and torch.equal(
        same.val.y, mnist_bundle.val.y
    )
    assert same.fingerprint == mnist_bundle.fingerprint
    assert not torch.equal(other.val.x, mnist_bundle.val.x)
    assert other.fingerprint != mnist_bundle.fingerprint


def test_validation_split_is_a_partition() -> None:
    full = Split(torch.arange(1000).view(-1, 1).float(), torch.arange(1000))
    train, val = _split_validation(full, 0.1, seed=3)
    assert (len(train), len(val)) == (900, 100)
    ids = torch.cat([train.y, val.y])
    assert torch.equal(ids.sort().values, torch.arange(1000))  # disjoint and complete
    assert torch.equal(train.x[:, 0].long(), train.y)  # samples keep their labels
    assert not torch.equal(val.y.sort().values, torch.arange(900, 1000))  # shuffled, not a tail


def test_limits_take_the_first_samples(mnist_bundle, shared_data: Path) -> None:
    cfg = DataConfig(source="mnist", val_fraction=0.1, limit_train=1000, limit_test=500)
    small = build(cfg, shared_data)
    assert (len(small.train), len(small.val), len(small.test)) == (1000, 6000, 500)
    assert torch.equal(small.train.x, mnist_bundle.train.x[:1000])
    assert torch.equal(small.val.y, mnist_bundle.val.y)  # limits do not move the split
    assert torch.equal(small.test.y, mnist_bundle.test.y[:500])
    assert small.fingerprint != mnist_bundle.fingerprint
    fewer_val = build(cfg.model_copy(update={"limit_val": 200}), shared_data)
    assert len(fewer_val.val) == 200 and torch.equal(fewer_val.val.y, mnist_bundle.val.y[:200])
    assert torch.equal(fewer_val.train.x, small.train.x)  # the split itself does not move
    assert fewer_val.fingerprint not in (small.fingerprint, mnist_bundle.fingerprint)


# ---------------------------------------------------------------- MNIST, bad files


def test_truncated_gzip_names_the_file_and_sizes(shared_data: Path, tmp_path: Path) -> None:
    name = "t10k-images-idx3-ubyte.gz"
    whole = (shared_data / "mnist" / name).read_bytes()
    root = _mnist_copy(shared_data, tmp_path, {name: whole[: len(whole) // 2]})
    message = _mnist_error(root)
    assert str(root / "mnist" / name) in message
    assert "824,438 bytes" in message and "1,648,877 bytes" in message  # found, expected
    assert "Delete" in message


def test_empty_file(shared_data: Path, tmp_path: Path) -> None:
    name = "train-labels-idx1-ubyte.gz"
    message = _mnist_error(_mnist_copy(shared_data, tmp_path, {name: b""}))
    assert name in message and "empty" in message and "28,881 bytes" in message


def test_wrong_magic_number(shared_data: Path, tmp_path: Path) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress((shared_data / "mnist" / name).read_bytes()))
    raw[2:4] = (2051).to_bytes(2, "big")  # an image file's magic in a label file
    message = _mnist_error(_mnist_copy(shared_data, tmp_path, {name: gzip.compress(bytes(raw))}))
    assert name in message and "magic number 2049" in message and "found 2051" in message


def test_payload_shorter_than_header_says(shared_data: Path, tmp_path: Path) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress((shared_data / "mnist" / name).read_bytes())
    short = gzip.compress(raw[:-10])
    message = _mnist_error(_mnist_copy(shared_data, tmp_path, {name: short}))
    assert name in message and "expected 10,008 bytes" in message and "found 9,998" in message


def test_changed_content_fails_the_checksum(shared_data: Path, tmp_path: Path) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress((shared_data / "mnist" / name).read_bytes()))
    raw[8] = 3 if raw[8] != 3 else 4  # a valid label, a different file
    message = _mnist_error(_mnist_copy(shared_data, tmp_path, {name: gzip.compress(bytes(raw))}))
    assert name in message and "corrupt" in message and "sha256" in message


# --------------------------------------------------------------- MNIST, downloading


def test_missing_files_without_network_say_where_and_what(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    message = _mnist_error(root)
    assert str(root / "mnist") in message
    for name in MNIST_FILES:
        assert name in message
    assert "network disabled" in message
    assert "--data-dir" in message and "KDISTILL_DATA" in message


def test_download_writes_verified_files(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = []

    def fake_fetch(url: str, timeout: float) -> bytes:
        urls.append(url)
        assert timeout <= 30
        return (shared_data / "mnist" / url.rsplit("/", 1)[1]).read_bytes()

    monkeypatch.setattr(mnist, "_fetch_url", fake_fetch)
    root = tmp_path / "fresh"
    bundle = build(DataConfig(source="mnist", limit_train=10, limit_test=10), root)
    assert urls == [mnist.MIRROR + name for name in MNIST_FILES]
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(MNIST_FILES)  # no .part
    assert len(bundle.test) == 10

    urls.clear()
    build(DataConfig(source="mnist", limit_train=10, limit_test=10), root)
    assert urls == []  # present files are not fetched again


def test_download_with_wrong_checksum_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mnist, "_fetch_url", lambda url, timeout: b"<html>captive portal</html>")
    message = _mnist_error(tmp_path)
    assert "sha256" in message and mnist.MIRROR in message
    assert not (tmp_path / "mnist").exists() or not any((tmp_path / "mnist").iterdir())


# ------------------------------------------------------------ data folder, user paths


def test_data_root_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv("KDISTILL_DATA", str(env))
    assert resolve_data_root(explicit) == (explicit, [explicit])
    assert resolve_data_root(None) == (env, [env])
    monkeypatch.delenv("KDISTILL_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    default = tmp_path / ".cache" / "kdistill" / "data"
    assert resolve_data_root(None) == (None, [default])  # not there yet
    default.mkdir(parents=True)
    assert resolve_data_root(None) == (default, [default])
    # an explicit folder that does not exist is not replaced by another one
    assert resolve_data_root(tmp_path / "typo") == (None, [tmp_path / "typo"])


def test_relative_path_prefers_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, here = tmp_path / "root", tmp_path / "here"
    _write_npz(root / "toy", np.arange(10) % 2, np.arange(4) % 2)
    _write_npz(here / "toy", np.arange(12) % 2, np.arange(4) % 2)
    monkeypatch.chdir(here)
    assert len(build(DataConfig(source="npz", path="toy", val_fraction=0), root).train) == 12
    monkeypatch.chdir(tmp_path)
    assert len(build(DataConfig(source="npz", path="toy", val_fraction=0), root).train) == 10


def test_missing_user_path_lists_what_was_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        build(DataConfig(source="npz", path="nope"), tmp_path / "root")
    message = str(info.value)
    assert str(tmp_path / "nope") in message and str(tmp_path / "root" / "nope") in message
    with pytest.raises(DataError, match=r"data\.path is required"):
        build(DataConfig(source="csv"), tmp_path)


# --------------------------------------------------------------- split, fingerprint


def test_zero_val_fraction_gives_an_empty_val_split(npz_folder: Path) -> None:
    bundle = build(DataConfig(source="npz", path=str(npz_folder), val_fraction=0))
    assert len(bundle.train) == 100
    assert bundle.val.x.shape == (0, 3) and bundle.val.y.shape == (0,)


def test_validation_size_is_rounded(npz_folder: Path) -> None:
    bundle = build(DataConfig(source="npz", path=str(npz_folder), val_fraction=0.126))
    assert (len(bundle.train), len(bundle.val)) == (87, 13)


def test_no_train_left_is_an_error(tmp_path: Path) -> None:
    folder = _write_npz(tmp_path / "two", np.array([0, 1]), np.array([0]))
    with pytest.raises(DataError, match="no training samples are left"):
        build(DataConfig(source="npz", path=str(folder), val_fraction=0.9))  # round(1.8) = 2


def test_fingerprint_follows_content_and_settings(npz_folder: Path, tmp_path: Path) -> None:
    def fingerprint(folder: Path = npz_folder, **settings) -> str:
        return build(DataConfig(source="npz", path=str(folder), **settings)).fingerprint

    base = fingerprint()
    assert fingerprint() == base
    assert len(base) == 64 and int(base, 16) >= 0
    changed = [
        fingerprint(split_seed=1),
        fingerprint(val_fraction=0.2),
        fingerprint(limit_train=10),
        fingerprint(limit_test=10),
        fingerprint(limit_val=5),
    ]
    assert len({base, *changed}) == 6
    moved = tmp_path / "moved"
    shutil.copytree(npz_folder, moved)
    assert fingerprint(moved) == base  # content, not location
    _write_npz(moved, np.arange(100) % 4, np.arange(20) % 3)
    assert fingerprint(moved) != base


def test_labels_out_of_range_name_file_value_and_class_count(tmp_path: Path) -> None:
    folder = _write_npz(tmp_path / "bad", np.array([0, 1, 2, -1, 1]), np.array([0, 1]))
    with pytest.raises(DataError) as info:
        build(DataConfig(source="npz", path=str(folder)))
    message = str(info.value)
    assert str(folder / "train.npz") in message and "label -1" in message
    assert "3 classes" in message
