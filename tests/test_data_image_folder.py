"""image_folder source: layout, decoding, order, and the errors for inconsistent folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdistill.data import build
from kdistill.errors import DataError
from kdistill.recipe import DataConfig


def _image(seed: int, size: tuple[int, int] = (6, 4), mode: str = "RGB") -> Image.Image:
    width, height = size
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels)  # mode from the shape


def _folder(root: Path, layout: dict[str, dict[str, list[str]]], **image_args) -> Path:
    """layout: split -> class -> file names; each file gets its own random pixels."""
    for split, classes in layout.items():
        for name, files in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for file in files:
                seed = int(hashlib.sha256(f"{split}/{name}/{file}".encode()).hexdigest()[:8], 16)
                _image(seed, **image_args).save(root / split / name / file)
    return root


def _pixels(path: Path) -> torch.Tensor:
    array = np.array(Image.open(path))  # (H, W) or (H, W, C)
    return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())


def _build(folder: Path, **settings):
    settings.setdefault("val_fraction", 0)
    return build(DataConfig(source="image_folder", path=str(folder), **settings))


def _error(folder: Path) -> str:
    with pytest.raises(DataError) as info:
        _build(folder)
    return str(info.value)


LAYOUT = {
    "train": {"cat": ["b.png", "a.png", "c.png"], "ant": ["b.png", "d.bmp"], "dog": ["a.png"]},
    "test": {"cat": ["02.png", "00.png"], "ant": ["01.png"], "dog": ["03.png"]},
}


def test_decodes_rgb_images_in_name_then_class_order(tmp_path: Path) -> None:
    folder = _folder(tmp_path, LAYOUT)
    (folder / "train" / "cat" / "notes.txt").write_text("not an image")
    bundle = _build(folder)
    assert bundle.class_names == ["ant", "cat", "dog"]
    assert bundle.input_shape == (3, 4, 6)
    assert bundle.test.x.shape == (4, 3, 4, 6) and bundle.test.x.dtype == torch.uint8
    # test is not shuffled: ordered by file name, then class
    order = ["cat/00.png", "ant/01.png", "cat/02.png", "dog/03.png"]
    assert bundle.test.y.tolist() == [1, 0, 1, 2]
    for i, name in enumerate(order):
        assert torch.equal(bundle.test.x[i], _pixels(folder / "test" / name))
    assert len(bundle.train) == 6  # the .txt file is not an image
    assert sorted(bundle.train.y.tolist()) == [0, 0, 1, 1, 1, 2]
    assert bundle.source_files == [folder / "train", folder / "test"]
    expected_mean = bundle.train.x.float().mean((0, 2, 3)) / 255
    torch.testing.assert_close(bundle.mean, expected_mean)


def test_grayscale_images_have_one_channel(tmp_path: Path) -> None:
    folder = _folder(tmp_path, LAYOUT, mode="L", size=(5, 5))
    bundle = _build(folder)
    assert bundle.input_shape == (1, 5, 5) and bundle.mean.shape == (1,)
    assert torch.equal(bundle.test.x[0], _pixels(folder / "test" / "cat" / "00.png"))


def test_jpeg_is_read(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"train": {"a": ["x.jpg"]}, "test": {"a": ["y.JPEG"]}})
    bundle = _build(folder)
    assert bundle.test.x.shape == (1, 3, 4, 6)


def test_train_and_test_need_the_same_classes(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path,
        {"train": {"a": ["1.png"], "b": ["1.png"]}, "test": {"a": ["1.png"], "c": ["1.png"]}},
    )
    message = _error(folder)
    assert "only in train/: ['b']" in message and "only in test/: ['c']" in message


def test_images_must_share_size(tmp_path: Path) -> None:
    folder = _folder(tmp_path, LAYOUT)
    _image(0, size=(7, 4)).save(folder / "train" / "dog" / "a.png")
    _image(0, size=(8, 4)).save(folder / "train" / "ant" / "b.png")
    message = _error(folder)
    # read order is file name, then class: cat/a.png sets the size, dog/a.png is the first
    # that differs, ant/b.png comes after it
    assert str(folder / "train" / "dog" / "a.png") in message
    assert "7x4" in message and "6x4" in message


def test_images_must_share_mode(tmp_path: Path) -> None:
    folder = _folder(tmp_path, LAYOUT)
    _image(0, mode="L").save(folder / "test" / "dog" / "03.png")
    message = _error(folder)
    assert str(folder / "test" / "dog" / "03.png") in message and "L" in message


def test_unsupported_mode_says_how_to_convert(tmp_path: Path) -> None:
    folder = _folder(tmp_path, LAYOUT, mode="RGBA")
    message = _error(folder)
    assert "'RGBA'" in message and "convert" in message


def test_undecodable_file_is_named(tmp_path: Path) -> None:
    folder = _folder(tmp_path, LAYOUT)
    (folder / "train" / "cat" / "c.png").write_bytes(b"\x89PNG not really")
    message = _error(folder)
    assert str(folder / "train" / "cat" / "c.png") in message and "decoded" in message


def test_empty_class_folder_and_missing_parts(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "a", LAYOUT)
    (folder / "train" / "eel").mkdir()
    (folder / "test" / "eel").mkdir()
    assert str(folder / "train" / "eel") in _error(folder) and "no images" in _error(folder)

    no_classes = tmp_path / "b"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "test").mkdir()
    assert "no class folders" in _error(no_classes)

    no_test = _folder(tmp_path / "c", {"train": LAYOUT["train"]})
    assert str(no_test / "test") in _error(no_test)


def test_real_cifar10_slice(shared_data: Path, tmp_path: Path) -> None:
    """A few real CIFAR-10 PNGs (linked, not copied) decode to the pixels in MANIFEST.txt."""
    cifar = shared_data / "cifar10"
    if not cifar.is_dir():
        pytest.skip("no cifar10 in the shared data folder")
    manifest = dict(line.split() for line in (cifar / "MANIFEST.txt").read_text().splitlines())
    linked = []
    for split, per_class in (("train", 8), ("test", 3)):
        for class_dir in sorted((cifar / split).iterdir()):
            (tmp_path / split / class_dir.name).mkdir(parents=True)
            for png in sorted(class_dir.iterdir())[:per_class]:
                (tmp_path / split / class_dir.name / png.name).symlink_to(png)
                linked.append(f"{split}/{class_dir.name}/{png.name}")
    bundle = _build(tmp_path)
    assert bundle.num_classes == 10 and bundle.class_names[0] == "airplane"
    assert (len(bundle.train), len(bundle.test)) == (80, 30)
    # test is in file-name order; check each image against the manifest's pixel sha256
    test_names = sorted((n for n in linked if n.startswith("test/")), key=lambda n: n[-9:])
    for image, label, name in zip(bundle.test.x, bundle.test.y, test_names):
        pixels = image.permute(1, 2, 0).contiguous().numpy().tobytes()  # (H, W, C) as stored
        assert hashlib.sha256(pixels).hexdigest() == manifest[name]
        assert bundle.class_names[label] == name.split("/")[1]


@pytest.mark.slow
def test_full_cifar10(shared_data: Path) -> None:
    """All 60,000 images: counts, the original order, and the published statistics."""
    if not (shared_data / "cifar10").is_dir():
        pytest.skip("no cifar10 in the shared data folder")
    bundle = build(DataConfig(source="image_folder", path="cifar10"), shared_data)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (45000, 5000, 10000)
    assert bundle.input_shape == (3, 32, 32)
    # the original test order: cat, ship, ship, airplane, frog, frog, automobile, frog, ...
    assert bundle.test.y[:8].tolist() == [3, 8, 8, 0, 6, 6, 1, 6]
    assert torch.bincount(bundle.test.y).tolist() == [1000] * 10
    published_mean = torch.tensor([0.4914, 0.4822, 0.4465])  # full train set
    published_std = torch.tensor([0.2470, 0.2435, 0.2616])
    torch.testing.assert_close(bundle.mean, published_mean, atol=3e-3, rtol=0)
    torch.testing.assert_close(bundle.std, published_std, atol=3e-3, rtol=0)
