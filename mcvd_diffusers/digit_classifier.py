"""Digit identity: does the predicted video keep its digits? A small MNIST classifier (shipped in ``assets/``,
trained by ``scripts/train_digit_classifier.py``) reads the 28x28 window at each digit's *true* position (recorded by
the test set) in a predicted frame; a frame's score is the fraction of its readable digits read as their label."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .integrity import sha256_file

DIGIT_SIZE = 28
MAX_OVERLAP = 0.5  # of the window's area: digits that overlap another by more are left out of the frame
ASSETS = Path(__file__).parent / "assets"
WEIGHTS = ASSETS / "digit_classifier.safetensors"
CARD = ASSETS / "digit_classifier.json"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class DigitClassifier(nn.Module):
    """A small CNN for 28x28 MNIST digits: (N, 1, 28, 28) floats in [0, 1] -> (N, 10) logits."""

    def __init__(self, width: int = 16, hidden: int = 128):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(1, width), nn.MaxPool2d(2),  # 14
            *block(width, 2 * width), nn.MaxPool2d(2),  # 7
            *block(2 * width, 4 * width), nn.MaxPool2d(2),  # 3
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * width * 9, hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - MNIST_MEAN) / MNIST_STD))


def weights_sha256(path: str | Path = WEIGHTS) -> str:
    return sha256_file(path)


def load_digit_classifier(path: str | Path | None = None, device: torch.device | str = "cpu") -> DigitClassifier:
    """The shipped classifier (or the safetensors file at ``path``), in eval mode on ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path or WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(f"digit classifier weights {path} not found; scripts/train_digit_classifier.py "
                                f"writes them")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    model = DigitClassifier()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: these are not DigitClassifier weights ({e})") from e
    return model.to(device).eval()


def classifier_card(path: str | Path = CARD) -> dict:
    """The shipped classifier's card: MNIST test accuracy, training command, time and machine."""
    return json.loads(Path(path).read_text())


def _check_layout(frames: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if frames.ndim == 5:
        if frames.shape[2] != 1:
            raise ValueError(f"digit identity reads grey frames (B, F, 1, H, W), got {tuple(frames.shape)}")
        frames = frames[:, :, 0]
    if frames.ndim != 4:
        raise ValueError(f"expected frames (B, F, 1, H, W) or (B, F, H, W), got {tuple(frames.shape)}")
    B, F, H, W = frames.shape
    if positions.ndim != 4 or tuple(positions.shape[:2]) != (B, F) or positions.shape[-1] != 2:
        raise ValueError(f"positions must be (B, F, D, 2) for frames {tuple(frames.shape)}, got "
                         f"{tuple(positions.shape)}")
    if tuple(labels.shape) != (B, positions.shape[2]):
        raise ValueError(f"labels must be (B, D) = {(B, positions.shape[2])}, got {tuple(labels.shape)}")
    if positions.min() < 0 or (positions[..., 0] > H - DIGIT_SIZE).any() or (positions[..., 1] > W - DIGIT_SIZE).any():
        raise ValueError(f"positions must put the 28x28 windows inside the {H}x{W} frames")
    return frames


def crop_windows(frames: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W) frames and (B, F, D, 2) top-left positions (row, col) -> 28x28 windows (B, F, D, 28, 28)."""
    B, F = frames.shape[:2]
    positions = positions.to(frames.device).long()
    offsets = torch.arange(DIGIT_SIZE, device=frames.device)
    rows = (positions[..., 0, None] + offsets)[..., :, None]  # (B, F, D, 28, 1)
    cols = (positions[..., 1, None] + offsets)[..., None, :]  # (B, F, D, 1, 28)
    b = torch.arange(B, device=frames.device).view(B, 1, 1, 1, 1)
    f = torch.arange(F, device=frames.device).view(1, F, 1, 1, 1)
    return frames[b, f, rows, cols]


def readable_digits(positions: torch.Tensor, max_overlap: float = MAX_OVERLAP) -> torch.Tensor:
    """(B, F, D, 2) positions -> (B, F, D) bool: the digits whose window overlaps no other digit's window by
    more than ``max_overlap`` of its area."""
    positions = positions.long()
    gap = (positions[..., :, None, :] - positions[..., None, :, :]).abs()  # (B, F, D, D, 2)
    overlap = (DIGIT_SIZE - gap).clamp(min=0).prod(-1)  # intersection area of two windows
    overlap.diagonal(dim1=-2, dim2=-1).zero_()  # a digit does not overlap itself
    return overlap.max(-1).values <= max_overlap * DIGIT_SIZE**2


@torch.no_grad()
def digit_accuracy(classifier: nn.Module, frames: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor,
                   max_overlap: float = MAX_OVERLAP) -> torch.Tensor:
    """Per frame, the fraction of the readable digits (``readable_digits``) that ``classifier`` reads as their label
    in the window at their true position: frames (B, F, 1, H, W) in [0, 1], positions (B, F, D, 2) top-left (row,
    col), labels (B, D) -> (B, F) float32 on the CPU, NaN for a frame without a readable digit."""
    frames = _check_layout(frames, positions, labels).to(next(classifier.parameters()).device).float()
    windows = crop_windows(frames, positions)  # (B, F, D, 28, 28)
    logits = classifier(windows.reshape(-1, 1, DIGIT_SIZE, DIGIT_SIZE).clamp(0, 1))
    correct = (logits.argmax(-1).view(windows.shape[:3]).cpu() == labels.long().cpu()[:, None, :]).float()
    readable = readable_digits(positions.cpu(), max_overlap).float()
    return (correct * readable).sum(-1) / readable.sum(-1)  # 0 / 0: NaN for a frame without a readable digit


class DigitIdentity:
    """Digit identity of predictions of a fixed set of clips, by clip index; positions (N, F, D, 2) and labels
    (N, D): the layout of the N clips' *predicted* frames."""

    def __init__(self, positions: torch.Tensor, labels: torch.Tensor, device: torch.device | str = "cpu",
                 weights: str | Path | None = None):
        self.classifier = load_digit_classifier(weights, device)
        self.positions, self.labels = positions.long().cpu(), labels.long().cpu()
        self.weights = f"sha256:{weights_sha256(weights or WEIGHTS)}"
        card = Path(weights).with_suffix(".json") if weights else CARD
        self.test_accuracy = classifier_card(card).get("mnist_test_accuracy") if card.is_file() else None

    def __call__(self, frames: torch.Tensor, clips: torch.Tensor | slice) -> torch.Tensor:
        """Predicted frames (B, F, 1, H, W) of the clips ``clips`` (indices or a slice) -> (B, F)."""
        return digit_accuracy(self.classifier, frames, self.positions[clips], self.labels[clips])

    def describe(self) -> dict:
        return {"classifier": self.weights, "classifier_mnist_test_accuracy": self.test_accuracy,
                "max_overlap": MAX_OVERLAP}
