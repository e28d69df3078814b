"""MNIST digits: the idx(.gz) reader, and where the files come from: ``root`` (a folder of the four idx files, or
``"bundled"`` for the sample shipped in this package, see ``bundled/README.md``), else $MCVD_MNIST_DIR, else the cache
($MCVD_CACHE_DIR/mnist, default ~/.cache/mcvd_diffusers/mnist), downloaded there when absent (checksums verified).
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.utils import calculate_md5
from tqdm.auto import tqdm

from ..integrity import sha256_file

MNIST_DIR_ENV = "MCVD_MNIST_DIR"
CACHE_DIR_ENV = "MCVD_CACHE_DIR"
BUNDLED = "bundled"

# (split, kind) -> file name without ".gz"
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
# Download mirrors and the md5 of the canonical gzip archives (the values torchvision uses).
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
CHECKSUMS = {
    "train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
}
# The last 1/12 of MNIST train (5000 of 60000 digits) is held out: checkpoint selection never sees test digits.
VALIDATION_FRACTION = 1 / 12
SPLITS = ("train", "val", "test")


class MNISTNotFoundError(FileNotFoundError):
    """The MNIST files are neither on disk nor downloadable."""


@dataclass(frozen=True)
class MNISTDigits:
    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor  # (N,) int64
    source: str  # where they came from, for logs and results files

    def __len__(self) -> int:
        return self.images.shape[0]


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "mcvd_diffusers"))


def bundled_mnist_dir() -> Path:
    return Path(__file__).parent / "bundled"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an idx file of unsigned bytes (gzip'd when its name ends in .gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut gzip stream is an EOFError
        raise ValueError(f"{path}: cannot be read as {'a gzip' if path.suffix == '.gz' else 'an'} idx file ({e})") from e
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (bad magic number {data[:4]!r})")
    ndim = data[3]
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise ValueError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4:header_end])
    expected = int(np.prod(shape))
    if len(data) - header_end != expected:
        raise ValueError(f"{path}: truncated or corrupt: its header promises shape {shape} ({expected} bytes), "
                         f"the file holds {len(data) - header_end} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape)


def _find_file(folder: Path, stem: str) -> Path | None:
    return next((folder / name for name in (stem + ".gz", stem) if (folder / name).is_file()), None)


def _missing_files(folder: Path) -> list[str]:
    return [stem for stem in IDX_FILES.values() if _find_file(folder, stem) is None]


# "ALGORITHM:HEX" checksums. torchvision's calculate_md5 works where FIPS forbids MD5 for security (it passes
# usedforsecurity=False); torchvision has no SHA-256, so that is the project's own sha256_file.
DIGESTS = {"md5": calculate_md5, "sha256": sha256_file}


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algorithm, _, expected = checksum.partition(":")
    if algorithm not in DIGESTS or not expected:
        raise ValueError(f"a checksum is written ALGORITHM:HEX with ALGORITHM one of {sorted(DIGESTS)}, "
                         f"got {checksum!r}")
    return algorithm, expected.lower()


def download_file(url: str, destination: Path, checksum: str) -> Path:
    """Downloads ``url`` to ``destination`` atomically and verifies ``checksum`` ("md5:..." or "sha256:...").

    Not torchvision's ``download_url``: it has no timeout (a dead mirror would hang instead of failing over),
    writes straight to the final path (a cut transfer looks present) and reports a bad checksum as "File not found
    or corrupted". Here a temporary file replaces ``destination`` only once its checksum matches."""
    algorithm, expected = _parse_checksum(checksum)  # a malformed checksum is refused before anything is fetched
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {destination.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        actual = DIGESTS[algorithm](tmp_name)
        if actual != expected:
            raise ValueError(f"{destination.name}: checksum mismatch ({algorithm} {actual}, expected {expected})")
        os.replace(tmp_name, destination)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return destination


def download_mnist(folder: str | os.PathLike, mirrors=MIRRORS, checksums=CHECKSUMS) -> Path:
    """Downloads the four MNIST archives into ``folder`` (skipping those already there)."""
    folder = Path(folder)
    for checksum in checksums.values():
        _parse_checksum(checksum)  # a programming error, not a download failure to try the next mirror on
    for name, checksum in checksums.items():
        if (folder / name).is_file():
            continue
        errors = []
        for mirror in mirrors:
            try:
                download_file(mirror + name, folder / name, checksum)
                break
            except (urllib.error.URLError, OSError, ValueError) as e:
                errors.append(f"  {mirror}{name}: {e}")
        else:
            raise MNISTNotFoundError(f"Could not download {name} into {folder}:\n" + "\n".join(errors) + "\n"
                                     + _how_to_provide())
    return folder


def _how_to_provide() -> str:
    names = ", ".join(stem + "[.gz]" for stem in IDX_FILES.values())
    return (f"Provide the MNIST files yourself: put {names} in a folder and set {MNIST_DIR_ENV}=<folder> "
            f"(or pass root=<folder>); or use root='{BUNDLED}' for the small sample shipped with this package.")


def resolve_mnist_dir(root: str | os.PathLike | None = None, download: bool = True) -> tuple[Path, str]:
    """Returns the folder holding the MNIST files and a description of where it came from."""
    bundled = str(root) == BUNDLED
    if bundled:
        root, origin = bundled_mnist_dir(), "the bundled sample"
    elif root is not None:
        origin = "argument root"
    elif os.environ.get(MNIST_DIR_ENV):
        root, origin = os.environ[MNIST_DIR_ENV], f"${MNIST_DIR_ENV}"
    else:
        folder = default_cache_dir() / "mnist"
        if _missing_files(folder):
            if not download:
                raise MNISTNotFoundError(f"MNIST is not in the cache {folder} and download=False. {_how_to_provide()}")
            download_mnist(folder)
        return folder, f"MNIST downloaded to {folder}"
    folder = Path(root).expanduser()
    if missing := _missing_files(folder):
        raise MNISTNotFoundError(f"{folder} (from {origin}) lacks {', '.join(missing)}. {_how_to_provide()}")
    return folder, "bundled MNIST sample (mcvd_diffusers/data/bundled)" if bundled else f"MNIST files in {folder}"


def load_mnist(split: str = "train", root: str | os.PathLike | None = None, download: bool = True) -> MNISTDigits:
    """Loads MNIST digits of one split: "train" (train minus the held-out part), "val" or "test"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder, source = resolve_mnist_dir(root, download)
    file_split = "test" if split == "test" else "train"
    images_path, labels_path = (_find_file(folder, IDX_FILES[(file_split, kind)]) for kind in ("images", "labels"))
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.shape != (images.shape[0],) or labels.max(initial=0) > 9:
        raise ValueError(f"{labels_path}: expected {images.shape[0]} labels in 0..9, got shape {labels.shape}")
    if file_split == "train":
        n_val = round(len(images) * VALIDATION_FRACTION)
        part = slice(len(images) - n_val, None) if split == "val" else slice(0, len(images) - n_val)
        images, labels = images[part], labels[part]
    return MNISTDigits(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)),
                       source=f"{source}, split {split} ({len(images)} digits)")
