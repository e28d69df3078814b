"""Moving MNIST: a vectorized bouncing-digit generator (``MovingMNIST``), the fixed test set (``load_test_set``, a
``datasets.Dataset`` cached on disk with each digit's position and label per frame for the digit-identity metric),
and the official ``mnist_test_seq.npy`` (Srivastava et al. 2015, ``load_mnist_test_seq``)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .mnist import MNISTDigits, default_cache_dir, download_file, load_mnist

logger = logging.getLogger(__name__)

DIGIT_SIZE = 28
MOTIONS = ("deterministic", "stochastic")
# "clamp": the standard generator's walls (Srivastava et al. 2015; mnist_test_seq.npy and OpenSTL's loader): a digit
# that steps past a wall is put back on it and its velocity reversed, positions truncated to pixels. "elastic": this
# project's generator before test-set format 3 (mirror reflection, rounded positions), kept to reproduce old numbers.
BOUNCES = ("clamp", "elastic")


class MovingMNIST:
    """Bouncing MNIST digits on a black canvas, combined by pixel-wise max, drawn on the device of ``digits``
    ((N, 28, 28) uint8); ``labels`` (N,), optional, are returned per digit by ``sample(..., return_layout=True)``.

    Deterministic motion (Srivastava et al. 2015): a random start and direction, a constant speed of
    ``step_length`` (fraction of the free range per frame), bounces off the walls as ``bounce`` says (see
    ``BOUNCES``; "clamp" is the standard generator's rule). Stochastic motion (SVG / MCVD's SMMNIST) redraws the
    direction at every bounce, pointing away from the wall, at the same speed."""

    def __init__(self, digits: torch.Tensor, image_size: int = 64, num_digits: int = 2, num_frames: int = 20,
                 motion: str = "deterministic", step_length: float = 0.1, labels: torch.Tensor | None = None,
                 bounce: str = "clamp"):
        if digits.ndim != 3 or tuple(digits.shape[1:]) != (DIGIT_SIZE, DIGIT_SIZE) or digits.dtype != torch.uint8:
            raise ValueError(f"digits must be a (N, 28, 28) uint8 tensor, got {tuple(digits.shape)} {digits.dtype}")
        if len(digits) == 0:
            raise ValueError("digits is empty")
        if image_size < DIGIT_SIZE:
            raise ValueError(f"image_size must be at least {DIGIT_SIZE}, got {image_size}")
        if num_digits < 1 or num_frames < 1:
            raise ValueError(f"num_digits and num_frames must be >= 1, got {num_digits} and {num_frames}")
        if motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
        if bounce not in BOUNCES:
            raise ValueError(f"bounce must be one of {BOUNCES}, got {bounce!r}")
        if not 0 < step_length <= 1:
            raise ValueError(f"step_length must be in (0, 1], got {step_length}")
        if labels is not None and tuple(labels.shape) != (len(digits),):
            raise ValueError(f"labels must be one per digit, shape ({len(digits)},), got {tuple(labels.shape)}")
        self.digits = digits
        self.labels = None if labels is None else labels.to(device=digits.device, dtype=torch.int64)
        self.image_size, self.num_digits, self.num_frames = image_size, num_digits, num_frames
        self.motion, self.step_length, self.bounce = motion, step_length, bounce

    def trajectories(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Top-left pixel positions (row, col) of each digit: (B, T, D, 2) int64 in [0, image_size - 28]."""
        shape = (batch_size, self.num_digits)
        rand = lambda *s: torch.rand(*s, generator=generator, device=self.digits.device)  # noqa: E731
        pos = rand(*shape, 2)  # in units of the free range [0, 1]
        angle = rand(*shape) * 2 * math.pi
        vel = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1) * self.step_length
        clamp = self.bounce == "clamp"
        if clamp:  # in float64, as the standard generator's numpy code, so truncation lands on the same pixels
            pos, vel = pos.double(), vel.double()
        frames = []
        for _ in range(self.num_frames):
            if not clamp:  # the elastic generator records a position before stepping from it
                frames.append(pos)
            pos = pos + vel
            if clamp:  # as the standard generator: onto the wall (a position of exactly 0 or 1 counts as a hit)
                low, high = pos <= 0, pos >= 1
                pos = pos.clamp(0, 1)
            else:
                low, high = pos < 0, pos > 1
                pos = torch.where(low, -pos, torch.where(high, 2 - pos, pos))
            bounced = low | high
            vel = torch.where(bounced, -vel, vel)
            if self.motion == "stochastic":
                # A fresh direction at each bounce; its component normal to the wall points inwards.
                angle = rand(*shape) * 2 * math.pi
                fresh = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1) * self.step_length
                fresh = torch.where(bounced, fresh.abs() * torch.where(low, 1.0, -1.0), fresh)
                vel = torch.where(bounced.any(-1, keepdim=True), fresh, vel)
            if clamp:  # the standard generator records the position after the step and the bounce
                frames.append(pos)
        free = self.image_size - DIGIT_SIZE
        scaled = torch.stack(frames, dim=1) * free
        # The standard generator truncates (numpy's astype(int32)); positions are >= 0, so truncation is floor.
        return (scaled.floor() if clamp else scaled.round()).long().clamp_(0, free)

    def render(self, digit_images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pastes (B, D, 28, 28) digits at (B, T, D, 2) positions: (B, T, H, W) uint8, overlaps by max."""
        B, T, D, _ = positions.shape
        offsets = torch.arange(DIGIT_SIZE, device=positions.device)
        rows = positions[..., 0, None] + offsets  # (B, T, D, 28)
        cols = positions[..., 1, None] + offsets
        flat = (rows[..., :, None] * self.image_size + cols[..., None, :]).reshape(B * T, -1)
        values = digit_images[:, None].expand(B, T, D, DIGIT_SIZE, DIGIT_SIZE).reshape(B * T, -1)
        canvas = torch.zeros(B * T, self.image_size**2, dtype=digit_images.dtype, device=positions.device)
        canvas.scatter_reduce_(1, flat, values, reduce="amax")
        return canvas.view(B, T, self.image_size, self.image_size)

    def sample(self, batch_size: int, generator: torch.Generator | None = None, dtype=torch.float32,
               return_layout: bool = False):
        """A batch of sequences (B, T, 1, H, W): floats in [0, 1], or uint8 when ``dtype=torch.uint8``.

        With ``return_layout=True``: ``(frames, positions, labels)``, each digit's top-left pixel (row, col) per frame
        (B, T, D, 2) and class (B, D) (None without ``labels``), both int64: what the same frames were drawn from."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        index = torch.randint(len(self.digits), (batch_size, self.num_digits), generator=generator,
                              device=self.digits.device)
        positions = self.trajectories(batch_size, generator)
        frames = self.render(self.digits[index], positions)[:, :, None]
        frames = frames if dtype == torch.uint8 else frames.to(dtype) / 255
        if not return_layout:
            return frames
        return frames, positions, None if self.labels is None else self.labels[index]


