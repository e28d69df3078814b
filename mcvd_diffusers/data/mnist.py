"""MNIST digits: the idx(.gz) reader, where the files come from, and their download.

Where the digits come from, in this order:
1. ``root`` passed by the caller: a folder holding the four standard idx files
   (gzip'd or not), or the string ``"bundled"`` for the small sample shipped
   inside this package (see ``bundled/README.md``);
2. the environment variable ``MCVD_MNIST_DIR``;
3. the cache folder (``$MCVD_CACHE_DIR/mnist``, default ``~/.cache/mcvd_diffusers/mnist``),
   downloading the files there first when they are absent (checksums verified).
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
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
CHECKSUMS = {
    "train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
}
# The last 1/12 of MNIST train (5000 of 60000 digits) is held out for validation,
# so that checkpoint selection never looks at the test digits.
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
        raise ValueError(
            f"{path}: truncated or corrupt: its header promises shape {shape} ({expected} bytes), "
            f"the file holds {len(data) - header_end} bytes of data"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _missing_files(folder: Path) -> list[str]:
    return [stem for stem in IDX_FILES.values() if _find_file(folder, stem) is None]


# How a "ALGORITHM:HEX" checksum is computed. MD5 (what MNIST's and Moving MNIST's publishers give) is
# torchvision's calculate_md5, which also works where FIPS forbids MD5 for security (it asks hashlib
# for usedforsecurity=False). torchvision checks MD5 only (check_integrity, download_url's md5=), so
# SHA-256 is the project's own sha256_file, as for exported weights.
DIGESTS = {"md5": calculate_md5, "sha256": sha256_file}


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algorithm, _, expected = checksum.partition(":")
    if algorithm not in DIGESTS or not expected:
        raise ValueError(
            f"a checksum is written ALGORITHM:HEX with ALGORITHM one of {sorted(DIGESTS)}, got {checksum!r}"
        )
    return algorithm, expected.lower()


def _verify_checksum(path: Path, checksum: str, name: str) -> None:
    algorithm, expected = _parse_checksum(checksum)
    actual = DIGESTS[algorithm](path)
    if actual != expected:
        raise ValueError(f"{name}: checksum mismatch ({algorithm} {actual}, expected {expected})")


def download_file(url: str, destination: Path, checksum: str) -> Path:
    """Downloads ``url`` to ``destination`` atomically and verifies ``checksum`` ("md5:..." or "sha256:...").

    The transfer is written here rather than with torchvision's ``download_url``, which has no
    timeout (a mirror that stops answering would hang the caller forever instead of failing over
    to the next one), writes straight to the final path (a cut transfer would leave a partial
    file that looks present) and reports a bad checksum as a bare "File not found or corrupted".
    Here the bytes go to a temporary file beside ``destination``, which replaces it only once its
    checksum matches; nothing else is left behind on any failure.
    """
    _parse_checksum(checksum)  # a malformed checksum is refused before anything is fetched
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {destination.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        _verify_checksum(Path(tmp_name), checksum, name=destination.name)
        os.replace(tmp_name, destination)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
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
            raise MNISTNotFoundError(
                f"Could not download {name} into {folder}:\n" + "\n".join(errors) + "\n" + _how_to_provide()
            )
    return folder


def _how_to_provide() -> str:
    names = ", ".join(stem + "[.gz]" for stem in IDX_FILES.values())
    return (
        f"Provide the MNIST files yourself: put {names} in a folder and set {MNIST_DIR_ENV}=<folder> "
        f"(or pass root=<folder>); or use root='{BUNDLED}' for the small sample shipped with this package."
    )


def resolve_mnist_dir(root: str | os.PathLike | None = None, download: bool = True) -> tuple[Path, str]:
    """Returns the folder holding the MNIST files and a description of where it came from."""
    if root is not None and str(root) == BUNDLED:
        root, origin = bundled_mnist_dir(), "the bundled sample"
    elif root is None and os.environ.get(MNIST_DIR_ENV):
        root, origin = os.environ[MNIST_DIR_ENV], f"${MNIST_DIR_ENV}"
    else:
        origin = "argument root"
    if root is not None:
        folder = Path(root).expanduser()
        missing = _missing_files(folder) if folder.is_dir() else list(IDX_FILES.values())
        if missing:
            raise MNISTNotFoundError(f"{folder} (from {origin}) lacks {', '.join(missing)}. {_how_to_provide()}")
        if origin == "the bundled sample":
            return folder, "bundled MNIST sample (mcvd_diffusers/data/bundled)"
        return folder, f"MNIST files in {folder}"
    folder = default_cache_dir() / "mnist"
    if _missing_files(folder):
        if not download:
            raise MNISTNotFoundError(f"MNIST is not in the cache {folder} and download=False. {_how_to_provide()}")
        download_mnist(folder)
    return folder, f"MNIST downloaded to {folder}"


def load_mnist(split: str = "train", root: str | os.PathLike | None = None, download: bool = True) -> MNISTDigits:
    """Loads MNIST digits of one split: "train" (train minus the held-out part), "val" or "test"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder, source = resolve_mnist_dir(root, download)
    file_split = "test" if split == "test" else "train"
    images_path = _find_file(folder, IDX_FILES[(file_split, "images")])
    labels_path = _find_file(folder, IDX_FILES[(file_split, "labels")])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.shape != (images.shape[0],) or labels.max(initial=0) > 9:
        raise ValueError(f"{labels_path}: expected {images.shape[0]} labels in 0..9, got shape {labels.shape}")
    if file_split == "train":
        n_val = round(len(images) * VALIDATION_FRACTION)
        part = slice(len(images) - n_val, None) if split == "val" else slice(0, len(images) - n_val)
        images, labels = images[part], labels[part]
    return MNISTDigits(
        images=torch.from_numpy(images.copy()),
        labels=torch.from_numpy(labels.astype(np.int64)),
        source=f"{source}, split {split} ({len(images)} digits)",
    )