# ---------------------------------------------------------------- fixed test set
TEST_SET_SEED = 2022
TEST_SET_CLIPS = 1000
# What a materialized test set holds (1: frames; 2: also positions and labels; 3: drawn with the standard clamp
# bounces). Part of the cache key, so a set cached by an earlier version is never taken for a current one.
TEST_SET_FORMAT = 3
LAYOUT_COLUMNS = ("positions", "labels")
_TEST_SET_META = "mcvd_test_set.json"


def digits_fingerprint(digits: torch.Tensor) -> str:
    return hashlib.sha256(digits.contiguous().numpy().tobytes()).hexdigest()[:16]


def build_test_set(digits: MNISTDigits, num_clips: int = TEST_SET_CLIPS, seed: int = TEST_SET_SEED,
                   chunk_size: int = 500, **generator_kwargs):
    """``num_clips`` clips drawn on the CPU with a fixed seed (the same on every machine): a ``datasets.Dataset``
    of uint8 ``frames`` (T, H, W), int16 ``positions`` (T, D, 2) and int64 ``labels`` (D,) (see ``sample``)."""
    import datasets

    generator = MovingMNIST(digits.images.cpu(), labels=digits.labels.cpu(), **generator_kwargs)
    rng = torch.Generator().manual_seed(seed)
    chunks = [generator.sample(min(chunk_size, num_clips - i), rng, dtype=torch.uint8, return_layout=True)
              for i in range(0, num_clips, chunk_size)]
    frames = torch.cat([chunk[0][:, :, 0] for chunk in chunks]).numpy()
    positions = torch.cat([chunk[1] for chunk in chunks]).to(torch.int16).numpy()
    labels = torch.cat([chunk[2] for chunk in chunks]).numpy()
    features = datasets.Features({"frames": datasets.Array3D(shape=frames.shape[1:], dtype="uint8"),
                                  "positions": datasets.Array3D(shape=positions.shape[1:], dtype="int16"),
                                  "labels": datasets.Sequence(datasets.Value("int64"), length=labels.shape[1])})
    return datasets.Dataset.from_dict({"frames": frames, "positions": positions, "labels": labels},
                                      features=features)


def clip_layout(dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The digits' positions (N, T, D, 2) and labels (N, D), int64, of a materialized test set, or None
    for a dataset that does not record them. (The dataset's uint8 torch format would cast them to uint8.)"""
    if not set(LAYOUT_COLUMNS) <= set(dataset.column_names):
        return None
    layout = dataset.with_format("numpy", columns=list(LAYOUT_COLUMNS))[:]
    return (torch.from_numpy(np.asarray(layout["positions"], dtype=np.int64)),
            torch.from_numpy(np.asarray(layout["labels"], dtype=np.int64)))


def load_test_set(root: str | os.PathLike | None = None, num_clips: int = TEST_SET_CLIPS, seed: int = TEST_SET_SEED,
                  cache_dir: str | os.PathLike | None = None, **generator_kwargs):
    """The fixed test set of MNIST *test* digits (``root`` as in ``load_mnist``), built once into ``cache_dir``
    (default: the package cache), memory-mapped afterwards: the dataset (torch format, uint8) and its metadata.
    ``generator_kwargs`` go to ``MovingMNIST`` (default: the standard deterministic motion with clamp bounces)."""
    import datasets

    digits = load_mnist("test", root=root)
    generator_kwargs.setdefault("bounce", "clamp")
    meta = {"format": TEST_SET_FORMAT, "num_clips": num_clips, "seed": seed,
            "digits": digits_fingerprint(digits.images), "data_source": digits.source,
            **{k: generator_kwargs[k] for k in sorted(generator_kwargs)}}
    key = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "data_source"}, sort_keys=True).encode())
    folder = Path(cache_dir or default_cache_dir() / "test_sets") / f"mmnist-test-{key.hexdigest()[:12]}"
    if not (folder / _TEST_SET_META).is_file() or not _has_layout(folder):
        _note_outdated_test_sets(folder.parent)
        dataset = build_test_set(digits, num_clips=num_clips, seed=seed, **generator_kwargs)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dataset.save_to_disk(str(tmp))
        (tmp / _TEST_SET_META).write_text(json.dumps(meta, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)  # a folder is either complete or absent
    # The formatters widen integers to int64 unless told the dtype; the frames are stored as uint8.
    dataset = datasets.load_from_disk(str(folder)).with_format("torch", dtype=torch.uint8)
    return dataset, {**meta, "path": str(folder)}


def _note_outdated_test_sets(cache_dir: Path) -> None:
    """One line when the cache holds test sets of an earlier format: they are never used, and may be deleted."""
    outdated = []
    for meta_file in sorted(cache_dir.glob(f"mmnist-test-*/{_TEST_SET_META}")):
        try:
            found = json.loads(meta_file.read_text()).get("format")
        except (OSError, ValueError):
            found = None
        if found != TEST_SET_FORMAT:
            outdated.append(f"{meta_file.parent.name} (format {found})")
    if outdated:
        logger.warning(f"not using {len(outdated)} cached test set(s) of an earlier format in {cache_dir}: "
                       f"{', '.join(outdated)}; format {TEST_SET_FORMAT} draws the standard clamp bounces, so the "
                       "test set is built anew (the old folders can be deleted)")


def _has_layout(folder: Path) -> bool:
    """Whether a cached test set records the digits' positions and labels (else it is regenerated)."""
    try:
        info = json.loads((folder / "dataset_info.json").read_text())
    except (OSError, ValueError):
        return False
    return set(LAYOUT_COLUMNS) <= set(info.get("features") or {})


def clips_to_video(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 clips (N, T, H, W) -> float video (N, T, 1, H, W) in [0, 1]."""
    frames = torch.as_tensor(frames)  # a numpy array shares its memory
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ValueError(f"expected uint8 clips of shape (N, T, H, W), got {tuple(frames.shape)} {frames.dtype}")
    return frames[:, :, None].float() / 255


# ------------------------------------------------------------ official test file
MNIST_TEST_SEQ_URL = "http://www.cs.toronto.edu/~nitish/unsupervised_video/mnist_test_seq.npy"
MNIST_TEST_SEQ_CHECKSUM = "md5:be083ec986bfe91a449d63653c411eb2"
MNIST_TEST_SEQ_TEST_CLIPS = 1000  # the reproduction's split: first 9000 clips train, last 1000 test


def load_mnist_test_seq(path: str | os.PathLike | None = None, split: str = "test",
                        download: bool = False) -> torch.Tensor:
    """Reads ``mnist_test_seq.npy`` (20, N, 64, 64) uint8, frame-major, as clips (n, 20, 64, 64). split: "train"
    (all but the last 1000 clips), "test" or "all". Without ``path``: the package cache, downloaded on request."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if path is None:
        path = default_cache_dir() / "mnist_test_seq.npy"
        if not path.is_file():
            if not download:
                raise FileNotFoundError(f"{path} not found: pass path=<your mnist_test_seq.npy> or download=True "
                                        f"(fetches {MNIST_TEST_SEQ_URL})")
            download_file(MNIST_TEST_SEQ_URL, path, MNIST_TEST_SEQ_CHECKSUM)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from e
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[0] != 20 or array.shape[2:] != (64, 64):
        raise ValueError(f"{path}: expected a uint8 array of shape (20, N, 64, 64) (frames first, as the official "
                         f"file), got {array.dtype} {array.shape}")
    n_test = MNIST_TEST_SEQ_TEST_CLIPS
    if split != "all" and array.shape[1] <= n_test:
        raise ValueError(f"{path}: holds {array.shape[1]} clips; the train/test split needs more than {n_test}")
    part = {"train": slice(0, -n_test), "test": slice(-n_test, None), "all": slice(None)}[split]
    return torch.from_numpy(np.ascontiguousarray(array[:, part].transpose(1, 0, 2, 3)))
